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


@ENGINES.register("ddp")
class DDPEngine:
    """Plain PyTorch: DDP when the world is larger than one, the bare module otherwise.

    AMP has one code path: ``autocast(enabled=...)`` plus a GradScaler that is only enabled for fp16.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, device, amp="none",
                 sync_bn=False, bucket_cap_mb=25, static_graph=False, compile=False, grad_accum=1,
                 **_):
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
        if dist.get_world_size() > 1:
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
