"""Smoke test of `dprune bench kernels` on CPU (tiny settings; timings are not checked)."""
import json

import pytest

pytest.importorskip("torchvision")


def test_bench_kernels_cpu_smoke(tmp_path, monkeypatch, capsys):
    from distributed_prune.bench import kernels as bench
    from distributed_prune.kernels import dispatch

    out, tuning = tmp_path / "k.json", tmp_path / "tuning.json"
    rc = bench.main(["--device", "cpu", "--batch", "1", "--reps", "1", "--max-layers", "2",
                     "--sparsities", "0.5", "--backends", "reference,triton",
                     "--out", str(out), "--write-tuning", str(tuning)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["importance"]["tensors"] == 53          # every conv of ResNet-50
    assert len(result["masked_conv"]) == 2
    row = result["masked_conv"][0]
    assert row["dense_ms"] > 0 and row["reference_vs_dense"] > 0
    assert result["backends"]["triton"]                   # a reason: not timed without a GPU
    text = capsys.readouterr().out
    assert "relative to dense" in text and "n/a" in text
    # one backend measured -> nothing to choose between; the table is still valid JSON
    assert json.loads(tuning.read_text())["version"] == 1
    monkeypatch.setenv("DPRUNE_TUNING_FILE", str(tuning))
    assert isinstance(dispatch.load_tuning(), dict)


def test_resnet50_shapes_come_from_torchvision():
    from distributed_prune.bench.kernels import resnet50_conv_shapes

    layers = resnet50_conv_shapes(batch=64)
    assert sum(layer["count"] for layer in layers) == 53
    first = layers[0]
    assert first["x"] == (64, 3, 224, 224) and first["w"] == (64, 3, 7, 7)
    assert {tuple(layer["x"][2:]) for layer in layers} >= {(56, 56), (28, 28), (14, 14), (7, 7)}


def test_bad_arguments():
    from distributed_prune.bench import kernels as bench

    assert bench.main(["--device", "cpu", "--sparsities", "1.5"]) == 2
