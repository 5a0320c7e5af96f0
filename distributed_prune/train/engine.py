"""Engines: how a model is wrapped, how a loss is backpropagated and how a step is taken.

Built AFTER surgery (a DDP reducer or a DeepSpeed ZeRO partition is tied to parameter shapes).
``DDPEngine`` also serves a single process (no wrapper). ``DeepSpeedEngine`` is the only place that
imports deepspeed. Both expose the same small API, used by :mod:`.loop`.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from .. import dist
from ..dtypes import amp_dtype
from ..errors import UserError
from ..registry import Registry

#: ``dist.engine`` -> engine class (``cls(model, optimizer, *, device, amp, ...)``).
ENGINES: Registry[type] = Registry("engine", "dist.engine")


def fast_path(device: str = "auto") -> dict:
    """What ``train.amp`` / ``train.channels_last`` = ``auto`` resolve to for ``train.device``:
    bf16 autocast + channels_last on a CUDA device with native bf16 (compute capability >= 8.0:
    Ampere, Hopper, ...; the tensor-core path), else fp32 NCHW (CPU, or an older GPU, where fp16
    would need loss scaling the user should choose deliberately)."""
    if device == "cpu":
        return {"amp": "none", "channels_last": False}
    if not torch.cuda.is_available():
        return {"amp": "none", "channels_last": False}
    if torch.version.hip is not None:  # ROCm reports no CUDA capability; torch knows its bf16 support
        bf16 = torch.cuda.is_bf16_supported()
    else:
        bf16 = torch.cuda.get_device_capability() >= (8, 0)
    return {"amp": "bf16", "channels_last": True} if bf16 else {"amp": "none", "channels_last": False}


def resolve_static_graph(static_graph, compile: bool, grad_accum: int = 1) -> bool:
    """``dist.static_graph``: ``auto`` turns DDP's static graph on (the reducer records the
    gradient-ready order once instead of rediscovering it every step) for every model here,
    since none changes its set of used parameters or its control flow between steps; TPP's loss
    on weights outside ``forward`` is one of the cases static_graph is made for. Off where DDP
    cannot take it: under ``torch.compile`` (dynamo's DDPOptimizer does not support it,
    pytorch#109261) and with gradient accumulation (``no_sync`` micro-steps trip the static
    reducer's "expect_autograd_hooks_" assertion; seen with torch 2.14 on gloo)."""
    if static_graph == "auto":
        return not compile and grad_accum == 1
    if static_graph and grad_accum > 1:
        raise UserError("dist.static_graph=true cannot be combined with train.grad_accum > 1 (DDP's "
                        "no_sync micro-steps break the static graph); use dist.static_graph=auto")
    return bool(static_graph)


@ENGINES.register("ddp")
class DDPEngine:
    """Plain PyTorch: DDP when the world is larger than one, the bare module otherwise.

    AMP has one code path: ``autocast(enabled=...)`` plus a GradScaler that is only enabled for fp16.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, device, amp="none",
                 sync_bn=False, bucket_cap_mb=25, static_graph="auto", compile=False, grad_accum=1,
                 ddp: bool | None = None, **_):
        self.module = model
        self.optimizer = optimizer
        self.device = torch.device(device)
        self.amp_dtype = amp_dtype(amp)
        self.grad_accum = grad_accum
        if sync_bn:
            if self.device.type != "cuda":
                raise UserError("dist.sync_bn=true needs CUDA (SyncBatchNorm refuses CPU modules)")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            self.module = model
        wrapped = model
        self.static_graph = None   # only meaningful with a DDP wrapper
        # ddp=None: wrap when the world has several processes; True forces the wrapper (a
        # one-process group, as `dprune bench gpu` uses to run a real NCCL DDP step)
        if dist.get_world_size() > 1 if ddp is None else ddp:
            static_graph = self.static_graph = resolve_static_graph(static_graph, compile, grad_accum)
            wrapped = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                bucket_cap_mb=bucket_cap_mb, static_graph=static_graph,
                gradient_as_bucket_view=True)
        self.model = torch.compile(wrapped) if compile else wrapped
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype is torch.float16)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def no_sync(self, skip: bool):
        """Skip the gradient all-reduce on accumulation micro-steps."""
        if skip and hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor):
        self.scaler.scale(loss).backward()

    def unscale(self):
        """Make ``.grad`` true gradients (before gradient hooks such as GReg's)."""
        self.scaler.unscale_(self.optimizer)

    def step(self):
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def sync_buffers(self):
        """Rank 0's buffers everywhere (end of an epoch, before evaluation and checkpoint)."""
        dist.broadcast_buffers(self.module)

    def finish(self) -> nn.Module:
        """The unwrapped module, for what follows the stage (evaluation, surgery, saving)."""
        return self.module

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict):
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def _deepspeed_engine() -> type:
    from .deepspeed_engine import DeepSpeedEngine  # deepspeed is imported by the runs using it

    return DeepSpeedEngine


ENGINES.add_lazy("deepspeed", _deepspeed_engine)


def build_engine(name: str, model, optimizer, **kw):
    return ENGINES.lookup(name)(model, optimizer, **kw)
