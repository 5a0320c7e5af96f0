"""Pipeline methods on real data (digits, small CNN): GReg/TPP phases, one-shot criteria,
OrthP, scratch budgets, PxFy, iterative pruning, bit-identical bases and the fairness checker."""
import json
import math
from pathlib import Path

import pytest
import torch

from distributed_prune import config, pipeline, prune
from distributed_prune.report import load_runs
from distributed_prune.setups import check

ROOT = Path(__file__).resolve().parents[2]
BASE = config.yaml_load((ROOT / "configs" / "debug_cpu.yaml").read_text())


def _run(tmp_path, run_name, **over):
    d = json.loads(json.dumps(BASE))
    d["pretrain"].update(epochs=2, lr_schedule="0:0.05")
    d["retrain"].update(epochs=2, lr_schedule="0:0.01,1:0.001")
    d["trainability"]["samples"] = 8
    for k, v in over.items():
        config._set(d, k.replace("__", "."), v)
    d["output"]["dir"] = str(tmp_path / run_name)
    return pipeline.run(config.from_dict(d)), tmp_path / run_name


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["greg", "tpp"])
def test_regularization_phase_then_removal(tmp_path, method):
    s, d = _run(tmp_path, method, prune__method=method, prune__epochs=3, prune__lr_schedule="0:0.02",
                prune__reg={"granularity": 0.05, "ceiling": 2.0, "update_interval": 1,
                            "stabilize_interval": 5, "lw_opp": 1.0})
    assert [r["epoch"] for r in _rows(d) if r["stage"] == "prune"] == [0, 1, 2]
    assert s["setup"]["prune_epochs"] == 3 and s["setup"]["total_epochs"] == 2 + 3 + 2
    plan = prune.Plan.from_json((d / "plan.json").read_text())
    dense_end = torch.load(d / "checkpoints" / "prune-0002.pt", weights_only=True)["state_dict"]
    base = torch.load(d / "checkpoints" / "base.pt", weights_only=True)["state_dict"]
    for g in plan.groups:
        # the following BN's scale: GReg and TPP both drive it to zero on the pruned channels
        # (with BN after the conv, the conv filter's own norm does not change the output)
        bn = next(m.split(":")[0] for m in g.members if m.endswith(":out") and m.split(":")[0] != g.root)
        w0, w1 = base[bn + ".weight"][:, None], dense_end[bn + ".weight"][:, None]
        pruned = plan.pruned(g)
        shrink_pruned = (w1[pruned].norm(dim=1) / w0[pruned].norm(dim=1)).mean()
        shrink_kept = (w1[g.keep].norm(dim=1) / w0[g.keep].norm(dim=1)).mean()
        assert shrink_pruned < 0.5 * shrink_kept, (g.root, float(shrink_pruned), float(shrink_kept))
    assert s["final"]["top1"] > 0.5


@pytest.mark.parametrize("method", ["l2", "random", "bn_scale", "taylor"])
def test_one_shot_criteria(tmp_path, method):
    s, d = _run(tmp_path, method, prune__method=method)
    assert s["setup"]["prune_method"] == method and s["pruned"]["speedup"] > 1.5
    assert s["final"]["top1"] > 0.5


def test_orthp_and_scratch_budgets(tmp_path):
    s0, _ = _run(tmp_path, "none", prune__reinit="none")
    s1, d1 = _run(tmp_path, "orthp", prune__reinit="orthp")
    assert s1["pruned"]["jsv_mean"] != pytest.approx(s0["pruned"]["jsv_mean"])
    s2, d2 = _run(tmp_path, "scratchB", prune__reinit="scratch", retrain__scratch_budget="B")
    want = math.ceil(2 * s2["pruned"]["speedup"] + 2 - 1e-9)
    assert s2["setup"]["retrain_epochs"] == want == len([r for r in _rows(d2) if r["stage"] == "retrain"])
    s3, _ = _run(tmp_path, "scratchE", prune__reinit="scratch", retrain__scratch_budget="E")
    assert s3["setup"]["retrain_epochs"] == 4


