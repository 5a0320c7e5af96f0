"""`dprune bench gpu`: the step runner (isolation, time limits, skips), the verdicts, the kernel
check's bound, bad arguments, and the whole command end to end on CPU with tiny shapes
(`--cpu --size tiny`), so that the command cannot rot between GPU runs. Timings are never
checked (2 shared cores)."""
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from distributed_prune.bench import gpu, gpu_steps
from distributed_prune.cli import main

ROOT = Path(__file__).resolve().parents[2]

FAKE_STEPS = '''
import time
from distributed_prune.bench.gpu_child import Skipped

def ok(settings):
    return {"figures": [{"name": "answer", "value": 42.0, "unit": "", "target": 40.0, "op": ">=",
                         "met": True, "note": ""}], "table": "| a |\\n|---|\\n| 1 |", "limit": settings["limit_s"]}

def boom(settings):
    raise ValueError("deliberate failure")

def hang(settings):
    time.sleep(600)

def skip(settings):
    raise Skipped("needs something this machine lacks")

def needs(settings):
    import a_module_this_machine_lacks_xyz  # noqa: F401
'''


def test_runner_reports_failures_hangs_and_skips_and_carries_on(tmp_path, monkeypatch):
    (tmp_path / "fake_steps.py").write_text(FAKE_STEPS)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    steps = [gpu.Step("ok", "fine", "fake_steps:ok", 4.0), gpu.Step("boom", "raises", "fake_steps:boom", 4.0),
             gpu.Step("hang", "never ends", "fake_steps:hang", 1.0), gpu.Step("skip", "skips", "fake_steps:skip", 4.0),
             gpu.Step("needs", "a missing dependency", "fake_steps:needs", 4.0)]
    out = tmp_path / "out"
    out.mkdir()
    t0 = time.monotonic()
    res = gpu.run_steps(steps, out=out, budget=120, settings={"device": "cpu", "size": "tiny", "out": str(out)},
                        floor=0)
    assert time.monotonic() - t0 < 120
    assert [r["step"] for r in res] == ["ok", "boom", "hang", "skip", "needs"]  # order kept, none dropped
    assert [r["status"] for r in res] == ["ok", "failed", "timeout", "skipped", "skipped"]
    assert "ValueError: deliberate failure" in res[1]["why"] and "deliberate failure" in res[1]["log_tail"]
    # the hang is killed at its share of what was left (weight 1 of the remaining 9), not at the budget
    assert res[2]["limit_s"] <= 120 / 9 + 0.5 and res[2]["wall_s"] <= res[2]["limit_s"] + 5
    assert res[3]["why"] == "needs something this machine lacks"
    assert "'a_module_this_machine_lacks_xyz', which is not installed" in res[4]["why"]
    for r in res:
        saved = json.loads((out / f"{r['step']}.json").read_text())
        assert saved["status"] == r["status"] and saved["header"]["commit"] and saved["header"]["date"]
        assert (out / f"{r['step']}.md").read_text().startswith(f"# {r['step']}: ")
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in (out / "ok.md").read_text().splitlines()
            if ln.startswith("|")]
    assert ["answer", "42", ">= 40", "MET"] in rows
    assert not list(out.glob(".*.result.json"))                                 # no leftovers


def test_figure_verdicts():
    assert gpu_steps.figure("x", 3100.0, target=3000.0)["met"] is True
    assert gpu_steps.figure("x", 2900.0, target=3000.0)["met"] is False
    assert gpu_steps.figure("m", 0.75, target=0.7, op="<=")["met"] is False
    cpu = gpu_steps.figure("x", 10.0, target=3000.0, gpu=False)
    assert cpu["met"] is None and gpu.verdict(cpu) == "n/a" and cpu["note"] == "CPU run"
    assert gpu_steps.figure("ok", True, target=True, op="==")["met"] is True
    assert gpu_steps.figure("n", 15, target=16, op="==")["met"] is False
    assert gpu.verdict(gpu_steps.figure("x", 1.0)) == ""                        # no target: no verdict


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="needs the Triton interpreter")
def test_kernel_check_bound_accepts_the_kernel_and_catches_an_error(monkeypatch):
    """The correctness step's bound: the Triton kernel passes it, a kernel off by 0.1% fails it."""
    from distributed_prune.kernels import dispatch

    dev = torch.device("cpu")
    case = gpu_steps.SMALL_CASES["stride2_3x3"]
    assert gpu_steps._check_case("triton", case, "fp32", dev, False) <= 1.0
    assert gpu_steps._check_case("triton", case, "bf16", dev, True) <= 1.0
    real = dispatch.masked_conv2d
    monkeypatch.setattr(dispatch, "masked_conv2d", lambda *a, **k: real(*a, **k) * 1.001)
    assert gpu_steps._check_case("triton", case, "fp32", dev, False) > 1.0


