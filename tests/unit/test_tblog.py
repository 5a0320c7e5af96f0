"""TensorBoard log: read back with tensorboard's own EventAccumulator, equal to the rows written;
reopening (a resumed run) does not duplicate steps."""
import importlib.util

import numpy as np
import pytest

from distributed_prune import tblog
from distributed_prune.errors import UserError

needs_tb = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                              reason="tensorboard not installed (the `tensorboard` extra)")


def read_events(log_dir):
    """{tag: [(step, value)]} and the config text, through tensorboard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    scalars = {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}
    text = None
    if "config/text_summary" in ea.Tags()["tensors"]:
        text = ea.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    return scalars, text


def expected(rows):
    out = {}
    for r in rows:
        for k, v in r.items():
            if k not in ("stage", "epoch") and isinstance(v, (int, float)):
                out.setdefault(f"{r['stage']}/{k}", []).append((r["epoch"], float(np.float32(v))))
    return out


ROWS = [{"stage": "pretrain", "epoch": e, "lr": 0.1, "train_loss": 1.0 / (e + 1), "train_top1": 0.5 + e / 10,
         "top1": 0.6 + e / 11, "time_s": 0.3, "images_per_s": 1234.5 + e} for e in range(3)] + \
       [{"stage": "prune", "epoch": 0, "lr": 0.01, "train_loss": 0.4, "top1": 0.7, "reg": 1e-4,
         "mask_sparsity": 0.5}] + \
       [{"stage": "retrain", "epoch": e, "lr": 0.01 if e < 2 else 0.001, "train_loss": 0.3 / (e + 1),
         "top1": 0.8 + e / 100, "jsv_mean": 1.1 + e} for e in range(3)]


@needs_tb
def test_scalars_equal_rows_and_config_text(tmp_path):
    log = tblog.TensorBoardLog(tmp_path / "tb", config_text="seed: 0\nmodel:\n  name: vgg_tiny")
    for r in ROWS:
        log.log_row(r)
    log.close()
    scalars, text = read_events(tmp_path / "tb")
    assert scalars == expected(ROWS)
    assert {"retrain/jsv_mean", "prune/reg", "prune/mask_sparsity", "pretrain/images_per_s"} <= set(scalars)
    assert "    model:\n      name: vgg_tiny" in text


@needs_tb
def test_reopening_with_kept_rows_does_not_duplicate(tmp_path):
    log = tblog.TensorBoardLog(tmp_path / "tb")
    for r in ROWS[:6]:          # ... crash after the retrain epoch 1 row, resumed after epoch 0
        log.log_row(r)
    log.close()
    kept = ROWS[:5]
    log = tblog.TensorBoardLog(tmp_path / "tb", rows=kept)
    redone = [dict(r, top1=r["top1"] + 0.001) for r in ROWS[5:]]  # redone epochs differ slightly
    for r in redone:
        log.log_row(r)
    log.close()
    scalars, _ = read_events(tmp_path / "tb")
    assert scalars == expected(kept + redone)
    assert len(list((tmp_path / "tb").glob(tblog.EVENT_GLOB))) == 1


def test_missing_package_is_a_user_error(monkeypatch):
    monkeypatch.setattr(tblog, "available", lambda: False)
    with pytest.raises(UserError, match=r"tensorboard package is not installed.*\[tensorboard\]"):
        tblog.require()