def test_pxfy_one_overall_schedule(tmp_path):
    s, d = _run(tmp_path, "pxfy", pxfy={"total_epochs": 4, "prune_at": 2, "lr_schedule": "0:0.05,1:0.02,3:0.002"})
    rows = _rows(d)
    assert [r["lr"] for r in rows if r["stage"] == "pretrain"] == [0.05, 0.02]
    assert [r["lr"] for r in rows if r["stage"] == "retrain"] == [0.02, 0.002]
    assert s["setup"]["retrain_lr_schedule"] == "0:0.02,1:0.002" and s["setup"]["total_epochs"] == 4


def test_iterative_pruning_reaches_ratio(tmp_path):
    s, d = _run(tmp_path, "iter", prune__ratios="[1-3:0.75]", prune__iterative_steps=2, prune__iterative_epochs=1)
    plan = prune.Plan.from_json((d / "plan.json").read_text())
    for g in plan.groups:  # two steps of 1 - sqrt(0.25) = 0.5 each: 16 -> 8 -> 4 (or 32 -> 16 -> 8)
        assert len(g.keep) == g.n // 4
    assert [r["epoch"] for r in _rows(d) if r["stage"] == "prune"] == [1]


def test_bit_identical_bases_and_fairness_on_real_runs(tmp_path):
    a, da = _run(tmp_path, "a", retrain__lr_schedule="0:0.01,1:0.001", name="A")
    b, db = _run(tmp_path, "b", retrain__lr_schedule="0:0.001", name="B")
    c, dc = _run(tmp_path, "c", seed=1, name="C")
    assert a["setup"]["base_model_sha256"] == b["setup"]["base_model_sha256"] != c["setup"]["base_model_sha256"]
    r = check(load_runs([da, db]))
    assert r.setup == "S3.1" and not r.fair and "schedule" in r.reason
    r = check(load_runs([da, dc]))
    assert r.setup == "S1" and not r.fair
    d2, dd = _run(tmp_path, "d", name="D", prune__method="l2")
    r = check(load_runs([da, dd]))
    assert r.setup == "S4.2" and r.fair and "SX-A" in r.extra


def test_fast_path_options_bf16_channels_last_grad_accum(tmp_path):
    """The one AMP code path (bf16 autocast), channels_last and gradient accumulation run end to
    end and still learn (on CPU; the same code is the GPU fast path)."""
    s, d = _run(tmp_path, "amp", train__amp="bf16", train__channels_last=True, train__grad_accum=2,
                retrain__label_smoothing=0.1)
    assert s["final"]["top1"] > 0.5
    rows = _rows(d)
    assert all(r["train_loss"] == r["train_loss"] for r in rows)  # no NaN


def test_verbosity_switch_and_epoch_hooks(tmp_path, capsys):
    """output.verbose=false drops the per-epoch lines; epoch hooks see every epoch's row once,
    after it was logged (the same rows as metrics.jsonl)."""
    _run(tmp_path, "loud", retrain__epochs=1)
    loud = capsys.readouterr().out.splitlines()
    epochs = [ln for ln in loud if ln.startswith(("[pretrain ", "[retrain "))]
    assert [ln.split("]")[0] for ln in epochs] == ["[pretrain 1/2", "[pretrain 2/2", "[retrain 1/1"]
    assert any(ln.startswith("[pruned]") for ln in loud)
    seen = []
    d = json.loads(json.dumps(BASE))
    d["pretrain"].update(epochs=2, lr_schedule="0:0.05")
    d["retrain"].update(epochs=1, lr_schedule="0:0.01")
    d["trainability"]["samples"] = 8
    d["output"].update(dir=str(tmp_path / "quiet"), verbose=False)
    pipeline.run(config.from_dict(d), epoch_hooks=[lambda end: seen.append(dict(end.row))])
    quiet = capsys.readouterr().out
    assert quiet.strip() == "", quiet
    assert seen == _rows(tmp_path / "quiet")
    assert [(r["stage"], r["epoch"]) for r in seen] == [("pretrain", 0), ("pretrain", 1), ("retrain", 0)]
