"""Learning-rate schedules, written as text the way the paper's scripts write them.

(Over 400 lines on purpose: the grammar, its parser and one small class per schedule kind
change together.)

Grammar accepted by :func:`parse_schedule` (whitespace is ignored)::

    0:0.01,60:0.001,90:0.0001     step dictionary: LR set at the START of each listed epoch,
                                  the last key holding to the end; keys start at 0, strictly
                                  increasing, every LR > 0
    0.01                          constant (same as ``0:0.01``)
    multistep:0.1:0.1:30/60       LR0 * GAMMA**k after milestone k; becomes the dictionary
                                  ``0:0.1,30:0.01,60:0.001`` (equal to it under ``==``)
    cosine:0.01:0.0001            cosine from LR0 to LRMIN over the run's total epochs,
                                  annealed per iteration; LR0 > 0, 0 <= LRMIN <= LR0
    warmup:5+cosine:0.1:0         linear warmup over the first E epochs (per iteration, from
                                  LR/(E*iters) up to the wrapped schedule's LR), wrapping any
                                  schedule; the wrapped schedule runs on the same epoch clock
    offset:30+cosine:0.1:0        the schedule seen by a run that starts at epoch 30 of the
                                  wrapped one (what :meth:`Schedule.offset` returns for schedules
                                  that are not dictionaries; dictionaries are shifted instead)
    over:120+cosine:0.1:0         the wrapped schedule laid over a run of 120 epochs whatever
                                  the stage's own length (the pretraining part of PxFy: epochs
                                  [0, x) of the overall schedule); a schedule that does not
                                  depend on the run length is returned unwrapped

Epochs are 0-based.  ``Schedule.text`` is the canonical form; schedules compare equal when
their canonical forms are equal, so ``multistep:0.1:0.1:30`` == ``0:0.1,30:0.01``.

PxFy (docs/science.md section 4): prune at epoch x of ONE overall schedule S over T epochs: pretrain
with ``S.over(T)`` for x epochs, then retrain with ``S.offset(x)`` for T - x epochs;
``S.over(T).lr_at(e, total_epochs=x) == S.lr_at(e, total_epochs=T)`` and
``S.offset(x).lr_at(e, total_epochs=T - x) == S.lr_at(x + e, total_epochs=T)``: a cosine anneals
over the whole run.

Scratch-E / Scratch-B train longer than the recipe they derive from: ``S.stretch(f)`` scales every
epoch position of S (milestones, warmup length, offsets) by ``f`` (rounded to whole epochs).

Use in a training loop::

    sched = EpochIterLR(optimizer, parse_schedule("0:0.01,60:0.001"), total_epochs=120,
                        iters_per_epoch=len(loader))
    for epoch in range(120):
        for it, batch in enumerate(loader):
            sched.step(epoch, it)      # before optimizer.step()
            ...
"""
from __future__ import annotations

import math
from typing import Mapping

from distributed_prune.errors import UserError

__all__ = [
    "Schedule", "StepSchedule", "CosineSchedule", "WarmupSchedule", "OffsetSchedule",
    "OverSchedule", "parse_schedule", "EpochIterLR",
]


def _fmt(x: float) -> str:
    """Shortest exact text for a float; integral values lose the trailing '.0'."""
    x = float(x)
    if x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return repr(x)


def _progress(epoch: int, it: int, iters_per_epoch: int) -> float:
    """Fractional epoch position of iteration ``it`` of ``epoch``."""
    if iters_per_epoch < 1:
        raise ValueError(f"iters_per_epoch must be >= 1, got {iters_per_epoch}")
    return epoch + it / iters_per_epoch


