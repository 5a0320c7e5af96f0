"""Sweeps: expand a grid of config overrides into runs and launch them.

    dprune sweep configs/paper/resnet56_cifar10_l1_step0.01.yaml \\
        --grid "prune.ratios=[0,0.3,0.3,0.3,0],[0,0.7,0.7,0.7,0]" \\
        --grid "retrain.lr_schedule=0:0.01,60:0.001,90:0.0001|0:0.001,80:0.0001" \\
        --seeds 3 --launcher torchrun --nproc 4 --out runs/r56

Grid syntax: ``key=v1,v2,...``.  Values are split on commas outside brackets, so a ratio
spec such as ``[0,0.7,0.7,0.7,0]`` stays one value.  A value that itself holds commas outside
brackets (an LR schedule ``0:0.01,60:0.001``) needs the other separator: when ``|`` appears
outside brackets, values are split on ``|`` only (``key=a,b|c,d`` is two values).

Every run gets ``seed=S`` (S = 0 .. seeds-1; or the ``seed`` values of a ``--grid seed=...``)
and ``output.dir=<out>/<run_name>``; fixed ``overrides`` go before the grid's.  The override
lines are written to ``<out>/runs.txt`` (one shell-quoted line per run).  Launchers:

* ``local``: run one after another in this process through ``pipeline.run_from_cli``,
  skipping runs whose ``summary.json`` says ``complete`` (re-running a sweep resumes it);
* ``torchrun``: write ``<out>/commands.sh``, one ``torchrun --nproc_per_node N -m
  distributed_prune run CONFIG k=v ...`` line per run (complete runs commented out);
* ``slurm``: write ``<out>/sweep.sbatch``, a job array with one index per run; each task reads
  its line of ``runs.txt``, exits early if that run is complete, and runs ``srun torchrun``.
  Submit with ``sbatch <out>/sweep.sbatch``.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import os
import re
import shlex
from pathlib import Path

from . import config as config_mod, dist, fileio, rundir
from .errors import UserError

__all__ = ["expand", "run_name", "split_values", "cli_sweep"]

_OPEN, _CLOSE = "[({", "])}"
MAX_RUNS = 10_000


def split_values(text: str, sep: str) -> list[str]:
    """Split ``text`` on ``sep`` where no bracket is open; brackets must balance."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth -= 1
            if depth < 0:
                raise UserError(f"unbalanced brackets in {text!r}")
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise UserError(f"unbalanced brackets in {text!r}")
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def _parse_grid_entry(entry: str) -> tuple[str, list[str]]:
    key, eq, values = entry.partition("=")
    key = key.strip()
    if not eq or not key or not re.fullmatch(r"[A-Za-z_][\w.]*", key):
        raise UserError(f"--grid {entry!r}: expected key=v1,v2 (a dotted config key, '=', values)")
    vals = split_values(values, "|")  # '|' outside brackets wins over ','
    if len(vals) == 1:
        vals = split_values(values, ",")
    if any(v == "" for v in vals):
        raise UserError(f"--grid {entry!r}: empty value for {key}")
    if len(set(vals)) != len(vals):
        raise UserError(f"--grid {entry!r}: repeated value for {key}")
    return key, vals


def expand(grid: list[str], seeds: int = 1) -> list[dict[str, str]]:
    """All runs of the grid: the product of every ``--grid`` entry, times the seeds.

    Returns one ``{key: value}`` dict per run (grid keys in the given order, then ``seed``),
    the first grid key varying slowest and the seed fastest.
    """
    if seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {seeds}")
    if seeds > MAX_RUNS:
        raise UserError(f"--seeds {seeds}: a sweep has at most {MAX_RUNS} runs")
    axes: dict[str, list[str]] = {}
    for entry in grid:
        key, vals = _parse_grid_entry(entry)
        if key in axes:
            raise UserError(f"--grid: key {key} given twice")
        axes[key] = vals
    if "seed" in axes:
        if seeds != 1:
            raise UserError("give seeds either as --seeds N or as --grid seed=..., not both")
    else:
        axes["seed"] = [str(s) for s in range(seeds)]
    n = math.prod(len(v) for v in axes.values())
    if n > MAX_RUNS:  # counted before the list is built: a typo must not fill the memory
        raise UserError(f"the grid has {n} runs; a sweep has at most {MAX_RUNS}")
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def _slug(text: str) -> str:
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9.+-]", "_", text)).strip("_.") or "x"


def run_name(overrides: dict[str, str]) -> str:
    """A stable, unique, filesystem-safe directory name for a run.

    Readable part: ``<last key component>-<value>`` joined by ``_``, keys sorted with ``seed``
    last, characters other than ``[A-Za-z0-9.+-]`` turned into ``_``, cut to 120 characters;
    then ``-`` and 6 hex digits of a hash of the exact overrides (sanitising loses information,
    the hash keeps names of different runs apart).  The same overrides always give the same name.
    """
    keys = sorted(overrides, key=lambda k: (k == "seed", k))
    short = [k.rsplit(".", 1)[-1] for k in keys]
    readable = "_".join(f"{_slug(s)}-{_slug(str(overrides[k]))}" for s, k in zip(short, keys))
    digest = hashlib.sha1(json.dumps({k: str(overrides[k]) for k in keys}, sort_keys=True)
                          .encode()).hexdigest()[:6]
    return f"{readable[:120].rstrip('_-.')}-{digest}"


def _is_complete(run_dir: Path) -> bool:
    return rundir.is_complete(run_dir)


def _write(path: Path, text: str, executable: bool = False) -> None:
    fileio.write_text(path, text, executable=executable)


