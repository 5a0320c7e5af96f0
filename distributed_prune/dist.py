"""The one owner of distributed state.

Reads the environment of ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE), the
``deepspeed`` launcher (the same variables) and SLURM (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
with MASTER_ADDR/MASTER_PORT exported by the sbatch script); picks the backend (nccl on GPU, gloo
on CPU); sets the device. Every helper works without a process group (rank 0 of 1), so the rest of
the code never branches on "distributed or not".

The bottom of the package above :mod:`.errors`: it imports nothing else from it. DeepSpeed's
communication layer adopts the process group made here when its engine is built
(:mod:`.train.deepspeed_engine`), so nothing here depends on the engine.
"""
from __future__ import annotations

import datetime
import gc
import importlib.util
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from .errors import UserError


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None
    device: torch.device = torch.device("cpu")
    launcher: str = "none"

    @property
    def is_primary(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(*names, default=None):
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            return int(v)
    return default


def detect() -> Context:
    """Read the launcher's environment (no side effects)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        launcher = "deepspeed" if "DEEPSPEED_ENVIRONMENT_NAME" in os.environ or \
            os.environ.get("CROSS_RANK") is not None else "torchrun"
        rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
        local = _env_int("LOCAL_RANK", default=0)
        local_world = _env_int("LOCAL_WORLD_SIZE", default=world)
    elif "SLURM_PROCID" in os.environ and _env_int("SLURM_NTASKS", default=1) > 1:
        launcher = "slurm"
        rank, world = _env_int("SLURM_PROCID"), _env_int("SLURM_NTASKS")
        local = _env_int("SLURM_LOCALID", default=0)
        local_world = _env_int("SLURM_NTASKS_PER_NODE", default=world)
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        os.environ.setdefault("LOCAL_RANK", str(local))
    else:
        return Context()
    return Context(rank, world, local, local_world, launcher=launcher)


def require_engine(engine: str) -> None:
    """:class:`UserError` when ``engine`` needs a package that is not installed. Looked up
    without importing it (importing DeepSpeed takes seconds and may initialise CUDA)."""
    if engine != "deepspeed":
        return
    try:
        found = importlib.util.find_spec("deepspeed") is not None
    except (ImportError, ValueError):  # a broken install or a stub module without a spec
        found = False
    if not found:
        raise UserError("dist.engine=deepspeed: DeepSpeed is not installed; install it with "
                        "`pip install deepspeed` (or this project's extra: `pip install "
                        "'distributed_prune[deepspeed]'`), or use dist.engine=ddp")


def init(device: str = "auto", backend: str = "auto", engine: str | None = None) -> Context:
    """Set up the process group (if launched with several processes) and the device.

    ``engine`` is only checked to be installed (:func:`require_engine`): every engine trains on
    the torch.distributed group made here (DeepSpeed adopts it when its engine is built)."""
    require_engine(engine)  # first: nothing may be written for a run that cannot start
    ctx = detect()
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is available")
    if use_cuda:
        torch.cuda.set_device(ctx.local_rank % torch.cuda.device_count())
        ctx.device = torch.device("cuda", torch.cuda.current_device())
    else:
        ctx.device = torch.device("cpu")
    if ctx.distributed and not tdist.is_initialized():
        ctx.backend = backend if backend != "auto" else ("nccl" if use_cuda else "gloo")
        timeout = datetime.timedelta(minutes=int(os.environ.get("DPRUNE_DIST_TIMEOUT_MIN", "30")))
        _init_process_group(ctx.backend, timeout, **({"device_id": ctx.device} if use_cuda else {}))
    elif tdist.is_initialized():
        ctx.backend = tdist.get_backend()
    return ctx


def _init_process_group(backend, timeout, **kw):
    """``init_process_group`` from the launcher's environment. After a torchrun restart
    (``--max-restarts``) the agent's store still holds the previous attempt's keys, and the new
    workers would read their peers' old addresses ("Connection refused", pytorch#167288): the
    store is then prefixed with the attempt number."""
    attempt = _env_int("TORCHELASTIC_RESTART_COUNT", default=0)
    if attempt > 0 and os.environ.get("MASTER_ADDR"):
        store, rank, world = next(tdist.rendezvous("env://", timeout=timeout))
        store = tdist.PrefixStore(f"dprune/attempt_{attempt}/", store)
        tdist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                 timeout=timeout, **kw)
    else:
        tdist.init_process_group(backend, timeout=timeout, **kw)


def get_rank() -> int:
    return tdist.get_rank() if tdist.is_initialized() else 0


def get_world_size() -> int:
    return tdist.get_world_size() if tdist.is_initialized() else 1


def is_primary() -> bool:
    return get_rank() == 0


def barrier():
    if tdist.is_initialized():
        tdist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity without a process group)."""
    if tdist.is_initialized() and get_world_size() > 1:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    """In-place minimum over ranks (identity without a process group)."""
    if tdist.is_initialized() and get_world_size() > 1:
        tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(t).div_(get_world_size())


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Rank ``src``'s buffers (BatchNorm running statistics) on every rank, one broadcast per
    dtype. DDP broadcasts buffers at the START of each forward, so after an epoch's last forward
    every rank holds statistics updated by its own last batch; syncing before evaluation makes the
    evaluated model (sharded over ranks) the checkpointed one (rank 0's)."""
    if not (tdist.is_initialized() and get_world_size() > 1):
        return
    by_dtype: dict = {}
    for b in module.buffers():
        by_dtype.setdefault(b.dtype, []).append(b)
    for bufs in by_dtype.values():
        flat = torch.cat([b.detach().reshape(-1) for b in bufs])
        tdist.broadcast(flat, src)
        offset = 0
        for b in bufs:
            b.data.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank."""
    if not (tdist.is_initialized() and get_world_size() > 1):
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    if not (tdist.is_initialized() and get_world_size() > 1):
        return [obj]
    out = [None] * get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def shutdown(*, barrier: bool = True):
    """Tear down in an order that avoids "terminate called without an active exception" at exit
    (NCCL/gloo communicators still referenced by engine objects when the group is destroyed):
    collect the garbage the caller has released, barrier, then destroy the process group.
    ``barrier=False`` after an error (a peer that failed elsewhere would never arrive)."""
    gc.collect()
    if tdist.is_initialized():
        try:
            if barrier:
                tdist.barrier()
        finally:
            tdist.destroy_process_group()
