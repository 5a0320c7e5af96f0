"""The run directory (``output.dir``): its files, its metrics log, its checkpoints and where a
re-run resumes.

    config.yaml          the resolved config (a re-run must match it)
    metrics.jsonl        one JSON row per trained epoch (stage, epoch, lr, losses, top1, ...)
    checkpoints/         base.pt, pruned.pt, final.pt and <stage>-<epoch>.pt (newest few kept)
    plan.json            the pruning plan
    summary.json         the result; ``"status": "complete"`` marks a finished run
    report.md            a human-readable summary
    tensorboard/         with output.tensorboard: the metrics rows as TensorBoard scalars (:mod:`.tblog`)

Only the primary rank writes. Every file is written atomically (:mod:`.fileio`); metrics rows
are appended and flushed, and a re-run first cuts the log back to the checkpoint it resumes from,
so every epoch is logged exactly once. This module is the only reader of ``metrics.jsonl`` and
the only judge of "is this run complete" (:func:`read_metrics`, :func:`is_complete`).
"""
from __future__ import annotations

import enum
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import checkpoint as ckpt
from . import dist, fileio, prune
from .tblog import TensorBoardLog
from .errors import UserError

__all__ = ["Stage", "Point", "RunDir", "Resumed", "open_run_dir", "read_metrics", "is_complete",
           "read_summary"]


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
    anywhere but last is a UserError (the file was damaged, not cut)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    rows = []
    for i, ln in enumerate(lines):
        try:
            rows.append(json.loads(ln))
        except json.JSONDecodeError:
            if strict and i != len(lines) - 1:
                raise UserError(f"{path}: line {i + 1} is not valid JSON") from None
            break
    return rows


def summary_is_complete(summary) -> bool:
    return isinstance(summary, dict) and summary.get("status") == "complete"


def read_summary(run_dir: str | os.PathLike) -> Optional[dict]:
    """summary.json of a run directory, or None when missing or unreadable."""
    try:
        data = json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


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
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
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
        """Keep rows logged at or before ``after``: the resumed run logs the rest."""
        if self.primary and (self.path / "metrics.jsonl").exists():
            keep = [r for r in self.metrics() if Point.of_row(r) <= after]
            self.write_text("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in keep))

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
                    print(f"dprune: warning: {e}; using the previous checkpoint")
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

    # ---- test hooks (used by the resume and distributed tests)
    def maybe_fault(self, stage: Stage, epoch: int):
        """``DPRUNE_FAULT=stage:epoch`` kills this process (SIGKILL) once, right after that
        epoch's checkpoint, on rank ``DPRUNE_FAULT_RANK`` (default 0)."""
        spec = os.environ.get("DPRUNE_FAULT")
        if not spec or spec != f"{stage.label}:{epoch}":
            return
        if dist.get_rank() != int(os.environ.get("DPRUNE_FAULT_RANK", "0")):
            return
        marker = self.path / ".fault-injected"
        if marker.exists():
            return
        marker.write_text("1")
        os.kill(os.getpid(), signal.SIGKILL)


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
    """Create ``path`` (writing config.yaml) or reopen it. Reopening needs the same config
    (``resume`` aside) and ``resume`` not False; ``saved_config(text) -> dict`` parses the
    saved config.yaml. The returned RunDir says whether the run is already complete."""
    rd = RunDir(path)
    saved = rd.path / "config.yaml"
    if saved.is_file():
        if resume is False:
            raise UserError(f"output.dir {rd.path} already holds a run; pass resume=true or choose "
                            "another dir")
        old = dict(saved_config(saved.read_text()) or {})
        new = dict(config)
        old.pop("resume", None)
        new.pop("resume", None)
        if old != new:
            raise UserError(f"output.dir {rd.path} holds a run with a different config "
                            f"({_first_diff(old, new)}); choose another output.dir")
        if is_complete(rd.path):
            rd.complete = True
            return rd
    elif rd.primary:
        rd.path.mkdir(parents=True, exist_ok=True)
        rd.write_text("config.yaml", config_text)
    dist.barrier()
    return rd


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