class Schedule:
    """A learning-rate schedule; subclasses implement :meth:`lr_at` and :attr:`text`."""

    def lr_at(self, epoch: int, it: int = 0, iters_per_epoch: int = 1,
              total_epochs: int | None = None) -> float:
        """LR for iteration ``it`` (0-based) of ``epoch`` (0-based).

        ``total_epochs`` is required by schedules whose shape depends on the run length (cosine).
        """
        raise NotImplementedError

    @property
    def text(self) -> str:
        """Canonical text; ``parse_schedule(s.text) == s``."""
        raise NotImplementedError

    @property
    def needs_total_epochs(self) -> bool:
        """True when :meth:`lr_at` depends on ``total_epochs`` (cosine, and wrappers of it)."""
        return False

    def first_stage_epochs(self, total_epochs: int) -> int:
        """Length in epochs of the first constant-LR stage (capped at ``total_epochs``).

        For a dictionary this is the second key (``0:0.01,60:0.001`` -> 60); for cosine, which
        has no constant stage, it is defined as the whole run, ``total_epochs``.
        """
        raise NotImplementedError

    def offset(self, x: int) -> "Schedule":
        """The schedule seen by a run starting at epoch ``x`` of this one (PxFy retraining)."""
        x = _check_offset(x)
        if x == 0:
            return self
        return OffsetSchedule(x, self)

    def over(self, total_epochs: int) -> "Schedule":
        """This schedule laid over a run of ``total_epochs`` whatever the stage's own length
        (itself when it does not depend on the run length)."""
        return OverSchedule(total_epochs, self) if self.needs_total_epochs else self

    def stretch(self, factor: float) -> "Schedule":
        """Every epoch position scaled by ``factor`` > 0 (rounded); cosine is already relative."""
        raise NotImplementedError

    def as_dict(self, total_epochs: int) -> dict[int, float]:
        """``{epoch: lr}`` at epoch starts, listing epoch 0 and every epoch where the LR changes.

        For a dictionary schedule this is the dictionary truncated to ``total_epochs``; for cosine
        it lists every epoch.
        """
        out: dict[int, float] = {}
        prev = None
        for e in range(int(total_epochs)):
            lr = self.lr_at(e, 0, 1, total_epochs)
            if lr != prev:
                out[e] = lr
                prev = lr
        return out

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Schedule):
            return self.text == other.text
        if isinstance(other, str):
            try:
                return self.text == parse_schedule(other).text
            except UserError:
                return False
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.text)

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"parse_schedule({self.text!r})"


def _check_factor(f) -> float:
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not (f > 0 and math.isfinite(f)):
        raise ValueError(f"schedule stretch factor must be a finite number > 0, got {f!r}")
    return float(f)


def _check_offset(x) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < 0:
        raise ValueError(f"schedule offset must be an int >= 0, got {x!r}")
    return x


def _need_total(total_epochs, what: str) -> int:
    if total_epochs is None:
        raise ValueError(f"schedule {what!r} needs total_epochs")
    if total_epochs < 1:
        raise ValueError(f"total_epochs must be >= 1, got {total_epochs}")
    return int(total_epochs)


class StepSchedule(Schedule):
    """Piecewise-constant schedule ``{start_epoch: lr}``; the LR changes only at epoch starts."""

    def __init__(self, table: Mapping[int, float]):
        self.table = dict(sorted((int(k), float(v)) for k, v in table.items()))
        if not self.table or next(iter(self.table)) != 0:
            raise ValueError(f"step schedule must start at epoch 0: {self.table}")

    def lr_at(self, epoch, it=0, iters_per_epoch=1, total_epochs=None):
        lr = None
        for start, value in self.table.items():
            if start > epoch:
                break
            lr = value
        return lr if lr is not None else self.table[0]

    @property
    def text(self):
        return ",".join(f"{k}:{_fmt(v)}" for k, v in self.table.items())

    def first_stage_epochs(self, total_epochs):
        keys = list(self.table)
        return min(keys[1], int(total_epochs)) if len(keys) > 1 else int(total_epochs)

    def offset(self, x):
        """Shift the dictionary: the LR in force at epoch ``x`` becomes key 0."""
        x = _check_offset(x)
        table = {0: self.lr_at(x)}
        table.update({k - x: v for k, v in self.table.items() if k > x})
        return StepSchedule(table)

    def as_dict(self, total_epochs):
        return {k: v for k, v in self.table.items() if k < int(total_epochs)}

    def stretch(self, factor):
        f = _check_factor(factor)
        table: dict[int, float] = {}
        for k, v in self.table.items():  # a later key landing on the same epoch wins
            table[int(round(k * f))] = v
        return StepSchedule(table)


