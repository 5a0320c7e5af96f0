"""``dprune bench gpu``: every GPU claim of the project measured by one command, in minutes.

    dprune bench gpu [--out DIR] [--budget SECONDS]        # on a CUDA node (default 540 s)
    dprune bench gpu --cpu [--out DIR]                      # the same steps, small shapes, CPU
    dprune bench gpu --only env,train                       # a subset (names: see STEPS)

Steps, in priority order (the budget runs out at the end first): ``env`` (versions, device,
SMs, memory, the backend ``auto`` picks per kernel), ``correctness`` (compiled kernels vs the
reference), ``train`` (ResNet-50 dense vs the 2.31x plan, with and without round_to 8: training
img/s, inference speedup, peak memory), ``masked`` (masked-phase step time per kernel backend at
two sparsities), ``syncs`` (host synchronisations per training step: plain, GReg, TPP, masked),
``ddp`` (a one-process NCCL DDP step), ``ffcv`` (a synthetic-JPEG .beton read straight to the
device) and ``compile`` (first-call compile time of the Triton kernels). What each measures is
in :mod:`.gpu_steps`.

Each step runs in its own process under its own time limit (its share of what is left of the
budget), so a hang or a crash costs that step only: it is killed, reported, and the next one
runs. A step whose dependency is missing (FFCV, torch-pruning, DeepSpeed, the native extension,
a second backend) says ``skipped: <why>``. Per step, ``DIR/<step>.json`` and ``DIR/<step>.md``
(device, date, commit, figures), its log ``DIR/<step>.log``, and at the end ``DIR/summary.json``
/ ``DIR/summary.md``: every figure next to its target, printed as one screen.

``--cpu`` runs the same steps on small shapes on the CPU (Triton through its interpreter): it
checks that the command works, not the GPU targets (figures are marked n/a). The exit status is
0 when every step ended ok or skipped, 1 otherwise, 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..cmdline import ArgumentParser
from ..errors import UserError
from . import harness

DEFAULT_BUDGET_S = 540.0
CPU_BUDGET_S = 170.0            # --cpu must end within 3 minutes, start-up included
STEP_FLOOR_S = 30.0             # least time a step gets while the budget lasts


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    target: str          # "module:function" run in the step's process
    weight: float        # share of the remaining budget
    fresh_triton_cache: bool = False   # time compilation, not a cache hit


_S = "distributed_prune.bench.gpu_steps"
STEPS = (
    Step("env", "environment", f"{_S}:step_env", 0.03),
    Step("correctness", "compiled kernels vs the reference", f"{_S}:step_correctness", 0.22),
    Step("train", "ResNet-50 training / inference, dense vs 2.31x plan", f"{_S}:step_train", 0.23),
    Step("masked", "masked-phase step time per backend", f"{_S}:step_masked", 0.15),
    Step("syncs", "host synchronisations per training step", f"{_S}:step_syncs", 0.09),
    Step("ddp", "one-process DDP step", f"{_S}:step_ddp", 0.06),
    Step("ffcv", "FFCV .beton to the device", f"{_S}:step_ffcv", 0.12),
    Step("compile", "first-call compile time of the Triton kernels", f"{_S}:step_compile", 0.10,
         fresh_triton_cache=True),
)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="dprune bench gpu", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench_gpu", help="directory for the results (default: bench_gpu)")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds for all steps (default: {DEFAULT_BUDGET_S:.0f}; {CPU_BUDGET_S:.0f} with --cpu)")
    p.add_argument("--cpu", action="store_true", help="small shapes on the CPU (Triton interpreter)")
    p.add_argument("--size", choices=["full", "small", "tiny"], default=None,
                   help="shapes: full (GPU default), small (--cpu default), tiny (the CI test)")
    p.add_argument("--only", default=None, help="comma-separated step names (default: all)")
    return p


# --------------------------------------------------------------------------- the runner
def _child_env(cpu: bool, fresh_cache: Path | None) -> dict:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])   # the step processes import this same tree
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    if cpu:
        env["TRITON_INTERPRET"] = "1"       # must be set before any kernel is defined
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        env.pop("TRITON_INTERPRET", None)
    if fresh_cache is not None:
        env["TRITON_CACHE_DIR"] = str(fresh_cache)
    return env


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)   # the step and anything it started
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def run_step(step: Step, *, out: Path, limit: float, settings: dict) -> dict:
    """Run one step in a fresh process with a hard time limit; its result dict (``status`` one
    of ok / skipped / failed / timeout)."""
    result_file = out / f".{step.name}.result.json"
    log = out / f"{step.name}.log"
    result_file.unlink(missing_ok=True)
    cache = out / f".triton_cache_{step.name}" if step.fresh_triton_cache else None
    cmd = [sys.executable, "-m", "distributed_prune.bench.gpu_child", step.target, str(result_file),
           json.dumps({**settings, "limit_s": limit})]
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env=_child_env(settings["device"] == "cpu", cache))
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            _kill(proc)
            rc = None
    wall = time.monotonic() - t0
    try:
        res = json.loads(result_file.read_text())
    except (OSError, ValueError):
        res = {}
    result_file.unlink(missing_ok=True)
    if rc is None:
        res = {**res, "status": "timeout", "why": f"killed after its {limit:.0f} s limit",
               "log_tail": _tail(log)}
    elif rc != 0 or "status" not in res:
        res = {**res, "status": "failed", "why": res.get("why") or f"exit status {rc}",
               "log_tail": _tail(log)}
    if cache is not None:
        shutil.rmtree(cache, ignore_errors=True)   # compiled kernels: not a result
    res.update(step=step.name, title=step.title, wall_s=round(wall, 1), limit_s=round(limit, 1))
    return res


def run_steps(steps, *, out: Path, budget: float, settings: dict, floor: float = STEP_FLOOR_S) -> list[dict]:
    """Every step in order, each limited to its weight's share of the budget left (time a step
    does not use goes to the later ones); a step that fails, hangs or is skipped never stops
    the ones after it."""
    end = time.monotonic() + budget
    results = []
    for i, st in enumerate(steps):
        left = end - time.monotonic()
        if left < 3:
            res = {"step": st.name, "title": st.title, "status": "skipped", "why": "the budget is spent",
                   "wall_s": 0.0, "limit_s": 0.0}
        else:
            # a floor, so that a step is never given less than its process start-up needs
            share = max(left * st.weight / sum(s.weight for s in steps[i:]), min(left, floor))
            res = run_step(st, out=out, limit=share, settings=settings)
        results.append(res)
        write_step(out, res, header=results[0].get("header"))
        print(f"[{i + 1}/{len(steps)}] {st.name}: {_status(res)} ({res['wall_s']:.0f} s of {res['limit_s']:.0f})",
              flush=True)
    return results


# --------------------------------------------------------------------------- output
def _status(res: dict) -> str:
    return res["status"] + (f": {res['why']}" if res.get("why") and res["status"] != "ok" else "")


def _fmt(v, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        text = f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
    else:
        text = str(v)
    return f"{text} {unit}".strip()


def verdict(fig: dict) -> str:
    if fig.get("target") is None:
        return ""
    if fig.get("met") is None:
        return "n/a"
    return "MET" if fig["met"] else "MISSED"


def figure_rows(res: dict, notes: bool = True) -> list[list]:
    return [[f["name"] + (f" ({f['note']})" if notes and f.get("note") else ""), _fmt(f.get("value"), f.get("unit", "")),
             "" if f.get("target") is None else f"{f.get('op', '>=')} {_fmt(f['target'], f.get('unit', ''))}",
             verdict(f)] for f in res.get("figures", [])]


def write_step(out: Path, res: dict, header: dict | None) -> None:
    """``<step>.json`` (the whole result, with device, date and commit) and ``<step>.md``."""
    head = res.get("header") or header or {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "commit": harness.commit()}
    res.setdefault("header", head)
    harness.write_json(out / f"{res['step']}.json", res)
    lines = [f"# {res['step']}: {res['title']}", "",
             f"{head.get('device_name', '?')} ({head.get('device', '?')}), {head.get('date', '?')}, "
             f"commit {head.get('commit', '?')}, torch {head.get('torch', '?')}", "",
             f"status: {_status(res)} ({res['wall_s']:.0f} s, limit {res['limit_s']:.0f} s)", ""]
    if res.get("figures"):
        lines += [harness.md_table(["figure", "value", "target", "verdict"], figure_rows(res)), ""]
    if res.get("table"):
        lines += [res["table"], ""]
    if res.get("log_tail"):
        lines += ["```", res["log_tail"], "```", ""]
    harness.write_text(out / f"{res['step']}.md", "\n".join(lines))


def summary_text(results: list[dict], *, total_s: float, budget: float) -> str:
    head = next((r["header"] for r in results if r.get("header")), {})
    rows = []
    for r in results:
        figs = figure_rows(r, notes=False)   # one screen: the notes are in the step tables
        first = [r["step"], _status(r)[:60]]
        if not figs:
            rows.append(first + ["", "", "", ""])
        for i, f in enumerate(figs):
            rows.append((first if i == 0 else ["", ""]) + f)
    return (f"dprune bench gpu: {head.get('device_name', '?')} ({head.get('device', '?')}), "
            f"{head.get('date', '?')}, commit {head.get('commit', '?')}; {total_s:.0f} s of a {budget:.0f} s budget\n"
            + harness.md_table(["step", "status", "figure", "value", "target", "verdict"], rows))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    budget = args.budget if args.budget is not None else (CPU_BUDGET_S if args.cpu else DEFAULT_BUDGET_S)
    if not budget > 0:
        raise UserError(f"--budget: must be > 0 seconds, got {args.budget}")
    names = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else [s.name for s in STEPS]
    unknown = sorted(set(names) - {s.name for s in STEPS})
    if unknown or not names:
        raise UserError(f"--only: unknown step {', '.join(unknown) or '(none given)'} "
                        f"(steps: {', '.join(s.name for s in STEPS)})")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    if not args.cpu:
        import torch   # the runner itself never touches the device: this only asks the driver

        if not torch.cuda.is_available():
            raise UserError("dprune bench gpu: no CUDA device is available (use --cpu for the CPU check)")
    size = args.size or ("small" if args.cpu else "full")
    steps = [s for s in STEPS if s.name in names]
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    results = run_steps(steps, out=out, budget=budget,
                        settings={"device": "cpu" if args.cpu else "cuda", "size": size, "out": str(out)})
    total = time.monotonic() - t0
    text = summary_text(results, total_s=total, budget=budget)
    harness.write_json(out / "summary.json", {"header": results[0].get("header"), "total_s": round(total, 1),
                                              "budget_s": budget, "size": size, "steps": results})
    harness.write_text(out / "summary.md", text + "\n")
    print(text)
    return 0 if all(r["status"] in ("ok", "skipped") for r in results) else 1