@pytest.mark.parametrize("argv,needle", [
    (["--cpu", "--budget", "0"], "--budget: must be > 0"),
    (["--cpu", "--only", "env,warp"], "--only: unknown step warp"),
    (["--cpu", "--size", "huge"], "invalid choice"),
])
def test_bad_arguments_are_one_line_and_write_nothing(tmp_path, capsys, argv, needle):
    out = tmp_path / "out"
    assert main(["bench", "gpu", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_without_a_gpu_it_says_so(tmp_path, capsys):
    assert main(["bench", "gpu", "--out", str(tmp_path / "out")]) == 2
    assert "no CUDA device" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_cpu_tiny_end_to_end(tmp_path):
    """Every step of the real command on tiny shapes: each ends ok (or skipped, naming why),
    writes its JSON and markdown with device, date and commit, and the summary compares figures
    with their targets."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "distributed_prune", "bench", "gpu", "--cpu", "--size", "tiny",
                        "--budget", "900", "--out", str(out)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    names = [s.name for s in gpu.STEPS]
    assert [s["step"] for s in summary["steps"]] == names
    for name in names:
        res = json.loads((out / f"{name}.json").read_text())
        assert res["status"] in ("ok", "skipped"), (name, res.get("why"), res.get("log_tail"))
        assert res["status"] == "ok" or res["why"]
        assert res["header"]["device"] == "cpu" and res["header"]["commit"] and res["header"]["date"]
        assert (out / f"{name}.md").is_file() and name in r.stdout
    env_res = json.loads((out / "env.json").read_text())["env"]
    assert env_res["auto_backend"]["filter_norms"] == "triton"          # the interpreter counts as usable
    corr = json.loads((out / "correctness.json").read_text())
    checked = [c for c in corr["masked_conv"] if "ok" in c]
    assert checked and all(c["ok"] for c in checked), checked
    assert all(f["value"] == f["target"] for f in corr["figures"]) and corr["figures"][0]["target"] == len(checked)
    train = json.loads((out / "train.json").read_text())
    assert set(train["img_s"]) == {"dense", "pruned", "pruned_r8"}
    assert all(f["met"] is None for f in train["figures"])                # CPU: no verdict on GPU targets
    ddp = json.loads((out / "ddp.json").read_text())
    assert ddp["backend"] == "gloo" and ddp["static_graph"] is True
    assert ddp["figures"][0]["met"] and ddp["figures"][1]["met"]           # wrapped; same step as plain
    syncs = json.loads((out / "syncs.json").read_text())["syncs"]
    assert set(syncs) == {"plain", "greg", "tpp", "masked"}                 # every kind of step ran
    masked = json.loads((out / "masked.json").read_text())
    assert all("reference" in m["step_ms"] for m in masked["masked"].values())
    assert "| step" in (out / "summary.md").read_text()


def test_missing_dependency_skips_the_step_by_name(tmp_path):
    """On a node without torch-pruning or FFCV (the lent GPU image), the steps that need them say
    skipped and why; the environment step still runs."""
    code = textwrap.dedent(f"""
        import json, sys
        sys.modules["torch_pruning"] = None   # import fails as if not installed
        sys.modules["ffcv"] = None
        from distributed_prune.bench import gpu_child
        for step in ("step_train", "step_ffcv", "step_env"):
            out = {str(tmp_path)!r} + "/" + step + ".json"
            gpu_child.main(["distributed_prune.bench.gpu_steps:" + step, out,
                            json.dumps({{"device": "cpu", "size": "tiny", "out": {str(tmp_path)!r}, "limit_s": 60}})])
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    train = json.loads((tmp_path / "step_train.json").read_text())
    assert train["status"] == "skipped" and "'torch_pruning', which is not installed" in train["why"]
    ffcv = json.loads((tmp_path / "step_ffcv.json").read_text())
    assert ffcv["status"] == "skipped" and "FFCV" in ffcv["why"]
    assert json.loads((tmp_path / "step_env.json").read_text())["status"] == "ok"
