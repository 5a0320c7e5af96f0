"""TensorBoard logging of a run (``output.tensorboard: true``; needs the ``tensorboard`` extra).

One scalar per numeric value of each metrics.jsonl row, tagged ``<stage>/<key>`` at step
``epoch`` (``retrain/top1``, ``retrain/train_loss``, ``retrain/lr``, ``prune/reg``,
``retrain/jsv_mean``, ``retrain/images_per_s``, ...), so the event file holds exactly what
metrics.jsonl holds; the resolved config is stored as text (tag ``config``). Only the primary
rank writes, under ``<run dir>/tensorboard``:

    tensorboard --logdir runs/            # every run below runs/, one curve per run

Resuming: the run directory first cuts metrics.jsonl back to the checkpoint it resumes from, then
opens this log with the rows it kept; the log deletes its old event files and writes those rows
again, so an epoch that is redone after a crash appears once, never twice.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from . import dist
from .errors import UserError

EVENT_GLOB = "events.out.tfevents.*"
_NOT_SCALARS = ("stage", "epoch")


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def require() -> None:
    """UserError (exit 2) when TensorBoard logging is asked for but tensorboard is missing."""
    if not available():
        raise UserError("output.tensorboard: the tensorboard package is not installed "
                        "(pip install 'distributed_prune[tensorboard]')")


class TensorBoardLog:
    """``log_row(row)`` per metrics row, ``close()`` at the end; a no-op off the primary rank."""

    def __init__(self, log_dir, config_text: str | None = None, rows: Iterable[dict] = ()):
        self.log_dir = Path(log_dir)
        self.writer = None
        if not dist.is_primary():
            return
        require()
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir.mkdir(parents=True, exist_ok=True)
        for old in self.log_dir.glob(EVENT_GLOB):  # rewritten below from the rows kept
            old.unlink()
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        if config_text:
            # four-space indent: TensorBoard renders text as markdown, this keeps the YAML verbatim
            self.writer.add_text("config", "\n".join("    " + line for line in config_text.splitlines()), 0)
        for row in rows:
            self._add(row)
        self.writer.flush()

    def _add(self, row: dict) -> None:
        stage, epoch = row.get("stage"), row.get("epoch")
        if stage is None or epoch is None:
            return
        for key, value in row.items():
            if key in _NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            self.writer.add_scalar(f"{stage}/{key}", value, int(epoch))  # NaN too: a diverged run shows

    def log_row(self, row: dict) -> None:
        if self.writer is not None:
            self._add(row)
            self.writer.flush()  # one row per epoch: visible in TensorBoard while the run goes on

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
