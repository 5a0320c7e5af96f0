"""`dprune run configs/debug_cpu.yaml data.format=ffcv` on digits .beton files reaches the same
accuracy band as the torchvision path; a bad .beton is one line and exit 2."""
import json
from pathlib import Path

import pytest

pytest.importorskip("ffcv")

from distributed_prune.cli import main  # noqa: E402

DEBUG = str(Path(__file__).resolve().parents[2] / "configs" / "debug_cpu.yaml")
SMALL = ["pretrain.epochs=3", "pretrain.lr_schedule=0:0.05,2:0.005", "retrain.epochs=2",
         "retrain.lr_schedule=0:0.01", "data.num_workers=1"]


def test_ffcv_run_matches_torchvision_band(tmp_path):
    for split in ("train", "val"):
        assert main(["data", "write-beton", "--dataset", "digits", "--split", split, "--mode", "raw",
                     "--out", str(tmp_path / f"digits_{split}.beton")]) == 0
    tv, ff = tmp_path / "tv", tmp_path / "ff"
    assert main(["run", DEBUG, f"output.dir={tv}", *SMALL]) == 0
    assert main(["run", DEBUG, f"output.dir={ff}", *SMALL, "data.format=ffcv",
                 f"data.train_path={tmp_path / 'digits_train.beton'}",
                 f"data.val_path={tmp_path / 'digits_val.beton'}"]) == 0
    a, b = (json.loads((d / "summary.json").read_text()) for d in (tv, ff))
    assert b["final"]["top1"] > 0.85 and abs(a["final"]["top1"] - b["final"]["top1"]) < 0.06
    assert a["dense"]["macs"] == b["dense"]["macs"]  # same model, same input shape


def test_bad_beton_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.beton"
    bad.write_bytes(b"not a beton")
    out = tmp_path / "never"
    assert main(["run", DEBUG, f"output.dir={out}", "data.format=ffcv", f"data.train_path={bad}",
                 f"data.val_path={bad}"]) == 2
    err = capsys.readouterr().err
    assert "bad.beton" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