class CosineSchedule(Schedule):
    """Cosine annealing from ``lr0`` to ``lr_min`` over the run, per iteration.

    ``lr = lr_min + (lr0 - lr_min) * (1 + cos(pi * t)) / 2`` with ``t = (epoch + it / iters) / T``:
    ``lr0`` at the first iteration, ``lr_min`` reached at the end of training (epoch T).
    """

    def __init__(self, lr0: float, lr_min: float):
        self.lr0, self.lr_min = float(lr0), float(lr_min)

    def lr_at(self, epoch, it=0, iters_per_epoch=1, total_epochs=None):
        total = _need_total(total_epochs, self.text)
        t = min(max(_progress(epoch, it, iters_per_epoch) / total, 0.0), 1.0)
        return self.lr_min + (self.lr0 - self.lr_min) * (1.0 + math.cos(math.pi * t)) / 2.0

    @property
    def text(self):
        return f"cosine:{_fmt(self.lr0)}:{_fmt(self.lr_min)}"

    @property
    def needs_total_epochs(self):
        return True

    def first_stage_epochs(self, total_epochs):
        return int(total_epochs)

    def stretch(self, factor):
        _check_factor(factor)
        return self


class WarmupSchedule(Schedule):
    """Linear warmup over the first ``epochs`` epochs, multiplying the wrapped schedule.

    The factor at global iteration ``k = epoch * iters + it`` is ``(k + 1) / (epochs * iters)``
    while ``k < epochs * iters`` (so it starts near 0 and reaches 1 at epoch ``epochs``).
    """

    def __init__(self, epochs: int, inner: Schedule):
        self.epochs, self.inner = int(epochs), inner

    def lr_at(self, epoch, it=0, iters_per_epoch=1, total_epochs=None):
        lr = self.inner.lr_at(epoch, it, iters_per_epoch, total_epochs)
        k = epoch * iters_per_epoch + it
        n = self.epochs * iters_per_epoch
        return lr * (k + 1) / n if k < n else lr

    @property
    def text(self):
        return f"warmup:{self.epochs}+{self.inner.text}"

    @property
    def needs_total_epochs(self):
        return self.inner.needs_total_epochs

    def first_stage_epochs(self, total_epochs):
        """That of the wrapped schedule (the warmup is part of the first stage)."""
        return self.inner.first_stage_epochs(total_epochs)

    def offset(self, x):
        x = _check_offset(x)
        if x >= self.epochs:  # warmup already over: only the wrapped schedule is left
            return self.inner.offset(x)
        return super().offset(x)

    def stretch(self, factor):
        f = _check_factor(factor)
        return WarmupSchedule(max(1, int(round(self.epochs * f))), self.inner.stretch(f))


class OffsetSchedule(Schedule):
    """``inner`` seen from its epoch ``start``.

    ``lr_at(e, it, n, T) == inner.lr_at(start + e, it, n, start + T)``.
    """

    def __init__(self, start: int, inner: Schedule):
        if isinstance(inner, OffsetSchedule):  # offsets compose additively
            start, inner = start + inner.start, inner.inner
        self.start, self.inner = int(start), inner

    def lr_at(self, epoch, it=0, iters_per_epoch=1, total_epochs=None):
        total = None if total_epochs is None else total_epochs + self.start
        return self.inner.lr_at(epoch + self.start, it, iters_per_epoch, total)

    @property
    def text(self):
        return f"offset:{self.start}+{self.inner.text}"

    @property
    def needs_total_epochs(self):
        return self.inner.needs_total_epochs

    def first_stage_epochs(self, total_epochs):
        n = self.inner.first_stage_epochs(int(total_epochs) + self.start) - self.start
        return min(max(n, 0), int(total_epochs))

    def offset(self, x):
        x = _check_offset(x)
        return self if x == 0 else OffsetSchedule(self.start + x, self.inner)

    def stretch(self, factor):
        f = _check_factor(factor)
        return self.inner.stretch(f).offset(int(round(self.start * f)))