_SBATCH = """#!/bin/bash
# dprune sweep: {n} runs as a job array; submit with: sbatch {script}
#SBATCH --job-name=dprune-sweep
#SBATCH --array=0-{last}
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={nproc}
#SBATCH --cpus-per-task={cpus}
#SBATCH --chdir={cwd_plain}
#SBATCH --output={out_plain}/slurm-%A_%a.out
set -euo pipefail
# line SLURM_ARRAY_TASK_ID (0-based) of runs.txt holds this run's shell-quoted overrides
LINE=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {runs})
eval "set -- $LINE"
for a in "$@"; do case "$a" in output.dir=*) DIR="${{a#output.dir=}}";; esac; done
if grep -qs '"status": *"complete"' "$DIR/summary.json"; then
  echo "complete, skipped: $DIR"; exit 0
fi
srun torchrun --standalone --nproc_per_node {nproc} -m distributed_prune run {config} "$@"
"""


def _validate(config: Path, runs, launcher: str) -> None:
    """Every run's config, validated before anything is written or started: a bad value in the
    last grid point must not surface hours into the sweep. The YAML file is read once."""
    base = config_mod.read_config_file(config)
    engines = set()
    for i, (name, _, line) in enumerate(runs, 1):
        try:
            cfg = config_mod.from_dict(config_mod.apply_overrides(copy.deepcopy(base), line))
        except UserError as e:
            raise UserError(f"sweep run {i}/{len(runs)} ({name}): {e}") from None
        engines.add(cfg.dist.engine)
    if launcher == "local":  # the other launchers write scripts for another machine
        for engine in sorted(engines):
            dist.require_engine(engine)


def cli_sweep(args) -> int:
    """``dprune sweep CONFIG --grid key=v1,v2 [--seeds N] [--launcher local|torchrun|slurm]
    [--out DIR] [--nproc N] [key=value ...]`` (see the module docstring)."""
    config = Path(args.config)
    if args.nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {args.nproc}")
    if not str(args.out).strip() or "\0" in str(args.out):
        raise UserError(f"--out {args.out!r}: expected a directory for the sweep's runs")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out {args.out}: exists and is not a directory")
    fixed = list(args.overrides or [])
    for ov in fixed:
        key, _ = config_mod.parse_override(ov)
        if key in ("output.dir", "seed"):
            raise UserError(f"override {key}: set by the sweep (use --out / --seeds)")
    grid_runs = expand(list(args.grid or []), args.seeds)
    clash = {ov.partition("=")[0].strip() for ov in fixed} & set(grid_runs[0])
    if clash:
        raise UserError(f"override {sorted(clash)[0]}: also a --grid key")
    out = Path(args.out)
    runs = []
    for ov in grid_runs:
        name = run_name(ov)
        runs.append((name, out / name,
                     fixed + [f"{k}={v}" for k, v in ov.items()] + [f"output.dir={out / name}"]))
    if len({n for n, _, _ in runs}) != len(runs):  # hash collision: never silently share a dir
        raise UserError("two runs of the sweep got the same name; change the grid")
    _validate(config, runs, args.launcher)
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write(out / "runs.txt", "".join(shlex.join(line) + "\n" for _, _, line in runs))
    except OSError as e:
        raise UserError(f"--out {out}: cannot write the sweep there ({e.strerror or e})") from None
    done = [_is_complete(d) for _, d, _ in runs]
    print(f"sweep: {len(runs)} runs ({sum(done)} complete) -> {out}/runs.txt")

    if args.launcher == "local":
        if args.nproc > 1:
            print(f"note: --launcher local runs in this process; use --launcher torchrun for "
                  f"--nproc {args.nproc}")
        from .pipeline import run_from_cli

        failed = []
        for i, ((name, _, line), complete) in enumerate(zip(runs, done), 1):
            if complete:
                print(f"[{i}/{len(runs)}] {name}: complete, skipped")
                continue
            print(f"[{i}/{len(runs)}] {name}: running", flush=True)
            rc = run_from_cli(str(config), line)
            if rc:
                print(f"[{i}/{len(runs)}] {name}: failed (exit {rc})")
                failed.append(name)
        print(f"sweep: {len(runs) - len(failed)}/{len(runs)} runs complete"
              + (f"; failed: {', '.join(failed)}" if failed else ""))
        return 1 if failed else 0

    if args.launcher == "torchrun":
        lines = ["#!/usr/bin/env bash", f"# dprune sweep: {len(runs)} runs, one after another",
                 "set -euo pipefail", f"cd {shlex.quote(os.getcwd())}"]
        for (_, _, line), complete in zip(runs, done):
            cmd = shlex.join(["torchrun", "--nproc_per_node", str(args.nproc), "-m",
                              "distributed_prune", "run", str(config), *line])
            lines.append(f"# complete: {cmd}" if complete else cmd)
        script = out / "commands.sh"
        _write(script, "\n".join(lines) + "\n", executable=True)
        print(f"wrote {script} ({len(runs) - sum(done)} to run); run it with: bash {script}")
        return 0

    if args.launcher == "slurm":
        script = out / "sweep.sbatch"
        _write(script, _SBATCH.format(
            n=len(runs), last=len(runs) - 1, nproc=args.nproc, cpus=max(4, 8 * args.nproc),
            cwd_plain=os.getcwd(), out_plain=out.resolve(), script=script,
            runs=shlex.quote(str((out / "runs.txt").resolve())),
            config=shlex.quote(str(config.resolve()))))
        print(f"wrote {script} (job array of {len(runs)} runs); submit with: sbatch {script}")
        return 0
    raise UserError(f"--launcher {args.launcher!r}: expected local, torchrun or slurm")
