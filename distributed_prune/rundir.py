"""The run directory (``output.dir``): its files, its metrics log, its checkpoints and where a
re-run resumes.

    config.yaml          the resolved config (a re-run must match it)
    metrics.jsonl        one JSON row per trained epoch (stage, epoch, lr, losses, top1, ...)
    checkpoints/         base.pt, pruned.pt, final.pt and <stage>-<epoch>.pt (newest few kept)
    plan.json            the pruning plan
    summary.json         the result; ``"status": "complete"`` marks a finished run (written last)
    report.md            a human-readable summary
    tensorboard/         with output.tensorboard: the metrics rows as TensorBoard scalars (:mod:`.tblog`)
    .lock                the writer's lock (its pid)

Only the primary rank writes. Every file is written atomically (:mod:`.fileio`); metrics rows
are appended and flushed, and a re-run first cuts the log back to the checkpoint it resumes from,
so every epoch is logged exactly once. This module is the only reader of ``metrics.jsonl`` and
the only judge of "is this run complete" (:func:`read_metrics`, :func:`is_complete`). One run
writes a directory at a time (:meth:`RunDir.lock`).

Over 400 lines on purpose: the run directory's files, its metrics log, checkpoints, resume
points, lock and checks of a reopened directory are one contract (docs/architecture.md, "Run
directory"), kept in the one module that owns it.
"""
from __future__ import annotations

import enum
import errno
import fcntl
import json
import math
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import checkpoint as ckpt
from . import dist, fileio, prune
from .tblog import TensorBoardLog
from .errors import UserError

__all__ = ["Stage", "Point", "RunDir", "Resumed", "open_run_dir", "read_metrics", "is_complete",
           "read_summary", "check_summary", "json_row", "FAULT_POINTS"]


# --------------------------------------------------------------------------- resume points
class Stage(enum.IntEnum):
    """What a run has done, in order. PRETRAIN, PRUNE and RETRAIN have epochs (and epoch
    checkpoints ``<stage>-<epoch>.pt``); BASE and PRUNED are the single checkpoints between
    stages (``base.pt``, ``pruned.pt``)."""
    START = 0
    PRETRAIN = 1
    BASE = 2
    PRUNE = 3
    PRUNED = 4
    RETRAIN = 5

    @property
    def label(self) -> str:
        """The name in file names and metrics rows."""
        return self.name.lower()

    @classmethod
    def from_label(cls, label: str) -> "Stage":
        return cls[label.upper()]


EPOCH_STAGES = (Stage.PRETRAIN, Stage.PRUNE, Stage.RETRAIN)


@dataclass(frozen=True, order=True)
class Point:
    """A position in a run: "after epoch ``epoch`` of ``stage``" (epoch -1: the stage's start,
    or the stage itself for BASE / PRUNED). Points order as the run proceeds."""
    stage: Stage
    epoch: int = -1

    def start_epoch(self, stage: Stage) -> int:
        """The first epoch of ``stage`` still to train when resuming from here."""
        return self.epoch + 1 if self.stage == stage else 0

    @classmethod
    def of_checkpoint(cls, path: Path) -> Optional["Point"]:
        """The point a checkpoint file name stands for; None for other files (final.pt, ...)."""
        stem = Path(path).stem
        if stem in ("base", "pruned"):
            return cls(Stage.from_label(stem))
        stage, _, ep = stem.rpartition("-")
        if ep.isdigit() and stage in {s.label for s in EPOCH_STAGES}:
            return cls(Stage.from_label(stage), int(ep))
        return None

    @classmethod
    def of_row(cls, row: dict) -> "Point":
        return cls(Stage.from_label(row["stage"]), row["epoch"])


START = Point(Stage.START)


