"""`prune.method=gradual|soft` end to end on digits: the shipped configs, the run directory
contract of a one-shot run, the final cut equal to the masked model, and an exact resume from
the middle of the phase."""
import json
from pathlib import Path

import pytest
import torch

from distributed_prune import config, pipeline, prune

ROOT = Path(__file__).resolve().parents[2]


def _cfg(name, tmp_path, run, **over):
    d = config.yaml_load((ROOT / "configs" / f"{name}_digits.yaml").read_text())
    d["pretrain"].update(epochs=2, lr_schedule="0:0.05")
    d["trainability"]["samples"] = 8
    for k, v in over.items():
        config._set(d, k.replace("__", "."), v)
    d["output"]["dir"] = str(tmp_path / run)
    return config.from_dict(d)


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["gradual", "soft"])
def test_masked_phase_run(tmp_path, kind):
    s = pipeline.run(_cfg(kind, tmp_path, kind))
    d = tmp_path / kind
    assert s["status"] == "complete" and s["setup"]["prune_method"] == kind
    assert s["setup"]["prune_epochs"] == 3
    assert [r["epoch"] for r in _rows(d) if r["stage"] == "prune"] == [0, 1, 2]
    plan = prune.Plan.from_json((d / "plan.json").read_text())
    assert s["plan_sha256"] == plan.sha256() and s["pruned"]["speedup"] > 1.2
    for g in plan.groups:                              # the ratio was reached on every layer
        assert g.n - len(g.keep) == prune.n_pruned(g.ratio, g.n, None)
    # the phase's last checkpoint holds the masked dense model: its pruned channels are zero
    # in every member (what makes the physical cut equal to the masked model)
    last = torch.load(d / "checkpoints" / "prune-0002.pt", weights_only=True)
    masked = json.loads(last["masked"])
    assert masked["kind"] == kind and masked["updates"] >= 1
    for row in _rows(d):
        if row["stage"] == "prune":
            assert row["masked_channels"] > 0
            assert row["mask_sparsity"] == row["masked_channels"] / sum(g.n for g in plan.groups)
    # it learned (10 classes: chance is 0.1).  Soft pruning loses more at the cut on this tiny
    # CNN: the zeroed filters' BatchNorm shifts (still trained) are removed with them
    assert s["final"]["top1"] > (0.9 if kind == "gradual" else 0.25)
    assert s["final"]["top1"] > s["pruned"]["top1"]


def _cli(out, name, *over, **env):
    import os
    import subprocess
    import sys
    e = dict(os.environ, CI="true", OMP_NUM_THREADS="1", **env)
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), e.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "distributed_prune", "run",
                           str(ROOT / "configs" / f"{name}_digits.yaml"), f"output.dir={out}",
                           "pretrain.epochs=2", "pretrain.lr_schedule=0:0.05",
                           "trainability.samples=8", "train.device=cpu", *over],
                          capture_output=True, text=True, timeout=600, cwd=out.parent, env=e)


@pytest.mark.parametrize("kind", ["gradual", "soft"])
def test_resume_in_the_middle_of_the_phase_gives_the_same_result(tmp_path, kind):
    """gradual runs compact (the cut model is rebuilt from the checkpoint's full model and
    full-shaped optimizer state), soft runs masked."""
    ref, out = tmp_path / "ref", tmp_path / "killed"
    ex = f"prune.masked.execution={'compact' if kind == 'gradual' else 'masked'}"
    r = _cli(ref, kind, ex)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _cli(out, kind, ex, DPRUNE_FAULT="prune:1")    # SIGKILL after the phase's 2nd epoch
    assert r.returncode != 0 and (out / ".fault-injected").exists()
    r = _cli(out, kind, ex)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stdout and "prune-0001.pt" in r.stdout
    a, b = _rows(ref), _rows(out)
    assert [(x["stage"], x["epoch"]) for x in a] == [(x["stage"], x["epoch"]) for x in b]
    for x, y in zip(a, b):
        assert x["train_loss"] == y["train_loss"] and x["top1"] == y["top1"], (x, y)
    assert (ref / "plan.json").read_text() == (out / "plan.json").read_text()
    wa = torch.load(ref / "checkpoints" / "final.pt", weights_only=True)["state_dict"]
    wb = torch.load(out / "checkpoints" / "final.pt", weights_only=True)["state_dict"]
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_compact_execution_equals_masked_execution(tmp_path):
    """prune.masked.execution=compact (the gradual default: the cut model of the current masks
    is trained, folded back and re-cut at every update) ends where masked execution (the full
    model with masks) ends: the same masks at every update, the same plan, the same weights up
    to float rounding at the cut, and the same accuracy."""
    runs = {}
    for ex in ("masked", "compact"):
        s = pipeline.run(_cfg("gradual", tmp_path, ex, prune__masked__execution=ex,
                              trainability__jsv=False))
        d = tmp_path / ex
        last = torch.load(d / "checkpoints" / "prune-0002.pt", weights_only=True)
        runs[ex] = (s, d, json.loads(last["masked"]), last)
    (sm, dm, hm, lm), (sc, dc, hc, lc) = runs["masked"], runs["compact"]
    assert hc["updates"] > 3 and hc["history"] == hm["history"]     # hashes at every update
    assert sc["plan_sha256"] == sm["plan_sha256"]
    assert (dc / "plan.json").read_text() == (dm / "plan.json").read_text()
    # the checkpoint contract: the full model and the full-shaped optimizer state
    assert lc["state_dict"].keys() == lm["state_dict"].keys()
    for k, v in lm["state_dict"].items():
        assert lc["state_dict"][k].shape == v.shape, k
    om, oc = lm["engine"]["optimizer"]["state"], lc["engine"]["optimizer"]["state"]
    assert om.keys() == oc.keys()
    for i in om:
        assert om[i]["momentum_buffer"].shape == oc[i]["momentum_buffer"].shape
    # the cut at the end of the phase: the same weights up to rounding
    pm = torch.load(dm / "checkpoints" / "pruned.pt", weights_only=True)["state_dict"]
    pc = torch.load(dc / "checkpoints" / "pruned.pt", weights_only=True)["state_dict"]
    assert pm.keys() == pc.keys()
    for k in pm:
        torch.testing.assert_close(pc[k], pm[k], rtol=1e-5, atol=1e-5, msg=k)
    for a, b in zip(_rows(dm), _rows(dc)):
        assert (a["stage"], a["epoch"]) == (b["stage"], b["epoch"])
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert abs(a["top1"] - b["top1"]) <= 0.005                # at most 2 of 450 images
    assert abs(sc["final"]["top1"] - sm["final"]["top1"]) <= 0.005
