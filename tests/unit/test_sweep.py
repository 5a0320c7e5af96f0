"""Sweep expansion, run names and launcher scripts (no run is trained here)."""
import argparse
import json
import shlex
import subprocess
import sys
import types

import pytest

from distributed_prune import cli
from distributed_prune.errors import UserError
from distributed_prune.sweep import cli_sweep, expand, run_name

R3, R7 = "[0,0.3,0.3,0.3,0]", "[0,0.7,0.7,0.7,0]"


def test_expand_brackets_and_seeds():
    runs = expand([f"prune.ratios={R3},{R7}", "prune.method=l1,random"], seeds=2)
    assert len(runs) == 8
    assert runs[0] == {"prune.ratios": R3, "prune.method": "l1", "seed": "0"}
    assert runs[1]["seed"] == "1" and runs[-1] == {"prune.ratios": R7, "prune.method": "random", "seed": "1"}


def test_expand_pipe_separator_keeps_schedules_whole():
    runs = expand(["retrain.lr_schedule=0:0.01,60:0.001|0:0.001,80:0.0001", "prune.ratios=*conv1:0.9"], 1)
    assert [r["retrain.lr_schedule"] for r in runs] == ["0:0.01,60:0.001", "0:0.001,80:0.0001"]
    assert runs[0]["prune.ratios"] == "*conv1:0.9"


def test_expand_seed_grid_and_errors():
    assert [r["seed"] for r in expand(["seed=3,7"], 1)] == ["3", "7"]
    for bad, word in (("prune.ratios", "prune.ratios"), ("=1,2", "=1,2"), ("a=1,,2", "a"),
                      ("a=[0,1", "unbalanced"), ("a=1,1", "repeated")):
        with pytest.raises(UserError, match=word.replace("[", r"\[")):
            expand([bad], 1)
    with pytest.raises(UserError, match="twice"):
        expand(["a=1", "a=2"], 1)
    with pytest.raises(UserError):
        expand(["seed=1,2"], 3)
    with pytest.raises(UserError):
        expand([], 0)


def test_run_names_stable_unique_safe():
    runs = expand([f"prune.ratios={R3},{R7},[0,0.3,0.3,0.3,0.0]",
                   "retrain.lr_schedule=0:0.01,60:0.001|0:0.01,60:1e-3"], seeds=3)
    names = [run_name(r) for r in runs]
    assert len(set(names)) == len(names)
    assert names == [run_name(dict(reversed(list(r.items())))) for r in runs]  # order-independent
    for n in names:
        assert len(n) < 140 and "/" not in n and all(c.isalnum() or c in "._+-" for c in n)
    assert names[0].startswith("ratios-0_0.3_0.3_0.3_0_lr_schedule-0_0.01_60_0.001_seed-0-")


def _args(tmp_path, launcher, **kw):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("seed: 0\n")
    ns = dict(config=str(cfg), grid=[f"prune.ratios={R3},{R7}"], seeds=2, launcher=launcher,
              out=str(tmp_path / "sweep"), nproc=4, overrides=["retrain.epochs=3"])
    ns.update(kw)
    return argparse.Namespace(**ns)


def test_local_runs_and_skips_complete(tmp_path, monkeypatch, capsys):
    calls = []
    fake = types.ModuleType("distributed_prune.pipeline")
    fake.run_from_cli = lambda config, overrides: calls.append((config, overrides)) or 0
    monkeypatch.setitem(sys.modules, "distributed_prune.pipeline", fake)
    args = _args(tmp_path, "local")
    first = run_name({"prune.ratios": R3, "seed": "0"})
    done = tmp_path / "sweep" / first
    done.mkdir(parents=True)
    (done / "summary.json").write_text(json.dumps({"status": "complete"}))
    running = tmp_path / "sweep" / run_name({"prune.ratios": R3, "seed": "1"})
    running.mkdir()
    (running / "summary.json").write_text(json.dumps({"status": "running"}))
    assert cli_sweep(args) == 0
    assert len(calls) == 3 and all(c[0] == args.config for c in calls)
    cfg, ov = calls[0]
    assert ov == ["retrain.epochs=3", f"prune.ratios={R3}", "seed=1", f"output.dir={running}"]
    assert f"{first}: complete, skipped" in capsys.readouterr().out
    lines = (tmp_path / "sweep" / "runs.txt").read_text().splitlines()
    assert len(lines) == 4 and shlex.split(lines[1]) == ov


