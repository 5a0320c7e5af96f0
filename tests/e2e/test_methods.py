"""Pipeline methods on real data (digits, small CNN): GReg/TPP phases, one-shot criteria,
OrthP, scratch budgets, PxFy, iterative pruning, bit-identical bases and the fairness checker."""
import json
import math
from pathlib import Path

import pytest
import torch

from distributed_prune import config, pipeline, prune
from distributed_prune.errors import UserError
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


# digits, batch 64: 1347 training images -> 22 iterations per epoch
_ITERS = 22
_REG = {"granularity": 0.1, "ceiling": 1.0, "update_interval": 2, "stabilize_interval": 20,
        "zero_out_interval": 2, "lw_opp": 1000.0}


@pytest.mark.parametrize("method", ["greg", "tpp"])
def test_regularization_phase_ends_when_done_then_removal(tmp_path, method):
    # GReg: 11 updates (it = 0, 2, ..., 20) until reg > 1, stabilize 20: iterations 0..40;
    # TPP: reg = 0.1 * it / 2 reaches 1 at it = 20, stabilize 20: also 0..40 -> 41 iterations
    s, d = _run(tmp_path, method, prune__method=method, prune__epochs=5, prune__lr_schedule="0:0.02",
                prune__reg=dict(_REG, mag_ratio_limit=None))
    rows = [r for r in _rows(d) if r["stage"] == "prune"]
    assert [r["epoch"] for r in rows] == [0, 1]  # 41 iterations: the phase stops in epoch 1 of 5
    assert rows[-1]["iterations"] == 41 and rows[-1]["reg"] == pytest.approx(1.1 if method == "greg" else 1.0)
    assert s["setup"]["prune_epochs"] == pytest.approx(41 / _ITERS)
    assert s["setup"]["total_epochs"] == pytest.approx(2 + 41 / _ITERS + 2)
    assert s["setup"]["prune_lr_schedule"] == "0:0.02"
    plan = prune.Plan.from_json((d / "plan.json").read_text())
    dense_end = torch.load(d / "checkpoints" / "prune-0001.pt", weights_only=True)["state_dict"]
    base = torch.load(d / "checkpoints" / "base.pt", weights_only=True)["state_dict"]
    for g in plan.groups:
        bn = next(m.split(":")[0] for m in g.members if m.endswith(":out") and m.split(":")[0] != g.root)
        pruned = plan.pruned(g)
        if method == "tpp":  # TPP zeroes the pruned filters and their BN layer by layer
            assert (dense_end[g.root + ".weight"][pruned] == 0).all()
            assert (dense_end[bn + ".weight"][pruned] == 0).all() and (dense_end[bn + ".bias"][pruned] == 0).all()
        else:  # GReg (authors' default) shrinks the filter weights and leaves the BN alone
            w0, w1 = base[g.root + ".weight"].flatten(1), dense_end[g.root + ".weight"].flatten(1)
            shrink_pruned = (w1[pruned].norm(dim=1) / w0[pruned].norm(dim=1)).mean()
            shrink_kept = (w1[g.keep].norm(dim=1) / w0[g.keep].norm(dim=1)).mean()
            assert shrink_pruned < 0.8 * shrink_kept, (g.root, float(shrink_pruned), float(shrink_kept))
            assert (dense_end[bn + ".weight"][pruned] != 0).all()
    assert s["final"]["top1"] > 0.5