# --------------------------------------------------------------------------- readers
def read_metrics(path: str | os.PathLike, *, strict: bool = False) -> list[dict]:
    """Rows of a ``metrics.jsonl`` (a file or a run directory), up to the first line that is
    not JSON: a line cut by a crash or a run still writing. With ``strict``, such a line
    anywhere but last is a UserError naming the file and line (the file was damaged, not cut)."""
    rows, bad = _scan_metrics(path)
    if bad is not None:
        line, last = bad
        if strict and not last:
            raise UserError(f"{_metrics_file(path)}: line {line} is not valid JSON")
        rows = [r for r in rows if r["_line"] < line]
    return [{k: v for k, v in r.items() if k != "_line"} for r in rows]


def _metrics_file(path) -> Path:
    path = Path(path)
    return path / "metrics.jsonl" if path.is_dir() else path


def _scan_metrics(path) -> tuple[list[dict], Optional[tuple[int, bool]]]:
    """(every readable row, tagged with its line number as ``_line``; (line number of the first
    unreadable line, whether it is the last line) or None)."""
    path = _metrics_file(path)
    if not path.is_file():
        return [], None
    numbered = [(i + 1, ln) for i, ln in enumerate(path.read_bytes().decode("utf-8", "replace").splitlines())
                if ln.strip()]
    rows, bad = [], None
    for j, (no, ln) in enumerate(numbered):
        try:
            row = json.loads(ln)
            if not isinstance(row, dict) or not isinstance(row.get("stage"), str) \
                    or not isinstance(row.get("epoch"), int):
                raise ValueError
            Stage.from_label(row["stage"])
        except (ValueError, KeyError):
            if bad is None:
                bad = (no, j == len(numbered) - 1)
            continue
        rows.append({**row, "_line": no})
    return rows, bad


