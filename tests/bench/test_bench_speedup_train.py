"""`dprune bench speedup` / `dprune bench train` end to end on CPU with a tiny model.

Only the output contract and the models are checked; timings never are (2 shared cores).
"""
import copy
import json
import sys
import types

import pytest
import torch

from distributed_prune import checkpoint, config, flops, models, pipeline, prune
from distributed_prune.bench import common
from distributed_prune.cli import main

RATIOS = "[0,0.5,0.5,0.5,0]"
TINY = ["--model", "resnet20", "--ratios", RATIOS, "--batch", "2", "--reps", "2", "--warmup", "1",
        "--device", "cpu", "--json"]


def _json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _direct(ratios=RATIOS, round_to=None):
    """The pruned model by the public API, as the pipeline calls it (seed 0, then create)."""
    torch.manual_seed(0)
    net = models.create("resnet20", num_classes=10)
    x = torch.zeros(1, 3, 32, 32)
    plan = prune.plan(net, ratios, criterion="l1", example_input=x, round_to=round_to)
    small = prune.apply(copy.deepcopy(net), plan, mode="physical")
    return net, small, plan, flops.count(net, x)["macs"], flops.count(small, x)["macs"]


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


def test_pruned_pair_equals_the_pipelines_model(tmp_path):
    """`dprune run` (synthetic data, no training) prunes its base model; pruned_pair on the same
    weights gives the same plan (sha256) and the same pruned state_dict shapes."""
    out = tmp_path / "run"
    cfg = config.load(None, [
        "model.name=resnet20", "model.num_classes=10", "data.name=synthetic", "data.input_size=32",
        "data.synthetic_train=8", "data.synthetic_val=8", "data.batch_size=8", "data.val_batch_size=8",
        "pretrain.epochs=0", "retrain.epochs=0", "prune.method=l1", f"prune.ratios={RATIOS}",
        "trainability.jsv=false", "train.progress=false", "train.device=cpu", f"output.dir={out}"])
    summary = pipeline.run(cfg)
    base = torch.load(out / "checkpoints" / "base.pt", weights_only=True)
    final = torch.load(out / "checkpoints" / "final.pt", weights_only=True)
    net = checkpoint.load_state(models.create("resnet20", num_classes=10), base["state_dict"])
    pair = common.pruned_pair(net, RATIOS, 10, (3, 32, 32))
    assert pair.plan.sha256() == summary["plan_sha256"]
    assert _shapes(pair.pruned.state_dict()) == _shapes(final["state_dict"])
    assert pair.pruned_macs == summary["pruned"]["macs"] and pair.dense_macs == summary["dense"]["macs"]
    # by name: the same as the public API called the pipeline's way
    net, small, plan, _, _ = _direct()
    by_name = common.pruned_pair("resnet20", RATIOS, 10, (3, 32, 32))
    assert by_name.plan.sha256() == plan.sha256()
    assert _shapes(by_name.pruned.state_dict()) == _shapes(small.state_dict())


def test_bench_speedup_json(tmp_path, capsys):
    out = tmp_path / "speedup.json"
    assert main(["bench", "speedup", *TINY, "--out", str(out)]) == 0
    r = _json(capsys)
    assert json.loads(out.read_text()) == r
    for k in ("model", "ratios", "device", "dtype", "batch", "dense_macs", "pruned_macs", "mac_speedup", "infer",
              "train", "efficiency", "torch", "date", "plan_sha256"):
        assert k in r, k
    assert r["device"] == "cpu" and r["dtype"] == "fp32" and r["batch"] == 2 and r["input_size"] == [3, 32, 32]
    _, _, plan, dense_macs, pruned_macs = _direct()
    assert (r["dense_macs"], r["pruned_macs"]) == (dense_macs, pruned_macs)
    assert r["mac_speedup"] == pytest.approx(dense_macs / pruned_macs) and r["mac_speedup"] > 1.5
    assert r["plan_sha256"] == plan.sha256()
    for phase in ("infer", "train"):
        p = r[phase]
        assert p["dense_ms"] > 0 and p["pruned_ms"] > 0 and p["speedup"] > 0
        assert p["speedup"] == pytest.approx(p["dense_ms"] / p["pruned_ms"])
        assert p["efficiency"] == pytest.approx(p["speedup"] / r["mac_speedup"]) == r["efficiency"][phase]


def test_bench_speedup_table_output(capsys):
    assert main(["bench", "speedup", *TINY[:-1], "--reps", "1"]) == 0
    text = capsys.readouterr().out
    assert "MAC" in text and "inference" in text and "training" in text and "measured/MAC" in text


