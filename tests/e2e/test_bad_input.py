"""Bad input to every command ends in one line on stderr naming the problem, exit status 2, no
traceback, and nothing created or changed on disk.

Each case runs in a fresh working directory holding the input files below; the whole tree
(file names, sizes, modification times) is compared before and after, so a case that writes
anything, anywhere under it (an output directory, a temp file, a run in the current
directory), fails. Most cases run in-process through ``cli.main``; a few run as real processes
to show the process behaves the same.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distributed_prune import cli

CONFIG = """\
seed: 0
output:
  dir: out/run
model:
  name: vgg_tiny
data:
  name: digits
  batch_size: 64
pretrain:
  epochs: 1
  lr_schedule: "0:0.05"
prune:
  ratios: "[1-3:0.5]"
retrain:
  epochs: 1
  lr_schedule: "0:0.01"
train:
  progress: false
trainability:
  jsv: false
"""


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """Anchors nested ``levels`` deep, each level ``width`` aliases of the one before:
    a few hundred bytes that stand for width**levels values."""
    lines = ["l0: &l0 [" + ", ".join(['"x"'] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


FILES = {
    "cfg.yaml": CONFIG,
    "binary.yaml": b"\x1f\x8b\x08\x00" + bytes(range(256)),
    "nul.yaml": b"seed: 1\x00\n",
    "latin1.yaml": "name: caf\xe9\n".encode("latin-1"),
    "bomb.yaml": alias_bomb(),
    "recursive.yaml": "a: &a [1, *a]\n",
    "dup.yaml": "seed: 1\nseed: 2\n",
    "dup_nested.yaml": "model:\n  name: vgg_tiny\n  name: lenet5\n",
    "syntax.yaml": "seed: [1\n",
    "list.yaml": "- 1\n- 2\n",
    "deepspeed.yaml": CONFIG + "dist:\n  engine: deepspeed\n",
    "afile": "not a directory\n",
    "adir/keep": "",
    "runs/no_summary/metrics.jsonl": "",
    "runs/bad_section/summary.json": json.dumps({"status": "complete", "pruned": [1, 2]}),
    "runs/not_json/summary.json": '{"status": "complete"',
}


def make_inputs(root: Path) -> None:
    for name, content in FILES.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)


def snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            st = p.lstat()
            out[str(p.relative_to(root))] = (p.is_dir(), st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    make_inputs(work)
    monkeypatch.chdir(work)
    return work


def _case(argv, *needles, hide_deepspeed=False, id=None):
    return pytest.param(argv, needles, hide_deepspeed, id=id)


RATIOS = ["--ratios", "[0,0.5,0.5,0.5,0]"]
CASES = [
    # ---- dprune run: the config file
    _case(["run", "binary.yaml"], "binary.yaml", "not UTF-8", id="run-binary-config"),
    _case(["run", "nul.yaml"], "nul.yaml", "not a text file", id="run-nul-byte-config"),
    _case(["run", "latin1.yaml"], "latin1.yaml", "not UTF-8", id="run-latin1-config"),
    _case(["run", "bomb.yaml"], "bomb.yaml", "line", "aliases expand", id="run-alias-bomb"),
    _case(["run", "recursive.yaml"], "recursive.yaml", "alias *a", id="run-recursive-alias"),
    _case(["run", "dup.yaml"], "dup.yaml, line 2", "duplicate key 'seed'", "line 1", id="run-duplicate-key"),
    _case(["run", "dup_nested.yaml"], "dup_nested.yaml, line 3", "duplicate key 'name'", id="run-duplicate-nested-key"),
    _case(["run", "syntax.yaml"], "syntax.yaml", "invalid YAML", id="run-yaml-syntax"),
    _case(["run", "list.yaml"], "list.yaml", "mapping", id="run-config-is-a-list"),
    _case(["run", "missing.yaml"], "missing.yaml", "not found", id="run-config-missing"),
    _case(["run", "adir"], "adir", "directory", id="run-config-is-a-directory"),
    # ---- dprune run: values that must be finite
    _case(["run", "cfg.yaml", "pretrain.momentum=.nan"], "pretrain.momentum", "finite", id="run-momentum-nan"),
    _case(["run", "cfg.yaml", "retrain.weight_decay=.inf"], "retrain.weight_decay", "finite", id="run-weight-decay-inf"),
    _case(["run", "cfg.yaml", "retrain.lr_schedule=0:.inf"], "retrain.lr_schedule", id="run-lr-schedule-inf"),
    _case(["run", "cfg.yaml", "prune.lr_schedule=0:nan"], "prune.lr_schedule", "finite", id="run-reg-lr-nan"),
    _case(["run", "cfg.yaml", "prune.ratios=[0,.nan,0.5]"], "prune.ratios.1", "finite", id="run-ratio-list-nan"),
    _case(["run", "cfg.yaml", "prune.reg.granularity=.inf"], "prune.reg.granularity", id="run-reg-granularity-inf"),
    _case(["run", "cfg.yaml", "retrain.label_smoothing=.nan"], "retrain.label_smoothing", id="run-label-smoothing-nan"),
    _case(["run", "cfg.yaml", "model.kwargs={in_channels: .inf}"], "model.kwargs.in_channels", id="run-kwargs-inf"),
    # ---- dprune run: other values
    _case(["run", "cfg.yaml", f"seed={2**70}"], "seed", str(2**32 - 1), id="run-seed-beyond-64-bits"),
    _case(["run", "cfg.yaml", "seed=-1"], "seed", id="run-seed-negative"),
    _case(["run", "cfg.yaml", "model.kwargs={foo: 1}"], "model.kwargs", "'foo'", "vgg_tiny", id="run-kwargs-unknown-arg"),
    _case(["run", "cfg.yaml", "model.kwargs={num_classes: 3}"], "model.kwargs", "num_classes", id="run-kwargs-num-classes"),
    _case(["run", "cfg.yaml", "model.num_classes=0"], "model.num_classes", id="run-num-classes-zero"),
    _case(["run", "cfg.yaml", "output.dir=''"], "output.dir", "empty", id="run-output-dir-empty-string"),
    _case(["run", "cfg.yaml", "output.dir="], "output.dir", "empty", id="run-output-dir-no-value"),
    _case(["run", "cfg.yaml", "output.dir=a\0b"], "output.dir", "NUL", id="run-output-dir-nul"),
    _case(["run", "cfg.yaml", "pretrain.checkpoint=base_{rank}.pt"], "pretrain.checkpoint", "{seed}", id="run-checkpoint-placeholder"),
    _case(["run", "cfg.yaml", "pretrain.momentum=-0.5"], "pretrain.momentum", id="run-momentum-negative"),
    _case(["run", "cfg.yaml", "data.input_size=0"], "data.input_size", id="run-input-size-zero"),
    _case(["run", "cfg.yaml", "pxfy.total_epochs=10"], "pxfy.lr_schedule", id="run-pxfy-without-schedule"),
    _case(["run", "cfg.yaml", "prune.foo=1"], "unknown key 'prune.foo'", id="run-unknown-key"),
    _case(["run", "cfg.yaml", "prune.method=soft", "prune.epochs=1", "prune.masked.execution=compact"],
          "prune.masked.execution=compact", "gradual", id="run-compact-soft"),
    _case(["run", "cfg.yaml", "dist.engine=deepspeed"], "DeepSpeed is not installed", "pip install deepspeed",
          hide_deepspeed=True, id="run-deepspeed-not-installed"),
    # ---- dprune run: overrides
    _case(["run", "cfg.yaml", "=3"], "override '=3'", "key", id="run-override-empty-key"),
    _case(["run", "cfg.yaml", "retrain..epochs=3"], "override 'retrain..epochs=3'", id="run-override-bad-key"),
    _case(["run", "cfg.yaml", "seed.x=1"], "seed is not a section", id="run-override-into-scalar"),
    _case(["run", "cfg.yaml", "model.kwargs={a: 1, a: 2}"], "model.kwargs", "duplicate key 'a'", id="run-override-duplicate-key"),
    # ---- dprune plan
    _case(["plan", "--model", "resnet20", *RATIOS, "--num-classes", "0"], "--num-classes", ">= 1", id="plan-num-classes-zero"),
    _case(["plan", "--model", "resnet20", *RATIOS, "--round-to", "0"], "--round-to", ">= 1", id="plan-round-to-zero"),
    _case(["plan", "--model", "resnet20", *RATIOS, "--input-size", "3,99999,99999"], "--input-size", id="plan-input-size-huge"),
    _case(["plan", "--model", "resnet20", *RATIOS, "--num-classes", "x"], "--num-classes", id="plan-num-classes-not-int"),
    _case(["plan", "--model", "resnet20", "--ratios", "[0,1.5,0.5,0.5,0]", "--input-size", "3,32,32"],
          "prune.ratios", "outside [0, 1)", id="plan-ratio-above-one"),
    _case(["plan", "--model", "resnet20", *RATIOS, "--criterion", "foo"], "criterion", "'foo'", id="plan-unknown-criterion"),
    # ---- dprune report
    _case(["report", "runs/missing"], "runs/missing", "not found", id="report-dir-missing"),
    _case(["report", "runs/no_summary"], "runs/no_summary", "summary.json", id="report-no-summary"),
    _case(["report", "runs/not_json"], "runs/not_json/summary.json", "JSON", id="report-summary-not-json"),
    _case(["report", "runs/bad_section"], "'pruned'", "JSON object", id="report-summary-section-type"),
    _case(["report", "runs/bad_section", "--out", "afile/report.md"], "--out", "afile", id="report-out-below-a-file"),
    _case(["report", "runs/bad_section", "--plot", "adir"], "--plot", "adir", id="report-plot-is-a-dir"),
    # ---- dprune sweep
    _case(["sweep", "cfg.yaml", "--grid", "prune.ratios=[1-3:0.5],abc", "--out", "sweep"],
          "sweep run 2/2", "prune.ratios", id="sweep-last-point-invalid"),
    _case(["sweep", "cfg.yaml", "--grid", "pretrain.momentum=0.9,.nan", "--out", "sweep"],
          "pretrain.momentum", "finite", id="sweep-point-nan"),
    _case(["sweep", "cfg.yaml", "--grid", "retrain.epochs=1,2", "--grid", "model.kwargs={width: 2}", "--out", "sweep"],
          "model.kwargs", "'width'", id="sweep-kwargs"),
    _case(["sweep", "cfg.yaml", "--seeds", "0", "--out", "sweep"], "--seeds", id="sweep-seeds-zero"),
    _case(["sweep", "cfg.yaml", "--seeds", "1000000000", "--out", "sweep"], "--seeds", "10000", id="sweep-too-many-runs"),
    _case(["sweep", "cfg.yaml", "--grid", "=1,2", "--out", "sweep"], "--grid", id="sweep-grid-empty-key"),
    _case(["sweep", "cfg.yaml", "=3", "--out", "sweep"], "override '=3'", id="sweep-override-empty-key"),
    _case(["sweep", "cfg.yaml", "--nproc", "0", "--out", "sweep"], "--nproc", id="sweep-nproc-zero"),
    _case(["sweep", "cfg.yaml", "--out", ""], "--out", id="sweep-out-empty"),
    _case(["sweep", "cfg.yaml", "--out", "afile", "--launcher", "torchrun"], "--out", "afile", id="sweep-out-is-a-file"),
    _case(["sweep", "binary.yaml", "--out", "sweep"], "binary.yaml", "not UTF-8", id="sweep-binary-config"),
    _case(["sweep", "deepspeed.yaml", "--out", "sweep"], "pip install deepspeed", hide_deepspeed=True,
          id="sweep-deepspeed-not-installed"),
    # ---- dprune data write-beton
    _case(["data", "write-beton", "--dataset", "digits", "--out", "adir"], "--out", "adir", id="beton-out-is-a-dir"),
    _case(["data", "write-beton", "--dataset", "digits", "--out", ""], "--out", id="beton-out-empty"),
    _case(["data", "write-beton", "--dataset", "digits", "--out", "nodir/x.beton"], "nodir", id="beton-out-dir-missing"),
    _case(["data", "write-beton", "--dataset", "synthetic", "--num-samples", "0", "--out", "s.beton"],
          "--num-samples", id="beton-num-samples-zero"),
    _case(["data", "write-beton", "--dataset", "synthetic", "--image-size", "0x0", "--out", "s.beton"],
          "--image-size", id="beton-image-size-zero"),
    _case(["data", "write-beton", "--dataset", "digits", "--compress-probability", "nan", "--out", "s.beton"],
          "--compress-probability", id="beton-probability-nan"),
    _case(["data", "write-beton", "--dataset", "digits", "--max-resolution", "0", "--out", "s.beton"],
          "--max-resolution", id="beton-max-resolution-zero"),
    _case(["data", "write-beton", "--dataset", "digits", "--jpeg-quality", "500", "--out", "s.beton"],
          "--jpeg-quality", id="beton-jpeg-quality"),
    _case(["data", "write-beton", "--dataset", "synthetic", "--seed", "-1", "--out", "s.beton"], "--seed", id="beton-seed-negative"),
    _case(["data", "write-beton", "--dataset", "nosuch", "--out", "s.beton"], "--dataset", id="beton-unknown-dataset"),
    # ---- dprune bench
    _case(["bench", "speedup", "--model", "resnet20", *RATIOS, "--batch", "0"], "--batch", id="bench-speedup-batch-zero"),
    _case(["bench", "speedup", "--model", "resnet20", *RATIOS, "--seed", str(2**70)], "--seed", id="bench-speedup-seed-huge"),
    _case(["bench", "speedup", "--model", "resnet20", *RATIOS, "--out", "adir"], "--out", id="bench-speedup-out-dir"),
    _case(["bench", "speedup", "--model", "resnet20", *RATIOS, "--out", "afile/x.json"], "--out", "afile",
          id="bench-speedup-out-below-file"),
    _case(["bench", "speedup", "--model", "resnet20", *RATIOS, "--device", "tpu"], "--device", id="bench-speedup-device"),
    _case(["bench", "train", "--model", "resnet20", *RATIOS, "--num-classes", "0"], "--num-classes", id="bench-train-classes"),
    _case(["bench", "train", "--world-size", "2", "--seed", "-3"], "--seed", id="bench-scaling-seed"),
    _case(["bench", "kernels", "--batch", "0"], "--batch", id="bench-kernels-batch-zero"),
    _case(["bench", "kernels", "--backends", "foo"], "--backends", "'foo'", id="bench-kernels-backend"),
    _case(["bench", "kernels", "--sparsities", "1.5"], "--sparsities", id="bench-kernels-sparsity"),
    _case(["bench", "loader", "--epochs", "1"], "--epochs", id="bench-loader-epochs"),
    _case(["bench", "loader", "--ranks", "x"], "--ranks", id="bench-loader-ranks"),
    _case(["bench", "loader", "--bogus"], "--bogus", id="bench-loader-unknown-option"),
    _case(["bench", "kernels", "--reps", "x"], "--reps", id="bench-kernels-reps-not-int"),
    _case(["bench", "masked", "--bogus"], "--bogus", id="bench-masked-unknown-option"),
    _case(["bench", "nosuch"], "invalid choice", id="bench-unknown"),
]


def _check(rc, err, needles, before, after):
    assert rc == 2, f"exit {rc}; stderr: {err}"
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    assert "config: config:" not in err
    assert after == before, f"files changed: {set(after) ^ set(before) or 'metadata'}"


@pytest.mark.parametrize("argv,needles,hide_deepspeed", CASES)
def test_bad_input(argv, needles, hide_deepspeed, workdir, capsys, monkeypatch):
    if hide_deepspeed:  # importlib.util.find_spec answers None for a module set to None
        monkeypatch.setitem(sys.modules, "deepspeed", None)
    before = snapshot(workdir.parent)
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:  # an argparse parser outside the CLI's own (prints usage too)
        rc = e.code
    _check(rc, capsys.readouterr().err, needles, before, snapshot(workdir.parent))


def test_case_ids_are_distinct_and_cover_every_command():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) >= 45
    assert {i.split("-")[0] for i in ids} == {"run", "plan", "report", "sweep", "beton", "bench"}


def test_snapshot_sees_writes(workdir, capsys):
    """Control: the same check notices a command that does write (a valid torchrun sweep)."""
    before = snapshot(workdir.parent)
    assert cli.main(["sweep", "cfg.yaml", "--out", "sweep", "--launcher", "torchrun"]) == 0
    assert snapshot(workdir.parent) != before and (workdir / "sweep" / "commands.sh").is_file()


def test_alias_bomb_fails_fast(workdir, capsys):
    """A bomb of 12 levels x 12 aliases (about 9e12 values) is refused in well under a second:
    the loader counts each node once instead of expanding."""
    Path("big_bomb.yaml").write_text(alias_bomb(12, 12))
    start = time.perf_counter()
    assert cli.main(["config", "show", "big_bomb.yaml"]) == 2
    assert time.perf_counter() - start < 2.0
    assert "aliases expand" in capsys.readouterr().err


# A few cases as real processes: the exit status, stderr and files of `python -m distributed_prune`.
_HIDE_DEEPSPEED = ("import sys; sys.modules['deepspeed'] = None; "
                   "from distributed_prune.cli import main; sys.exit(main(sys.argv[1:]))")


@pytest.mark.parametrize("argv,needle", [
    (["-m", "distributed_prune", "run", "binary.yaml"], "not UTF-8"),
    (["-m", "distributed_prune", "run", "bomb.yaml"], "aliases expand"),
    (["-m", "distributed_prune", "run", "cfg.yaml", "=3"], "override '=3'"),
    (["-c", _HIDE_DEEPSPEED, "run", "deepspeed.yaml"], "pip install deepspeed"),
], ids=["binary", "alias-bomb", "empty-key", "deepspeed-missing"])
def test_bad_input_subprocess(argv, needle, workdir):
    before = snapshot(workdir.parent)
    r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300, cwd=workdir)
    _check(r.returncode, r.stderr, [needle], before, snapshot(workdir.parent))