def json_row(row: dict) -> str:
    """One metrics line, strict JSON: a non-finite number becomes null (never a bare NaN token)."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
    return json.dumps(clean, allow_nan=False)


def summary_is_complete(summary) -> bool:
    return isinstance(summary, dict) and summary.get("status") == "complete"


def read_summary(run_dir: str | os.PathLike) -> Optional[dict]:
    """summary.json of a run directory, or None when missing or unreadable."""
    try:
        data = json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_summary(run_dir: str | os.PathLike) -> Optional[dict]:
    """summary.json of a run directory; None when missing, a UserError naming it when it exists
    but cannot be read (summary.json is written atomically: a damaged one was damaged later)."""
    path = Path(run_dir) / "summary.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({type(e).__name__}); remove it to let the run "
                        "finish again") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: holds a {type(data).__name__}, not a summary object; remove it "
                        "to let the run finish again")
    return data


def is_complete(run_dir: str | os.PathLike) -> bool:
    """True when the run directory holds a summary.json whose status is ``complete``."""
    return summary_is_complete(read_summary(run_dir))


# --------------------------------------------------------------------------- the directory
@dataclass
class Resumed:
    """What a re-run takes over from the newest readable checkpoint."""
    point: Point
    record: dict
    plan_json: Optional[str]
    train_state: Optional[dict]   # engine / LR / RNG state of an epoch checkpoint


class RunDir:
    """Files of one run; only the primary rank writes."""

    def __init__(self, path: str | os.PathLike, *, complete: bool = False):
        self.path = Path(path)
        self.ckpt = self.path / "checkpoints"
        self.primary = dist.is_primary()
        self.complete = complete
        self.tensorboard: Optional[TensorBoardLog] = None
        self._lock_fd: Optional[int] = None

    # ---- files
    def write_text(self, name: str, text: str):
        if self.primary:
            fileio.write_text(self.path / name, text)

    def summary(self) -> Optional[dict]:
        return read_summary(self.path)

    # ---- metrics
    def log(self, row: dict):
        """Append one metrics row (flushed: a crash loses at most the row being written)."""
        if self.primary:
            path = self.path / "metrics.jsonl"
            try:
                with open(path, "a") as f:
                    f.write(json_row(row) + "\n")
                    f.flush()
            except OSError as e:   # name the file (a full disk reports no name)
                raise OSError(e.errno, e.strerror, str(path)) from e
            if self.tensorboard is not None:
                self.tensorboard.log_row(row)

    def open_tensorboard(self, config_text: str):
        """Start the TensorBoard log (``output.tensorboard``) in ``tensorboard/``, rewritten from
        the rows kept so far: call after :meth:`resume` cut metrics.jsonl back, so a redone
        epoch appears once (:mod:`.tblog`)."""
        if self.primary:
            self.tensorboard = TensorBoardLog(self.path / "tensorboard", config_text, rows=self.metrics())

    def close_tensorboard(self):
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    def metrics(self) -> list[dict]:
        return read_metrics(self.path)

    def truncate_metrics(self, after: Point):
        """Keep rows logged at or before ``after``: the resumed run logs the rest. A line cut by
        a crash (the last one) is dropped silently: its epoch is redone. A damaged line before
        the end is never dropped silently: the file is kept aside as ``metrics.jsonl.damaged``
        (``-N`` when that exists) and the log rebuilt from every readable row, with a warning
        naming the file and line."""
        path = self.path / "metrics.jsonl"
        if not self.primary or not path.exists():
            return
        rows, bad = _scan_metrics(path)
        if bad is not None and not bad[1]:
            aside = path.with_name("metrics.jsonl.damaged")
            n = 1
            while aside.exists():
                aside, n = path.with_name(f"metrics.jsonl.damaged-{n}"), n + 1
            os.replace(path, aside)
            print(f"dprune: warning: {path}: line {bad[0]} is not valid JSON; kept the file as "
                  f"{aside.name} and rebuilt the log from its readable rows", file=sys.stderr, flush=True)
        seen, keep = set(), []
        for r in rows:
            pt = Point.of_row(r)
            if pt <= after and pt not in seen:   # a row logged twice (an old bug) once
                seen.add(pt)
                keep.append({k: v for k, v in r.items() if k != "_line"})
        keep.sort(key=Point.of_row)
        self.write_text("metrics.jsonl", "".join(json_row(r) + "\n" for r in keep))

    # ---- checkpoints
    def save(self, name: str, model, **kw):
        if self.primary:
            ckpt.save(self.ckpt / name, model, **kw)

    def save_epoch(self, stage: Stage, epoch: int, model, *, keep: int, **kw):
        """``<stage>-<epoch>.pt``, then delete all but the newest ``keep`` of that stage."""
        self.save(f"{stage.label}-{epoch:04d}.pt", model, stage=stage.label, epoch=epoch, **kw)
        if self.primary:
            files = sorted(self.ckpt.glob(f"{stage.label}-*.pt"))
            for f in files[:-keep]:
                f.unlink(missing_ok=True)

    def latest_checkpoint(self) -> Optional[tuple[Path, dict, Point]]:
        """Newest readable checkpoint (a truncated or corrupt one is skipped: the previous is used)."""
        if not self.ckpt.is_dir():
            return None
        found = [(pt, p) for p in self.ckpt.glob("*.pt") if (pt := Point.of_checkpoint(p)) is not None]
        for pt, p in sorted(found, reverse=True):
            try:
                return p, ckpt.load(p), pt
            except UserError as e:
                if self.primary:
                    print(f"dprune: warning: {e}; using the previous checkpoint", flush=True)
        return None

    def resume(self, model, *, enabled: bool = True):
        """Load the newest readable checkpoint into ``model`` (replaying its plan first) and cut
        metrics.jsonl back to it. Returns (model, :class:`Resumed`); from the start when there
        is none (or ``enabled`` is False)."""
        found = self.latest_checkpoint() if enabled else None
        if not found:
            self.truncate_metrics(START)
            return model, Resumed(START, {}, None, None)
        path, obj, point = found
        plan_json = obj.get("plan")
        if plan_json:
            model = prune.replay(model, prune.Plan.from_json(plan_json))
        ckpt.load_state(model, obj["state_dict"], source=f"checkpoint {path}")
        self.truncate_metrics(point)
        if self.primary:
            print(f"dprune: resuming {self.path} after {path.name}")
        return model, Resumed(point, json.loads(obj.get("record") or "{}"), plan_json,
                              obj if "engine" in obj else None)

    # ---- test hooks (used by the resume, fault and distributed tests)
    def maybe_fault(self, point: str):
        """``DPRUNE_FAULT=<point>[,<point>...]`` kills this process (SIGKILL) at each listed
        point once (``.fault-injected`` records the points that fired, so a re-run gets past
        them), on rank ``DPRUNE_FAULT_RANK`` (default 0). Points: ``<stage>:<epoch>`` right
        after that epoch's checkpoint, ``<stage>:<epoch>:logged`` inside the stage (after the
        epoch's metrics row, before its checkpoint) and :data:`FAULT_POINTS`."""
        spec = os.environ.get("DPRUNE_FAULT")
        if not spec or point not in spec.split(","):
            return
        if dist.get_rank() != int(os.environ.get("DPRUNE_FAULT_RANK", "0")):
            return
        marker = self.path / ".fault-injected"
        fired = marker.read_text().split() if marker.exists() else []
        if point in fired:
            return
        fileio.write_text(marker, "".join(f + "\n" for f in (*fired, point)))
        os.kill(os.getpid(), signal.SIGKILL)

    # ---- one writer
    def lock(self):
        """Take the run directory's advisory lock (primary rank only) for the life of this
        object: ``flock`` on ``.lock``, which the kernel releases when the holder exits in any
        way, so a lock left by a dead process is never in the way. Another live holder is a
        UserError naming the directory and the holder's pid; nothing is written then."""
        if not self.primary or self._lock_fd is not None:
            return
        path = self.path / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"output.dir {self.path} is in use by another run (pid {holder}); "
                                "wait for it or choose another output.dir") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def close(self):
        """Release the lock (also released by the kernel on any exit)."""
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


