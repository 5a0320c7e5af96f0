"""One training stage: ``epochs`` epochs of :func:`.loop.train_epoch` with an engine, an LR
schedule, an optional regularizer, evaluation and per-epoch hooks.

Pretraining, the regularization phase, iterative-pruning cycles and retraining are all this
function with different arguments. What happens after each epoch (logging, checkpointing, JSV,
anything a caller adds) is a list of hooks receiving an :class:`EpochEnd`; hooks run in order
on every rank, and may add keys to ``row`` before a later hook logs it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from ..errors import TrainingDiverged, UserError
from .compact import CompactEngine
from .engine import build_engine
from .loop import train_epoch
from .optim import build_optimizer
from .schedules import EpochIterLR, parse_schedule

__all__ = ["EngineSettings", "OptimSettings", "EpochEnd", "EpochHook", "train_epochs",
           "rng_state", "set_rng_state", "setup_backends", "micro_batch"]


@dataclass(frozen=True)
class EngineSettings:
    """How the model is wrapped and stepped (``dist.*`` and ``train.*`` of a config)."""
    device: torch.device
    name: str = "ddp"
    amp: str = "none"
    sync_bn: bool = False
    bucket_cap_mb: int = 25
    static_graph: bool = False
    compile: bool = False
    grad_accum: int = 1
    ds_config: Optional[str] = None
    micro_batch: Optional[int] = None
    world_size: int = 1
    channels_last: bool = False


@dataclass(frozen=True)
class OptimSettings:
    """The optimizer of one stage (``pretrain.*`` / ``retrain.*`` of a config)."""
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    label_smoothing: float = 0.0

    @classmethod
    def of(cls, stage_cfg) -> "OptimSettings":
        return cls(stage_cfg.optimizer, stage_cfg.momentum, stage_cfg.weight_decay,
                   stage_cfg.nesterov, stage_cfg.label_smoothing)


@dataclass
class EpochEnd:
    """What an epoch hook sees after epoch ``epoch`` (0-based) of ``epochs``."""
    stage: str
    epoch: int
    epochs: int
    row: dict                       # the metrics row; hooks may add keys
    module: nn.Module               # the unwrapped model being trained
    training_state: Callable[[], dict] = field(repr=False)
    """engine / LR-driver / RNG state for a checkpoint. A collective under DeepSpeed ZeRO (it
    gathers the partitioned optimizer state): call it on every rank or on none."""
    stop: bool = False
    """Set by a hook to end the stage after this epoch (e.g. an end condition of a
    regularization phase); every rank must decide the same."""


EpochHook = Callable[[EpochEnd], None]


def train_epochs(model: nn.Module, train_loader, *, stage: str, epochs: float, schedule: str,
                 optim: OptimSettings, engine: EngineSettings,
                 evaluate: Callable[[nn.Module], float], start_epoch: int = 0,
                 resume: Optional[dict] = None, regularizer=None,
                 hooks: Sequence[EpochHook] = (), progress: bool = False,
                 step_hook: Optional[Callable[[nn.Module, int], None]] = None,
                 compact=None) -> nn.Module:
    """Train epochs ``start_epoch .. ceil(epochs)-1``; returns the plain (unwrapped) module.

    A fractional ``epochs`` cuts the last epoch to that fraction of its iterations (Scratch-B's
    exact budget). ``resume``: the training state of the checkpoint resumed from (engine, lr, rng,
    and the regularizer's state), or None. ``regularizer``: a GReg / TPP object
    (:mod:`distributed_prune.prune.regularize`): ``step(it, module)`` before each forward,
    ``loss(module)`` added to the task loss, ``apply_(module)`` after backward,
    ``after_step(module)`` after the optimizer step; the stage ends as soon as ``done`` (rows
    then carry ``reg``, ``iterations`` and ``epochs_done``). ``evaluate(module) -> top1`` runs
    after each epoch. ``step_hook(module, iteration)`` runs after backward and before each
    optimizer step, after the regularizer's gradient (the masked phase's mask updates);
    ``iteration`` counts optimizer steps from the stage's start. ``compact``: a gradual
    :class:`~distributed_prune.prune.masked.MaskedPhase` with ``execution="compact"`` over
    ``model``: the stage trains the cut model of its masks (:mod:`.compact`; it takes the place
    of ``step_hook``), and hooks, checkpoints and the returned module see the full model."""
    n_epochs = math.ceil(round(epochs, 9))
    if epochs <= 0 or start_epoch >= n_epochs:
        return model
    model.to(engine.device)
    if engine.channels_last:
        model.to(memory_format=torch.channels_last)
    sched = parse_schedule(schedule)

    def build(m):
        m.to(engine.device)
        if engine.channels_last:
            m.to(memory_format=torch.channels_last)
        opt = build_optimizer(m, name=optim.optimizer, lr=sched.lr_at(0, total_epochs=n_epochs),
                              momentum=optim.momentum, weight_decay=optim.weight_decay,
                              nesterov=optim.nesterov)
        return build_engine(engine.name, m, opt, device=engine.device, amp=engine.amp,
                            sync_bn=engine.sync_bn, bucket_cap_mb=engine.bucket_cap_mb,
                            static_graph=engine.static_graph, compile=engine.compile,
                            grad_accum=engine.grad_accum, ds_config=engine.ds_config,
                            micro_batch=engine.micro_batch, world_size=engine.world_size)

    if compact is None:
        eng = build(model)
    else:
        if step_hook is not None or regularizer is not None or engine.name != "ddp":
            raise UserError("compact execution runs a masked phase alone, on the ddp engine")
        eng = CompactEngine(model, compact, build)
        step_hook = eng.step_hook
    iters = max(1, -(-len(train_loader) // engine.grad_accum))
    total_iters = round(epochs * iters)
    lr_driver = EpochIterLR(eng, schedule, n_epochs, iters)
    if resume is not None:
        eng.load_state_dict(resume["engine"])
        lr_driver.load_state_dict(resume["lr"])
        set_rng_state(resume["rng"])
        if regularizer is not None:
            regularizer.load_state_dict(resume["reg_state"])
    loop_hooks = regularizer_hooks(regularizer, eng.module)
    if step_hook is not None:
        module, inner = eng.module, loop_hooks.get("grad_hook")

        def grad_hook(it):  # the regularizer's penalty gradient (if any), then the mask update
            if inner is not None:
                inner(it)
            step_hook(module, it)
        loop_hooks["grad_hook"] = grad_hook

    def training_state():
        state = {"engine": eng.state_dict(), "lr": lr_driver.state_dict(), "rng": rng_state()}
        if regularizer is not None:
            state.update(reg_state=regularizer.state_dict(), reg_done=regularizer.done)
        return state

    for epoch in range(start_epoch, n_epochs):
        t0 = time.time()
        _set_epoch(train_loader, epoch)
        stats = train_epoch(eng, train_loader, epoch=epoch, lr_driver=lr_driver,
                            grad_accum=engine.grad_accum, label_smoothing=optim.label_smoothing,
                            channels_last=engine.channels_last, iteration0=epoch * iters,
                            progress=progress, desc=f"{stage} {epoch + 1}/{n_epochs}",
                            max_iterations=total_iters - epoch * iters, **loop_hooks)
        if stats.get("nonfinite_step") is not None:   # the same on every rank (all-reduced)
            raise TrainingDiverged(
                f"{stage} epoch {epoch} (as in metrics.jsonl), step {stats['nonfinite_step']} of "
                f"{iters}: the training loss is not finite; stopped, the newest checkpoint is the "
                "last good one (lower the learning rate?)")
        # the loss all-reduce in train_epoch synchronised the device: this is the training time
        train_s = time.time() - t0
        eng.sync_buffers()  # rank 0's BN statistics on every rank: eval == checkpoint
        top1 = evaluate(eng.module)   # compact: the cut model, which computes the masked one
        module = eng.full_module() if compact is not None else eng.module
        row = {"stage": stage, "epoch": epoch, "lr": sched.lr_at(epoch, total_epochs=n_epochs),
               "train_loss": stats["train_loss"], "train_top1": stats["train_top1"], "top1": top1,
               "time_s": round(time.time() - t0, 3),
               "images_per_s": round(stats["samples"] / max(train_s, 1e-9), 1)}
        if regularizer is not None:
            row.update(reg=regularizer.reg, iterations=regularizer.iteration + 1,
                       epochs_done=(regularizer.iteration + 1) / iters)
        end = EpochEnd(stage, epoch, n_epochs, row, module, training_state)
        for hook in hooks:
            hook(end)
        if end.stop or (regularizer is not None and regularizer.done):
            break
    model = eng.finish()  # the plain module (DeepSpeed: fp32 master weights, hooks removed)
    del eng
    return model


def regularizer_hooks(regularizer, module) -> dict:
    """train_epoch's hooks for a regularizer: its schedule advances before each forward (as in
    the authors' loops), TPP's Gram loss joins the task loss, the L2 penalty's gradient is added
    after backward, TPP zeroes pruned filters after the step, and the epoch ends when done."""
    if regularizer is None:
        return {}

    def after_step(it):
        regularizer.after_step(module)
        return regularizer.done

    return {"step_hook": lambda it: regularizer.step(it, module),
            "extra_loss": lambda: regularizer.loss(module),
            "grad_hook": lambda it: regularizer.apply_(module),
            "after_step": after_step}


def _set_epoch(loader, epoch):
    if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    elif hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)


def rng_state() -> dict:
    s = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def set_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def setup_backends(device: torch.device, *, seed: int, cudnn_benchmark: bool, deterministic: bool):
    """Seed, cuDNN autotuning and TF32 on CUDA, deterministic algorithms if asked."""
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cudnn_benchmark and not deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def micro_batch(batch_size: int, world_size: int, grad_accum: int) -> int:
    """Per-rank, per-micro-step batch of a global ``batch_size``."""
    denom = world_size * grad_accum
    if batch_size % denom:
        raise UserError(f"data.batch_size={batch_size} is not divisible by world size x "
                        f"train.grad_accum = {denom}")
    return batch_size // denom
