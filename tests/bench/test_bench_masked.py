"""`dprune bench masked`: smoke run on CPU (timings are not checked, only the table's contract)."""
import json
import subprocess
import sys

import pytest


def test_bench_masked_cpu_smoke(tmp_path, capsys):
    from distributed_prune.bench import masked

    out = tmp_path / "m.json"
    rc = masked.main(["--device", "cpu", "--model", "resnet20", "--spec", "*layer*.conv1:{s}",
                      "--sparsities", "0.5", "--backends", "reference,gather,triton",
                      "--batch", "2", "--reps", "1", "--warmup", "0", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["backends"] == ["reference", "gather"] and "triton" in res["skipped"]
    (row,) = res["rows"]
    assert row["sparsity"] == 0.5 and row["masked_channels"] > 0
    for k in ("pruned_ratio", "reference_ratio", "gather_ratio", "compact_ratio",
              "compact_update_ms"):
        assert row[k] > 0
    # compact+upd: the compact step plus the update amortised over --update-interval steps
    assert row["compact_amortized_ratio"] == pytest.approx(
        (row["compact_ms"] + row["compact_update_ms"] / 100) / res["dense_ms"])
    assert row["target_ratio"] == 0.5 + 0.3                # CPU target: (1 - s) + 0.3
    out = capsys.readouterr().out
    assert "masked[gather]" in out and "compact+upd/100" in out


def test_bench_masked_bad_input_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "distributed_prune", "bench", "masked",
                        "--sparsities", "1.5"], capture_output=True, text=True, cwd=tmp_path,
                       timeout=120)
    assert r.returncode == 2 and "--sparsities" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