LOCK_NAME = ".lock"

#: The kill points of ``DPRUNE_FAULT`` besides ``<stage>:<epoch>[:logged]``, in run order.
FAULT_POINTS = ("after-base", "inside-prune", "after-pruned", "before-summary", "inside-report")


def dump_rank_state(model, plan_json: Optional[str]):
    """Test hook: ``DPRUNE_DUMP_RANK_STATE=DIR`` makes EVERY rank save its final weights and plan
    hash to DIR/rank{r}.pt (the distributed tests check that all ranks agree)."""
    out = os.environ.get("DPRUNE_DUMP_RANK_STATE")
    if out:
        sha = prune.Plan.from_json(plan_json).sha256() if plan_json else None
        ckpt.atomic_save({"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                          "plan_sha256": sha}, Path(out) / f"rank{dist.get_rank()}.pt")


# --------------------------------------------------------------------------- opening
def open_run_dir(path: str | os.PathLike, *, config: dict, config_text: str, saved_config,
                 resume) -> RunDir:
    """Create ``path`` (writing config.yaml) or reopen it, holding its lock (see
    :meth:`RunDir.lock`; close the RunDir or use it as a context manager). Reopening needs the
    same config (``resume`` aside) and ``resume`` not False; ``saved_config(text) -> dict``
    parses the saved config.yaml. The returned RunDir says whether the run is already complete.
    Every problem with the directory is a UserError naming the path, raised before anything is
    created or changed."""
    rd = RunDir(path)
    _check_not_a_file(rd.path)
    saved = rd.path / "config.yaml"
    created = None
    try:
        if saved.exists() or saved.is_symlink():
            if resume is False:
                raise UserError(f"output.dir {rd.path} already holds a run; pass resume=true or choose "
                                "another dir")
            old = _read_saved_config(saved, saved_config)
            new = dict(config)
            old.pop("resume", None)
            new.pop("resume", None)
            if old != new:
                raise UserError(f"output.dir {rd.path} holds a run with a different config "
                                f"({_first_diff(old, new)}); choose another output.dir")
            summary = check_summary(rd.path)
            if summary_is_complete(summary):   # read only: no lock taken, nothing written
                _check_plan_file(rd.path, summary)
                rd.complete = True
                return rd
            _check_writable(rd.path)
            rd.lock()
        elif rd.primary:
            _check_writable(rd.path)
            created = _first_missing(rd.path)
            rd.path.mkdir(parents=True, exist_ok=True)
            rd.lock()
            if not saved.exists():          # (a run that held the lock may have written it)
                rd.write_text("config.yaml", config_text)
            else:
                rd.close()
                return open_run_dir(path, config=config, config_text=config_text,
                                    saved_config=saved_config, resume=resume)
    except OSError as e:
        rd.close()
        if created is not None:   # nothing left behind: only what this call created
            for f in (rd.path / LOCK_NAME, saved):
                f.unlink(missing_ok=True)
            d = rd.path
            while True:
                try:
                    d.rmdir()
                except OSError:
                    break
                if d == created:
                    break
                d = d.parent
        raise UserError(f"output.dir {rd.path}: cannot write ({e.strerror or e})") from None
    except BaseException:
        rd.close()
        raise
    dist.barrier()
    return rd


def _first_missing(path: Path) -> Optional[Path]:
    """The topmost directory ``mkdir(parents=True)`` would create for ``path`` (None: exists)."""
    top = None
    while not path.exists() and path.parent != path:
        top, path = path, path.parent
    return top


def _check_plan_file(run_dir: Path, summary: dict):
    """plan.json of a finished run must be the plan its summary names (``plan_sha256``)."""
    want = summary.get("plan_sha256")
    path = run_dir / "plan.json"
    if want is None:
        return
    try:
        got = prune.Plan.from_json(path.read_text()).sha256()
    except Exception as e:  # missing, not JSON, not a plan: all the same to its readers
        raise UserError(f"{path}: unreadable or not a plan ({type(e).__name__}); the run's plan is "
                        "also in checkpoints/final.pt") from None
    if got != want:
        raise UserError(f"{path}: plan hash {got[:12]} differs from summary.json's plan_sha256 "
                        f"{want[:12]}; the run's plan is also in checkpoints/final.pt")


def _check_not_a_file(path: Path):
    """``output.dir`` must be a directory or creatable as one: not a file, not below a file."""
    if path.exists() and not path.is_dir():
        raise UserError(f"output.dir {path}: is a file, not a directory")
    p = _first_missing(path)
    if p is not None and p.parent.exists() and not p.parent.is_dir():
        raise UserError(f"output.dir {path}: {p.parent} is a file, not a directory")


def _check_writable(path: Path):
    """The directory (or its nearest existing ancestor) must be writable: os.access (it knows
    permission bits, read-only mounts and immutable directories; root passes the bits, so the
    writes themselves are also guarded, see :func:`open_run_dir`)."""
    p = _first_missing(path)
    p = path if p is None else p.parent
    if not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"output.dir {path}: {p} is not writable")


def _read_saved_config(saved: Path, parse) -> dict:
    try:
        text = saved.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{saved}: unreadable ({type(e).__name__}); not a run directory of dprune?") from None
    try:
        old = parse(text)
    except Exception as e:   # any YAML or config error: the file, not the user's input, is bad
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{saved}: not a readable config ({why})") from None
    if not isinstance(old, dict):
        raise UserError(f"{saved}: holds a {type(old).__name__}, not a config mapping")
    return dict(old)


def _first_diff(a, b, prefix=""):
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            d = _first_diff(va, vb, f"{prefix}{k}.")
            if d:
                return d
        elif va != vb:
            return f"{prefix}{k}: {va!r} -> {vb!r}"
    return ""
