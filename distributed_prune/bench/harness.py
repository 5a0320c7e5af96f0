"""The one timing harness and the one output writer of every benchmark in this package.

Timing (:func:`alternate`): warm-up calls first, then repetitions that alternate between the
callables in ABBA order (A B, B A, A B, ...), so slow drift (clocks, thermal state, other jobs
on a shared machine) hits each of them alike; every repetition is timed by CUDA events on a GPU
and by ``time.perf_counter`` after a synchronize on the CPU; results are summarised by
:func:`median` and :func:`spread`.

Output (:func:`write_json`, :func:`write_text`, :func:`emit`, :func:`md_table`): JSON and
markdown written atomically (a temporary file in the same directory, then ``os.replace``), so
an interrupted benchmark never leaves a truncated result behind; :func:`env_info` is the
header every result carries (device, date, commit, versions).

Torch is imported lazily: ``dprune bench gpu``'s parent process uses the writer without it.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

from .. import fileio


# --------------------------------------------------------------------------- timing
def sync(device) -> None:
    if getattr(device, "type", device) == "cuda":
        import torch

        torch.cuda.synchronize(device)


def clock(kind: str = "wall") -> float:
    """Seconds on the ``wall`` clock (perf_counter) or the ``cpu`` clock of this process
    (process_time: with one thread it equals the wall time of an idle machine, and other jobs
    sharing the cores do not inflate it). For host-side work timed without a device."""
    return time.process_time() if kind == "cpu" else time.perf_counter()


def time_once(fn: Callable[[], object], device) -> float:
    """Milliseconds of one call: CUDA events on GPU, perf_counter after a synchronize on CPU."""
    if getattr(device, "type", device) == "cuda":
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return 1e3 * (time.perf_counter() - t0)


def alternate(fns: dict[str, Callable[[], object]], *, reps: int, warmup: int,
              device) -> dict[str, list[float]]:
    """Per name, ``reps`` times in ms, after ``warmup`` untimed calls of each callable.
    Repetitions alternate between the callables in ABBA order (see the module docstring)."""
    names = list(fns)
    for _ in range(warmup):
        for k in names:
            fns[k]()
    sync(device)
    out: dict[str, list[float]] = {k: [] for k in names}
    for r in range(reps):
        for k in (names if r % 2 == 0 else names[::-1]):
            out[k].append(time_once(fns[k], device))
    return out


def median(xs) -> float:
    return float(statistics.median(xs))


def spread(xs) -> float:
    """(max - min) / median of the repetitions: a rough noise indicator printed with the tables."""
    xs = list(xs)
    return (max(xs) - min(xs)) / median(xs) if len(xs) > 1 and median(xs) else 0.0


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {k: median(v) for k, v in times.items()}


# --------------------------------------------------------------------------- output
def write_text(path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (parents created), through the package's one
    atomic writer."""
    return fileio.write_text(path, text)


def write_json(path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=1, default=str) + "\n")


def md_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table (pastes into docs/benchmarks as is, reads in a terminal)."""
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *map(line, cells[1:])])


def emit(result: dict, table: str, *, as_json: bool = False, out=None, markdown=None) -> None:
    """Print the table (or the JSON object with ``as_json``); write the JSON to ``out`` and the
    table to ``markdown`` when given, atomically."""
    print(json.dumps(result, default=str) if as_json else table, flush=True)
    if out:
        write_json(out, result)
    if markdown:
        write_text(markdown, table + "\n")


def commit() -> str:
    """The source tree's git commit (``-dirty`` when modified), else $DPRUNE_COMMIT, else
    ``unknown`` (a copy of the tree without .git, as on a lent GPU node)."""
    root = Path(__file__).resolve().parents[2]
    try:
        # this tree's own repository only (an installed copy may sit inside someone else's)
        top = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, timeout=10)
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if top.returncode == 0 and Path(top.stdout.strip()).resolve() == root and sha.stdout.strip():
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("DPRUNE_COMMIT") or "unknown"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def env_info(device) -> dict:
    """Header of every benchmark result: device, date, commit, torch, timing method."""
    import torch

    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name()
    return {"device": dev.type, "device_name": name, "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__, "timing": "cuda_events" if dev.type == "cuda" else "perf_counter",
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "commit": commit()}
