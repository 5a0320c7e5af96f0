"""Masked pruning phases: channels are zeroed during training, the physical cut comes at the end.

Two update rules share one component, :class:`MaskedPhase`:

* ``gradual`` - gradual pruning with hard masks (Zhu and Gupta, 2017).  Every
  ``update_interval`` iterations the importance of ALL prunable groups is recomputed (one
  ``filter_norms`` call, one host transfer) and each group's pruned count follows a ramp from 0
  to its target over the first ``ramp_fraction`` of the phase: ``cubic`` (the paper's
  ``k_t = K (1 - (1 - t/T)^3)``) or ``linear``.  A masked channel stays masked: new ones are
  the lowest-scored among the still-active channels.  Masks are enforced by
  :class:`~.mask.ChannelMasks` (weights re-zeroed before each forward, gradients zeroed) and,
  for plain Conv2d layers, by :class:`~distributed_prune.kernels.MaskedConv2d`, whose kernel
  skips the masked channels; or, with ``execution="compact"``, not put on the model at all:
  :mod:`distributed_prune.train.compact` trains the cut model of the masks (:mod:`.compact`)
  and the model here only holds the full-shaped weights at each update.
* ``soft`` - soft filter pruning (He et al., IJCAI 2018).  At every update (once per epoch) the
  lowest-scored channels of each group, up to its full target, are zeroed; nothing stops them
  from training, so they get updates and may come back at the next update.

At the end (:meth:`MaskedPhase.finish`) a last update fixes the final masks, the pruned weights
are zeroed and the result is a :class:`~.plan.Plan`: the physical cut of that plan computes
exactly what the masked model computes.

Distributed: every rank computes the same scores from the same (all-reduced) weights; the
resulting masks are hash-checked across ranks at each update.  Between updates nothing reads
device memory from the host.  The state (:meth:`state_dict`) is plain JSON for checkpoints.
"""
from __future__ import annotations

import hashlib
import json
import math

import torch
import torch.nn as nn

from .. import dist
from ..errors import UserError
from . import importance as imp
from .groups import Graph
from .mask import ChannelMasks, conv_masks, mask_targets, use_masked_conv
from .plan import GroupPlan, Plan, example_for
from .ratios import PRUNABLE_TYPES

__all__ = ["KINDS", "SCHEDULES", "ramp", "MaskedPhase", "resolve_execution"]

KINDS = ("gradual", "soft")
EXECUTIONS = ("masked", "compact")
SCHEDULES = ("cubic", "linear")
STATE_VERSION = 1


def ramp(progress: float, schedule: str) -> float:
    """Fraction of the target reached at ``progress`` in [0, 1] of the ramp."""
    p = min(1.0, max(0.0, float(progress)))
    if schedule == "cubic":
        return 1.0 - (1.0 - p) ** 3
    if schedule == "linear":
        return p
    raise UserError(f"prune.masked.schedule: unknown schedule {schedule!r} "
                    f"({', '.join(SCHEDULES)})")