class OverSchedule(Schedule):
    """``inner`` over a run of ``total`` epochs, whatever ``total_epochs`` the stage passes.

    ``lr_at(e, it, n, T') == inner.lr_at(e, it, n, total)``: the pretraining part of PxFy runs the
    first x epochs of a schedule that spans the whole run.
    """

    def __init__(self, total: int, inner: Schedule):
        if isinstance(inner, OverSchedule):
            inner = inner.inner
        self.total, self.inner = _need_total(total, inner.text), inner

    def lr_at(self, epoch, it=0, iters_per_epoch=1, total_epochs=None):
        return self.inner.lr_at(epoch, it, iters_per_epoch, self.total)

    @property
    def text(self):
        return f"over:{self.total}+{self.inner.text}"

    def first_stage_epochs(self, total_epochs):
        return min(self.inner.first_stage_epochs(self.total), int(total_epochs))

    def over(self, total_epochs):
        return self.inner.over(total_epochs)

    def stretch(self, factor):
        f = _check_factor(factor)
        return self.inner.stretch(f).over(int(round(self.total * f)))


# ----------------------------------------------------------------------------------- parsing

def _bad(text: str, why: str) -> UserError:
    return UserError(f"bad LR schedule {text!r}: {why}")


def _float(field: str, whole: str) -> float:
    try:
        v = float(field)
    except ValueError:
        raise _bad(whole, f"{field!r} is not a number") from None
    if not math.isfinite(v):
        raise _bad(whole, f"{field!r} is not a finite number")
    return v


def _int(field: str, whole: str, what: str) -> int:
    try:
        v = int(field)
    except ValueError:
        raise _bad(whole, f"{what} {field!r} is not an integer") from None
    return v


def _parse(text: str, whole: str) -> Schedule:
    if not text:
        raise _bad(whole, "empty schedule")
    head = text.split(":", 1)[0].lower()
    if head in ("warmup", "offset", "over"):
        prefix, sep, rest = text.partition("+")
        fields = prefix.split(":")
        if not sep or len(fields) != 2:
            raise _bad(whole, f"expected '{head}:EPOCHS+<schedule>'")
        n = _int(fields[1], whole, f"{head} epochs")
        if head == "warmup":
            if n < 1:
                raise _bad(whole, f"warmup epochs must be >= 1, got {n}")
            return WarmupSchedule(n, _parse(rest, whole))
        if head == "over":
            if n < 1:
                raise _bad(whole, f"over epochs must be >= 1, got {n}")
            return _parse(rest, whole).over(n)
        if n < 0:
            raise _bad(whole, f"offset must be >= 0, got {n}")
        return _parse(rest, whole).offset(n)
    if head == "cosine":
        fields = text.split(":")
        if len(fields) != 3:
            raise _bad(whole, "expected 'cosine:LR0:LRMIN'")
        lr0, lr_min = (_float(f, whole) for f in fields[1:])
        if lr0 <= 0:
            raise _bad(whole, f"LR0 must be > 0, got {fields[1]}")
        if not 0 <= lr_min <= lr0:
            raise _bad(whole, f"LRMIN must be in [0, LR0], got {fields[2]}")
        return CosineSchedule(lr0, lr_min)
    if head == "multistep":
        fields = text.split(":")
        if len(fields) != 4 or not fields[3]:
            raise _bad(whole, "expected 'multistep:LR0:GAMMA:M1/M2/...'")
        lr0, gamma = (_float(f, whole) for f in fields[1:3])
        if lr0 <= 0 or gamma <= 0:
            raise _bad(whole, "LR0 and GAMMA must be > 0")
        ms = [_int(m, whole, "milestone") for m in fields[3].split("/")]
        if ms[0] < 1 or any(b <= a for a, b in zip(ms, ms[1:])):
            raise _bad(whole, "milestones must be >= 1 and strictly increasing")
        table = {0: lr0}
        # round to 12 significant digits so that 0.1 * 0.1 prints (and compares) as 0.01
        table.update({m: float(f"{lr0 * gamma ** (k + 1):.12g}") for k, m in enumerate(ms)})
        return StepSchedule(table)
    if ":" not in text:  # bare float: constant
        lr = _float(text, whole)
        if lr <= 0:
            raise _bad(whole, f"LR must be > 0, got {text}")
        return StepSchedule({0: lr})
    table: dict[int, float] = {}
    prev = -1
    for item in text.split(","):
        key, sep, value = item.partition(":")
        if not sep or ":" in value:
            raise _bad(whole, f"entry {item!r} is not 'EPOCH:LR'")
        epoch = _int(key, whole, "epoch")
        lr = _float(value, whole)
        if not table and epoch != 0:
            raise _bad(whole, f"must start at epoch 0, starts at {epoch}")
        if epoch <= prev:
            raise _bad(whole, f"epochs must be strictly increasing ({epoch} after {prev})")
        if lr <= 0:
            raise _bad(whole, f"LR at epoch {epoch} must be > 0, got {value}")
        table[epoch] = lr
        prev = epoch
    return StepSchedule(table)