def test_round_to_table_keeps_multiples(capsys):
    assert main(["bench", "speedup", "--round-to-table", *TINY[:4], "--batch", "2", "--reps", "1",
                 "--warmup", "0", "--device", "cpu", "--json"]) == 0
    rows = _json(capsys)["round_to_table"]
    assert [row["round_to"] for row in rows] == [None, 8, 16, 32]
    for row in rows:
        assert row["mac_speedup"] > 1 and row["infer_speedup"] > 0 and row["train_speedup"] > 0
        rt = row["round_to"]
        _, _, plan, dense_macs, pruned_macs = _direct(round_to=rt)
        assert row["plan_sha256"] == plan.sha256() and row["mac_speedup"] == pytest.approx(dense_macs / pruned_macs)
        for layer, kept in row["kept"].items():
            assert kept <= row["channels"][layer]
            if rt:
                assert kept % rt == 0 or kept == row["channels"][layer], (layer, kept, rt)
        assert row["kept_multiple"]


def test_bench_train_json(capsys):
    assert main(["bench", "train", *TINY, "--steps", "1"]) == 0
    r = _json(capsys)
    for k in ("dense", "pruned"):
        m = r[k]
        assert m["img_s"] > 0 and m["step_ms"] > 0 and m["tflops"] > 0 and m["peak_mem_bytes"] > 0
        assert m["tflops"] == pytest.approx(6 * m["macs"] * m["img_s"] / 1e12)
    assert r["speedup"] == pytest.approx(r["pruned"]["img_s"] / r["dense"]["img_s"])
    assert r["mem_ratio"] == pytest.approx(r["pruned"]["peak_mem_bytes"] / r["dense"]["peak_mem_bytes"])
    assert r["memory_method"] in ("rss_peak_delta", "rss_lifetime_peak") and r["amp"] == "none"
    assert r["plan_sha256"] == _direct()[2].sha256() and r["mac_speedup"] > 1.5


def test_bench_train_ablation_and_profile(tmp_path, capsys):
    from distributed_prune.bench.train import _text

    prof = tmp_path / "prof"
    assert main(["bench", "train", "--model", "resnet20", "--ratios", RATIOS, "--batch", "2", "--steps", "1",
                 "--reps", "1", "--warmup", "1", "--device", "cpu", "--fast-path-ablation", "--profile", str(prof),
                 "--json"]) == 0
    r = _json(capsys)
    rows = {a["item"]: a for a in r["ablation"]}
    assert rows["cudnn.benchmark"]["dense_ratio"] is None and "n/a" in rows["cudnn.benchmark"]["note"]
    assert rows["torch.compile"]["pruned_ratio"] is None
    assert rows["channels_last + bf16 autocast"]["dense_ratio"] > 0
    assert rows["fused SGD (vs foreach)"]["pruned_ratio"] > 0
    for name in ("dense", "pruned"):
        assert json.loads((prof / f"trace_{name}.json").read_text())
        assert "Self CPU" in (prof / f"ops_{name}.txt").read_text()
        assert r["profile"][name]["trace"] == str(prof / f"trace_{name}.json")
    text = _text(r)
    assert "fast-path ablation" in text and "n/a" in text and "cudnn.benchmark" in text


def test_world_size_goes_to_scaling(monkeypatch):
    seen = []
    fake = types.ModuleType("distributed_prune.bench.scaling")
    fake.main = lambda argv: seen.append(list(argv)) or 0
    monkeypatch.setitem(sys.modules, "distributed_prune.bench.scaling", fake)
    import distributed_prune.bench as pkg

    monkeypatch.setattr(pkg, "scaling", fake, raising=False)
    assert main(["bench", "train", "--world-size", "2", "--batch", "4"]) == 0
    assert seen == [["--world-size", "2", "--batch", "4"]]


@pytest.mark.parametrize("argv", [
    ["bench", "speedup", "--model", "resnet20", "--ratios", "[0,1.5,0,0,0]", "--device", "cpu"],
    ["bench", "speedup", "--model", "resnet20", "--ratios", RATIOS, "--batch", "0", "--device", "cpu"],
    ["bench", "speedup", "--ratios", RATIOS],
    ["bench", "train", "--model", "no_such_net", "--device", "cpu"],
    ["bench", "train", "--input-size", "3,x", "--device", "cpu"],
])
def test_bad_arguments_exit_2(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dprune: error:")