def test_local_reports_failures(tmp_path, monkeypatch):
    fake = types.ModuleType("distributed_prune.pipeline")
    fake.run_from_cli = lambda config, overrides: 2
    monkeypatch.setitem(sys.modules, "distributed_prune.pipeline", fake)
    assert cli_sweep(_args(tmp_path, "local", seeds=1)) == 1


def test_torchrun_commands(tmp_path):
    assert cli_sweep(_args(tmp_path, "torchrun")) == 0
    script = tmp_path / "sweep" / "commands.sh"
    cmds = [ln for ln in script.read_text().splitlines() if ln.startswith("torchrun")]
    assert len(cmds) == 4
    argv = shlex.split(cmds[0])
    assert argv[:7] == ["torchrun", "--nproc_per_node", "4", "-m", "distributed_prune", "run",
                        str(tmp_path / "cfg.yaml")]
    assert f"prune.ratios={R3}" in argv and "seed=0" in argv and "retrain.epochs=3" in argv
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_slurm_array(tmp_path):
    assert cli_sweep(_args(tmp_path, "slurm", seeds=3)) == 0
    text = (tmp_path / "sweep" / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-5" in text and "#SBATCH --gpus-per-node=4" in text
    assert "runs.txt" in text and "srun torchrun" in text and "-m distributed_prune run" in text
    assert len((tmp_path / "sweep" / "runs.txt").read_text().splitlines()) == 6
    assert subprocess.run(["bash", "-n", str(tmp_path / "sweep" / "sweep.sbatch")]).returncode == 0


def test_bad_input_via_cli(tmp_path, capsys):
    args = _args(tmp_path, "torchrun")
    assert cli.main(["sweep", args.config, "--grid", "prune.ratios", "--out", args.out]) == 2
    assert "prune.ratios" in capsys.readouterr().err
    assert cli.main(["sweep", str(tmp_path / "nope.yaml"), "--grid", "a=1"]) == 2
    with pytest.raises(UserError, match="output.dir"):
        cli_sweep(_args(tmp_path, "torchrun", overrides=["output.dir=x"]))
    with pytest.raises(UserError, match="grid key"):
        cli_sweep(_args(tmp_path, "torchrun", overrides=[f"prune.ratios={R3}"]))


def test_every_point_validated_before_the_first_starts(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("distributed_prune.pipeline")
    fake.run_from_cli = lambda config, overrides: calls.append(overrides) or 0
    monkeypatch.setitem(sys.modules, "distributed_prune.pipeline", fake)
    args = _args(tmp_path, "local", seeds=1, grid=["retrain.momentum=0.9,0.5,.nan"])
    with pytest.raises(UserError, match=r"sweep run 3/3 .*retrain\.momentum.*finite"):
        cli_sweep(args)
    assert calls == [] and not (tmp_path / "sweep").exists()
    # the same grid without the bad value runs every point
    assert cli_sweep(_args(tmp_path, "local", seeds=1, grid=["retrain.momentum=0.9,0.5"])) == 0
    assert len(calls) == 2


def test_grid_size_counted_before_expanding():
    with pytest.raises(UserError, match="at most"):
        expand(["a=" + ",".join(map(str, range(200))), "b=" + ",".join(map(str, range(200)))], 1)
    with pytest.raises(UserError, match="--seeds"):
        expand([], 10**9)
    assert len(expand(["a=" + ",".join(map(str, range(100)))], 100)) == 10_000


def test_deepspeed_missing_refused_only_for_local_runs(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # find_spec answers None: "not installed"
    args = _args(tmp_path, "local", seeds=1, overrides=["dist.engine=deepspeed"])
    with pytest.raises(UserError, match="pip install deepspeed"):
        cli_sweep(args)
    assert not (tmp_path / "sweep").exists()
    # torchrun / slurm scripts run elsewhere: written even where DeepSpeed is missing
    assert cli_sweep(_args(tmp_path, "torchrun", seeds=1, overrides=["dist.engine=deepspeed"])) == 0