def test_regularization_phase_too_short_is_refused(tmp_path, capsys):
    import subprocess
    import sys

    out = tmp_path / "short"
    r = subprocess.run([sys.executable, "-m", "distributed_prune", "run", str(ROOT / "configs" / "debug_cpu.yaml"),
                        "prune.method=tpp", "prune.epochs=1", f"output.dir={out}", "prune.reg.granularity=0.1",
                        "prune.reg.update_interval=2", "prune.reg.stabilize_interval=20",
                        "prune.reg.zero_out_interval=2"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and not out.exists()
    assert "Traceback" not in r.stderr
    assert "prune.epochs=1 gives 22 iterations (22 per epoch) but tpp needs 41" in r.stderr
    assert "prune.epochs >= 2" in r.stderr


def test_regularization_phase_resumes_exactly(tmp_path):
    import subprocess
    import sys

    args = [sys.executable, "-m", "distributed_prune", "run", str(ROOT / "configs" / "debug_cpu.yaml"),
            "prune.method=greg", "prune.epochs=3", "pretrain.epochs=1", "retrain.epochs=1",
            "prune.reg.granularity=0.05", "prune.reg.update_interval=1", "prune.reg.stabilize_interval=10",
            "trainability.jsv=false"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    a = subprocess.run(args + [f"output.dir={tmp_path / 'a'}"], capture_output=True, text=True, env=env)
    assert a.returncode == 0, a.stderr[-2000:]
    k = subprocess.run(args + [f"output.dir={tmp_path / 'b'}"], capture_output=True, text=True,
                       env={**env, "DPRUNE_FAULT": "prune:0"})
    assert k.returncode != 0
    b = subprocess.run(args + [f"output.dir={tmp_path / 'b'}"], capture_output=True, text=True, env=env)
    assert b.returncode == 0 and "resuming" in b.stdout, b.stderr[-2000:]
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("time_s", "images_per_s")} for r in rows]  # noqa: E731
    assert strip(_rows(tmp_path / "a")) == strip(_rows(tmp_path / "b"))
    sa, sb = (json.loads((tmp_path / x / "summary.json").read_text()) for x in "ab")
    assert sa["final"] == sb["final"] and sa["setup"] == sb["setup"]


@pytest.mark.parametrize("method", ["l2", "random", "bn_scale", "taylor"])
def test_one_shot_criteria(tmp_path, method):
    s, d = _run(tmp_path, method, prune__method=method)
    assert s["setup"]["prune_method"] == method and s["pruned"]["speedup"] > 1.5
    assert s["final"]["top1"] > 0.5


def test_orthp_and_scratch_budgets(tmp_path):
    s0, d0 = _run(tmp_path, "none", prune__reinit="none", name="L1")
    s1, d1 = _run(tmp_path, "orthp", prune__reinit="orthp")
    assert s1["pruned"]["jsv_mean"] != pytest.approx(s0["pruned"]["jsv_mean"])
    # Scratch-B: K1 = 2 pretrain epochs; exactly 2 * speedup + 2 epochs (the last one cut short),
    # the 0:0.01,1:0.001 schedule stretched by that / 2; only its own training counts
    s2, d2 = _run(tmp_path, "scratchB", prune__reinit="scratch", retrain__scratch_budget="B", name="Scratch-B")
    want = 2 * s2["pruned"]["speedup"] + 2
    rows = [r for r in _rows(d2) if r["stage"] == "retrain"]
    assert s2["setup"]["retrain_epochs"] == pytest.approx(want) and len(rows) == math.ceil(want)
    f = want / 2
    assert s2["setup"]["retrain_lr_schedule"] == f"0:0.01,{round(f)}:0.001"
    assert [r["lr"] for r in rows] == [0.01 if e < round(f) else 0.001 for e in range(len(rows))]
    assert s2["setup"]["pretrain_epochs"] == 0 and s2["setup"]["total_epochs"] == pytest.approx(want)
    # ... and so it passes SX-B (and SX-A fails) against the L1 run it derives from
    r = check(load_runs([d0, d2]))
    assert "SX-B" in r.extra and "SX-A" not in r.extra, r
    s3, d3 = _run(tmp_path, "scratchE", prune__reinit="scratch", retrain__scratch_budget="E", name="Scratch-E")
    assert s3["setup"]["retrain_epochs"] == 4 and s3["setup"]["retrain_lr_schedule"] == "0:0.01,2:0.001"
    assert "SX-A" in check(load_runs([d0, d3])).extra
    # K1 from a loaded base: recorded in base.pt by the run that trained it (2 epochs here) ...
    base = d0 / "checkpoints" / "base.pt"
    s4, _ = _run(tmp_path, "scratchE_loaded", pretrain__checkpoint=str(base), prune__reinit="scratch",
                 retrain__scratch_budget="E")
    assert s4["setup"]["retrain_epochs"] == 4
    # ... or given in the config; a plain weights file without it is refused before the run
    plain = tmp_path / "plain.pt"
    torch.save(torch.load(base, weights_only=True)["state_dict"], plain)
    s5, _ = _run(tmp_path, "scratchE_given", pretrain__checkpoint=str(plain), pretrain__base_epochs=7,
                 prune__reinit="scratch", retrain__scratch_budget="E")
    assert s5["setup"]["retrain_epochs"] == 9
    with pytest.raises(UserError, match="pretrain.base_epochs"):
        _run(tmp_path, "scratchE_unknown", pretrain__checkpoint=str(plain), prune__reinit="scratch",
             retrain__scratch_budget="E")
    assert not (tmp_path / "scratchE_unknown").exists()
    # L1 on a loaded base counts the base's epochs as its pretraining (SX-A / SX-B totals)
    s6, _ = _run(tmp_path, "l1_loaded", pretrain__checkpoint=str(base))
    assert s6["setup"]["pretrain_epochs"] == 2 and s6["setup"]["total_epochs"] == 4


def test_pxfy_one_overall_schedule(tmp_path):
    s, d = _run(tmp_path, "pxfy", pxfy={"total_epochs": 4, "prune_at": 2, "lr_schedule": "0:0.05,1:0.02,3:0.002"})
    rows = _rows(d)
    assert [r["lr"] for r in rows if r["stage"] == "pretrain"] == [0.05, 0.02]
    assert [r["lr"] for r in rows if r["stage"] == "retrain"] == [0.02, 0.002]
    assert s["setup"]["retrain_lr_schedule"] == "0:0.02,1:0.002" and s["setup"]["total_epochs"] == 4


def test_pxfy_cosine_anneals_over_the_whole_run(tmp_path):
    s, d = _run(tmp_path, "pxfy_cos", pxfy={"total_epochs": 4, "prune_at": 2, "lr_schedule": "cosine:0.1:0"})
    rows = _rows(d)
    lrs = [r["lr"] for r in rows if r["stage"] in ("pretrain", "retrain")]  # LR at each epoch start
    assert lrs == pytest.approx([0.05 * (1 + math.cos(math.pi * e / 4)) for e in range(4)])
    assert s["setup"]["pretrain_lr_schedule"] == "over:4+cosine:0.1:0"


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