def parse_schedule(text: "str | float | Schedule") -> Schedule:
    """Parse schedule text (grammar in the module docstring); raise UserError naming what is wrong.

    A number (YAML may deliver ``0.01`` as a float) is a constant schedule; a :class:`Schedule`
    is returned unchanged.
    """
    if isinstance(text, Schedule):
        return text
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        text = repr(float(text))
    if not isinstance(text, str):
        raise UserError(f"bad LR schedule {text!r}: expected text such as '0:0.01,60:0.001'")
    return _parse("".join(text.split()), text)


# ------------------------------------------------------------------------------------ driver

class EpochIterLR:
    """Sets the LR of every param group from a :class:`Schedule` at (epoch, iteration).

    Each group's LR is ``schedule.lr_at(...) * group.get("lr_scale", 1.0)``.  Call
    :meth:`step` before each ``optimizer.step()``; the constructor sets the LR of (0, 0).
    """

    def __init__(self, optimizer, schedule, total_epochs: int, iters_per_epoch: int):
        if total_epochs < 1 or iters_per_epoch < 1:
            raise ValueError(f"total_epochs ({total_epochs}) and iters_per_epoch "
                             f"({iters_per_epoch}) must be >= 1")
        self.optimizer = optimizer
        self.schedule = parse_schedule(schedule)
        self.total_epochs = int(total_epochs)
        self.iters_per_epoch = int(iters_per_epoch)
        self.last_epoch, self.last_it, self.last_lr = 0, 0, 0.0
        self.step(0, 0)

    def step(self, epoch: int, it: int = 0) -> float:
        """Apply the LR of iteration ``it`` of ``epoch``; return the unscaled LR."""
        lr = self.schedule.lr_at(epoch, it, self.iters_per_epoch, self.total_epochs)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.last_epoch, self.last_it, self.last_lr = epoch, it, lr
        return lr

    def get_last_lr(self) -> list[float]:
        """Per-group LRs currently set (as torch's schedulers report them)."""
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"schedule": self.schedule.text, "total_epochs": self.total_epochs,
                "iters_per_epoch": self.iters_per_epoch, "last_epoch": self.last_epoch,
                "last_it": self.last_it}

    def load_state_dict(self, state: dict) -> None:
        """Restore the position and re-apply its LR.

        A checkpoint written under a different schedule is refused (UserError): resuming with
        another schedule would silently change the comparison setup.
        """
        saved = parse_schedule(state["schedule"])
        if saved != self.schedule or state["total_epochs"] != self.total_epochs:
            raise UserError(
                f"checkpoint LR schedule {saved.text!r} over {state['total_epochs']} epochs does "
                f"not match the run's {self.schedule.text!r} over {self.total_epochs} epochs")
        self.iters_per_epoch = int(state["iters_per_epoch"])
        self.step(int(state["last_epoch"]), int(state["last_it"]))