class MaskedPhase:
    """Mask state and update rule of one masked phase over ``model`` (the unwrapped module).

    ``plan``: the decision - its groups, their sizes and target pruned counts (``n - len(keep)``)
    and the ratios; the kept channels of the plan are not used (the phase chooses them).
    ``total_iterations``: optimizer steps in the phase; ``update_interval``: steps between
    updates (soft: the steps of one epoch); ``kernel``: ``auto`` / ``masked_conv`` / ``hooks``
    as in :func:`~.mask.apply_masks` (gradual only).  ``execution``: ``masked`` puts the masks on
    the model given to the updates (hooks and masked-conv kernels); ``compact`` (gradual only)
    leaves that model as storage of the full-shaped weights, with the masked entries zero,
    while :mod:`distributed_prune.train.compact` trains the cut model of the current masks.
    """

    def __init__(self, model: nn.Module, plan: Plan, *, kind: str = "gradual",
                 criterion: str = "l1", schedule: str = "cubic", update_interval: int = 100,
                 total_iterations: int = 1, ramp_fraction: float = 0.75, kernel: str = "auto",
                 execution: str = "masked"):
        if kind not in KINDS:
            raise UserError(f"prune.masked.kind: unknown kind {kind!r} ({', '.join(KINDS)})")
        if criterion not in imp.NORM_CRITERIA or criterion == "taylor":
            raise UserError(f"prune.masked.criterion must be l1 or l2, got {criterion!r}")
        ramp(0.0, schedule)  # validates the name
        if update_interval < 1 or total_iterations < 1:
            raise UserError(f"prune.masked: update_interval and the phase's iterations must be "
                            f">= 1, got {update_interval} and {total_iterations}")
        if execution not in EXECUTIONS or (execution == "compact" and kind != "gradual"):
            raise UserError(f"prune.masked.execution: {execution!r} is not available for "
                            f"prune.method={kind} (gradual: {', '.join(EXECUTIONS)}; soft: masked)")
        if not 0.0 < ramp_fraction <= 1.0:
            raise UserError(f"prune.masked.ramp_fraction must be in (0, 1], got {ramp_fraction}")
        self.kind, self.criterion, self.schedule = kind, criterion, schedule
        self.update_interval, self.total_iterations = int(update_interval), int(total_iterations)
        self.ramp_fraction, self.kernel = float(ramp_fraction), kernel
        self.execution = execution
        self.plan = plan
        self.targets = {g.root: g.n - len(g.keep) for g in plan.groups}
        self.pruned: dict[str, list[int]] = {g.root: [] for g in plan.groups}
        self.iteration = 0          # iterations completed in this phase
        self.updates = 0
        self.history: list[dict] = []   # per update: iteration, pruned channels, mask hash
        graph = Graph(model, example_for(plan, model))
        # members of every group with ALL root channels: the channel map of each member, traced
        # once (the model's forward may use MaskedConv2d later; tracing it again is not needed)
        self._members = {g.root: graph.members(g.root) for g in plan.groups}
        self._masks: ChannelMasks | None = None
        self._swapped: dict[str, nn.Module] = {}
        self._applied = False       # the current masks are on the model

    # ------------------------------------------------------------------ schedule
    def target_at(self, iteration: int) -> dict[str, int]:
        """Pruned channels per group at ``iteration`` (gradual: the ramp; soft: the target)."""
        if self.kind == "soft":
            return dict(self.targets)
        end = max(1, math.ceil(self.ramp_fraction * self.total_iterations))
        f = ramp(iteration / end, self.schedule)
        return {r: min(k, int(math.floor(f * k + 1e-9))) for r, k in self.targets.items()}

    def due(self, iteration: int) -> bool:
        """Whether an update runs before the step ``iteration`` (0-based in the phase)."""
        return iteration % self.update_interval == 0

    # ------------------------------------------------------------------ updates
    def _scores(self, model: nn.Module) -> dict[str, torch.Tensor]:
        roots = list(self.targets)
        groups = [(r, self._members[r], _n_out(model, r)) for r in roots]
        return dict(zip(roots, imp.score_groups(self.criterion, groups)))

    def update(self, model: nn.Module, iteration: int, *, final: bool = False) -> None:
        """Rescore every group and move the masks to the schedule's count for ``iteration``
        (``final``: to the full target).  Call before the step ``iteration``."""
        want = dict(self.targets) if final else self.target_at(iteration)
        scores = self._scores(model)
        new = {}
        for root, k in want.items():
            s = scores[root]
            if self.kind == "gradual":
                keep_pruned = self.pruned[root]
                extra = max(0, k - len(keep_pruned))
                if extra:
                    active = torch.ones(len(s), dtype=torch.bool)
                    active[keep_pruned] = False
                    cand = torch.nonzero(active).view(-1)
                    order = torch.argsort(s[cand], stable=True)
                    keep_pruned = sorted(keep_pruned + [int(i) for i in cand[order[:extra]]])
                new[root] = keep_pruned
            else:
                new[root] = imp.select_pruned(s, k)
        self.pruned = new
        self.updates += 1
        sha = self.mask_sha256()
        hashes = dist.all_gather_object(sha)
        if len(set(hashes)) != 1:
            raise RuntimeError(f"masked phase: mask hashes differ across ranks at iteration "
                               f"{iteration}: {hashes}")
        self.history.append({"iteration": int(iteration), "pruned": self.n_pruned(),
                             "sha256": sha})
        self._apply(model)

    def pending(self, iteration: int) -> bool:
        """Whether :meth:`step` at ``iteration`` runs an update (host-side arithmetic only)."""
        if not self.due(iteration):
            return False
        # gradual: the ramp finished or is flat here, and the masks are on: nothing changes
        return not (self.kind == "gradual" and self._applied and self.target_at(iteration) == {
            r: len(p) for r, p in self.pruned.items()})

    def step(self, model: nn.Module, iteration: int) -> bool:
        """Call once before each optimizer step ``iteration`` of the phase; updates when due.
        Returns whether an update ran (only then is the host synchronised)."""
        self.iteration = int(iteration)
        if not self.pending(iteration):
            return False
        self.update(model, iteration)
        return True

    # ------------------------------------------------------------------ masks on the model
    def member_channels(self, root: str):
        """(module name, "out"/"in", member channel indices) for the pruned root channels."""
        pruned = set(self.pruned[root])
        for mb in self._members[root]:
            idxs = [i for i, r in zip(mb.idxs, mb.root_idxs) if r in pruned]
            if idxs:
                yield mb.name, mb.dim, sorted(set(idxs))

    @torch.no_grad()
    def _apply(self, model: nn.Module) -> None:
        if self.kind == "soft":
            # zero the pruned filters once; they keep training and may come back.  Only the
            # conv/linear filters, as in SFP: zeroing the following BN's affine parameters too
            # would also zero the filters' gradient (dL/dw flows through gamma)
            self._build_masks(model, filters_only=True).zero_()
            return
        self._applied = True
        if self.execution == "compact":
            # the model only stores the weights between the cut models' segments
            # (train.compact): the masked entries are zero in it, nothing runs through it
            self._build_masks(model).zero_()
            return
        if self._masks is not None:
            self._masks.remove()
        if _use_kernel(model, self.kernel):
            self._set_masked_convs(model)
        masks = self._build_masks(model)
        masks.install()
        masks.zero_grads_()
        self._masks = masks

    def _build_masks(self, model: nn.Module, filters_only: bool = False) -> ChannelMasks:
        masks = ChannelMasks()
        for root in self.pruned:
            for name, dim, idxs in self.member_channels(root):
                mod = model.get_submodule(name)
                if filters_only and (dim != "out" or not isinstance(mod, PRUNABLE_TYPES)):
                    continue
                for pname, d, ix in mask_targets(mod, dim, idxs, name):
                    masks.add(mod, pname, d, ix)
        return masks

    def _set_masked_convs(self, model: nn.Module) -> None:
        """Plain groups=1 Conv2d members become MaskedConv2d (same Parameters) on first use;
        their masks are then updated in place (the index cache follows set_masks)."""
        from ..kernels import MaskedConv2d

        outs: dict[str, set] = {}
        ins: dict[str, set] = {}
        for root in self.pruned:
            for mb in self._members[root]:
                m = model.get_submodule(mb.name)
                if isinstance(m, nn.Conv2d) and m.groups == 1:
                    (outs if mb.dim == "out" else ins).setdefault(mb.name, set())
            for name, dim, idxs in self.member_channels(root):
                if name in outs or name in ins:
                    (outs if dim == "out" else ins).setdefault(name, set()).update(idxs)
        for name in sorted(set(outs) | set(ins)):
            conv = model.get_submodule(name)
            out_mask, in_mask = conv_masks(conv, outs.get(name, ()), ins.get(name))
            if isinstance(conv, MaskedConv2d):
                conv.set_masks(out_mask, in_mask)
                continue
            new = MaskedConv2d.from_conv(conv, out_mask, in_mask)
            # the masks are phase state (state_dict keys stay those of nn.Conv2d)
            new._non_persistent_buffers_set.update({"out_mask", "in_mask"})
            _set_submodule(model, name, new)
            self._swapped[name] = new

    def _unswap(self, model: nn.Module) -> None:
        """MaskedConv2d back to nn.Conv2d (same Parameters) before the physical cut."""
        for name, m in self._swapped.items():
            conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride,
                             padding=m.padding, dilation=m.dilation, groups=m.groups,
                             bias=m.bias is not None, padding_mode=m.padding_mode, device="meta")
            conv.weight, conv.bias = m.weight, m.bias
            conv.train(m.training)
            _set_submodule(model, name, conv)
        self._swapped = {}

    def begin(self, model: nn.Module) -> None:
        """Put the current masks on ``model`` (at the start of the phase, or after a resume).
        Soft: nothing to put back - its zeroing is a one-time event at each update and the
        checkpointed weights already hold what training did since (zeroing them again would
        undo the updates the pruned filters received)."""
        if self.kind == "gradual" and any(self.pruned.values()):
            self._apply(model)

    def finish(self, model: nn.Module) -> Plan:
        """Final update (full targets), zero the pruned channels, remove hooks and kernels;
        return the plan whose physical cut equals the masked model."""
        if self.kind == "soft" or any(len(self.pruned[r]) != k for r, k in self.targets.items()):
            self.update(model, self.iteration, final=True)
        masks = self._build_masks(model)
        masks.zero_()
        if self._masks is not None:
            self._masks.remove()
            self._masks = None
        self._unswap(model)
        return self.final_plan()

    def final_plan(self) -> Plan:
        p = self.plan
        groups = [GroupPlan(g.root, g.n, [i for i in range(g.n) if i not in set(self.pruned[g.root])],
                            g.ratio, list(g.members)) for g in p.groups]
        return Plan(groups, list(p.input_shape), p.criterion, p.ratios, p.pick, p.round_to,
                    dict(p.layer_ratios))

    # ------------------------------------------------------------------ state
    def n_pruned(self) -> int:
        return sum(len(v) for v in self.pruned.values())

    def mask_sha256(self) -> str:
        """Hash of the masks (roots and pruned channels): equal on every rank or a bug."""
        key = json.dumps(sorted((r, list(v)) for r, v in self.pruned.items()))
        return hashlib.sha256(key.encode()).hexdigest()

    def state_dict(self) -> dict:
        """JSON-serialisable state for checkpoints."""
        return {"version": STATE_VERSION, "kind": self.kind, "schedule": self.schedule,
                "criterion": self.criterion, "iteration": self.iteration,
                "updates": self.updates, "pruned": {r: list(v) for r, v in self.pruned.items()},
                "history": list(self.history), "sha256": self.mask_sha256()}

    def load_state_dict(self, state: dict, model: nn.Module | None = None) -> None:
        """Restore :meth:`state_dict` (and put the masks on ``model`` when given)."""
        try:
            if state.get("version") != STATE_VERSION or state["kind"] != self.kind:
                raise ValueError("version or kind differs")
            pruned = {r: [int(i) for i in v] for r, v in state["pruned"].items()}
            if set(pruned) != set(self.targets):
                raise ValueError("the groups differ from this phase's plan")
            self.pruned = pruned
            self.iteration = int(state["iteration"])
            self.updates = int(state["updates"])
            self.history = list(state.get("history", []))
            if state.get("sha256") not in (None, self.mask_sha256()):
                raise ValueError("mask hash mismatch")
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"masked phase: cannot restore the checkpointed mask state ({e})") \
                from None
        if model is not None:
            self.begin(model)


def resolve_execution(execution: str, kind: str, engine: str) -> str:
    """``prune.masked.execution`` resolved: ``auto`` is ``compact`` for gradual pruning on the
    ddp engine (one process or DDP), ``masked`` for soft pruning (its zeroed filters keep
    training: the dense model by design) and under DeepSpeed (its engine partitions the
    optimizer state at construction; rebuilding it at every mask update is not done)."""
    can = kind == "gradual" and engine == "ddp"
    if execution == "auto":
        return "compact" if can else "masked"
    if execution == "compact" and not can:
        raise UserError(f"prune.masked.execution=compact needs prune.method=gradual and "
                        f"dist.engine=ddp (got {kind}, {engine}); use masked or auto")
    return execution


def _n_out(model: nn.Module, name: str) -> int:
    m = model.get_submodule(name)
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _use_kernel(model: nn.Module, kernel: str) -> bool:
    return use_masked_conv(model, kernel)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
