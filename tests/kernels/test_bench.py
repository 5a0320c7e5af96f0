"""`dprune bench kernels` on CPU (tiny settings; timings are not checked) and the tuning table
it writes, as the kernel dispatcher reads it."""
import json

import pytest
import torch

pytest.importorskip("torchvision")


def test_bench_kernels_cpu_smoke(tmp_path, capsys):
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
    # one backend measured -> nothing to choose between: a valid table without entries
    table = json.loads(tuning.read_text())
    assert table["version"] == 1 and table["entries"] == {}
    assert dispatch.load_tuning(tuning) == {}


ROW = {"layer": "conv", "count": 1, "x": [8, 64, 16, 16], "w": [64, 64, 3, 3], "stride": 1,
       "sparsity": 0.5, "dense_ms": 1.0}
CPU = torch.device("cpu")


def _select(monkeypatch, table_path):
    from distributed_prune.kernels import dispatch

    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)          # backend "auto"
    monkeypatch.setenv(dispatch.TUNING_ENV_VAR, str(table_path))
    bucket = dispatch.shape_bucket(ROW["x"], ROW["w"], (1, 1), 1, 1.0 - ROW["sparsity"])
    return dispatch.select("masked_conv2d", CPU, lambda: bucket)


@pytest.mark.parametrize("fast", ["reference", "triton"])
def test_tuning_table_selects_the_faster_backend(tmp_path, monkeypatch, fast):
    """Two measured backends: the table written by the benchmark makes ``select`` return the
    faster one (triton runs on CPU here under TRITON_INTERPRET=1, see conftest)."""
    from distributed_prune.bench.kernels import write_tuning
    from distributed_prune.kernels import dispatch

    if not dispatch.triton_usable(CPU):
        pytest.skip("needs triton (TRITON_INTERPRET=1 on CPU)")
    slow = {"reference": "triton", "triton": "reference"}[fast]
    path = tmp_path / f"tuning_{fast}.json"
    n = write_tuning(path, CPU, [dict(ROW, **{f"{fast}_ms": 1.0, f"{slow}_ms": 3.0})],
                     {"reference": "", "triton": ""})
    assert n == 1 and list(dispatch.load_tuning(path).values()) == [fast]
    assert _select(monkeypatch, path) == fast


@pytest.mark.parametrize("content", ["{not json", '{"version": 1, "entries": {"k": "gpu9"}}'])
def test_unusable_tuning_table_gives_the_default_choice(tmp_path, monkeypatch, content):
    """A corrupt table, or one naming no known backend, is ignored: ``select`` makes the choice
    it makes without a table (gather: an unmeasured Triton kernel is never the default)."""
    from distributed_prune.kernels import dispatch

    path = tmp_path / "tuning.json"
    path.write_text(content)
    assert dispatch.load_tuning(path) == {}
    default = "gather"
    assert _select(monkeypatch, path) == default
    assert _select(monkeypatch, tmp_path / "absent.json") == default


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
