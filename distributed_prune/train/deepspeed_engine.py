"""DeepSpeed engine (``dist.engine=deepspeed``): the only module that imports deepspeed.

(Over 400 lines on purpose: everything DeepSpeed-specific, config reconciliation, exact resume
and its own checkpoint format, stays in this one module.)

    torchrun --nproc_per_node 8 -m distributed_prune run CONFIG dist.engine=deepspeed \
        dist.deepspeed_config=configs/deepspeed/zero1_bf16.json train.amp=bf16
    deepspeed --num_gpus 8 --no_local_rank --module distributed_prune run CONFIG dist.engine=deepspeed
    # CPU (gloo): DS_ACCELERATOR=cpu, with configs/deepspeed/zero0_fp32.json or zero1 in fp32

Same API as :class:`~distributed_prune.train.engine.DDPEngine`; what it decides:

* **One source of truth for the batch.** ``train_micro_batch_size_per_gpu`` and
  ``gradient_accumulation_steps`` come from our config (``data.batch_size`` is the global batch,
  split over world size x ``train.grad_accum``); a JSON value that disagrees (``train_batch_size``
  included) is a UserError naming the key. ``"auto"`` or absent keys are filled in.
* **The loop owns the accumulation boundary.** DeepSpeed runs with
  ``managed_gradient_accumulation: false``: ``backward`` accumulates locally, our ``step()`` (called
  by the loop at the boundary, including a shorter last accumulation of an epoch) reduces and steps.
  The loop already divides the loss by ``train.grad_accum``, so ``backward`` passes
  ``scale_wrt_gas=False`` (no double scaling). ``no_sync`` is a no-op.
* **Precision is one setting.** ``bf16.enabled`` / ``fp16.enabled`` in the JSON must agree with
  ``train.amp`` (absent or ``"auto"``: taken from ``train.amp``), because evaluation and the
  checkpoints use ``train.amp`` too. DeepSpeed then keeps bf16/fp16 parameters in the module and
  fp32 master weights in the (ZeRO) optimizer; the forward runs under ``torch.autocast`` so fp32
  inputs meet low-precision weights. On CPU, bf16 works (torch has CPU bf16 kernels; slow without
  native bf16 instructions), fp16 is refused (UserError: no CPU fp16 kernels in DeepSpeed's CPU
  accelerator) and fp32 is the default.
* **LR reaches the optimizer that steps.** ``param_groups`` are those of ``engine.optimizer``:
  with ZeRO or bf16 the wrapper's groups ARE the torch optimizer's groups (whose ``params`` were
  replaced by flat fp32 partitions), so EpochIterLR's ``group["lr"]`` is what ``step()`` uses.
* **Checkpoints stay the project's format.** ``state_dict()`` returns a torch-format optimizer
  state (``{"state": {param_index: {...}}, "param_groups": [...]}``, indices in the order of the
  optimizer we were given) gathered from the ZeRO partitions (a collective: every rank calls it,
  as the pipeline does), plus the fp32 master weights when the module holds bf16/fp16 weights. It
  loads with ``torch.load(weights_only=True)`` without deepspeed, in torch's layout (not tied to
  the engine). ``load_state_dict`` scatters it back into the partitions. Resume is exact for fp32 and
  bf16 (ZeRO 0-2; SGD and AdamW state; checked on CPU: a resumed run repeats the uninterrupted
  one's losses bit for bit); with fp16 the dynamic loss scale restarts (best effort). ZeRO-3 is
  not supported (the pipeline needs whole parameters for evaluation and surgery); low precision
  needs ZeRO stage >= 1.
* **Unwrap at the end of a stage.** ``finish()`` returns the plain fp32 ``nn.Module`` (master
  weights copied in, DeepSpeed's module and gradient hooks removed) so pruning, FLOP counting,
  JSV and the next stage see an ordinary model.
* Gradient hooks (``prune.method=greg``) need real per-parameter ``.grad`` between backward and
  step: supported with ZeRO-0 in fp32 only; other combinations are a UserError.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from pathlib import Path

import deepspeed  # without CUDA, DeepSpeed picks its CPU accelerator (DS_ACCELERATOR=cpu says so)
import torch
import torch.distributed as tdist
import torch.nn as nn
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)

from .. import dist
from ..dtypes import amp_dtype
from ..errors import UserError


def _quiet():
    """DeepSpeed logs every config key at INFO; keep warnings (``DPRUNE_DS_LOG_LEVEL``)."""
    logging.getLogger("DeepSpeed").setLevel(os.environ.get("DPRUNE_DS_LOG_LEVEL", "WARNING"))


#: ``dist.deepspeed_config`` unset: ZeRO-1, precision from ``train.amp`` (zero1_bf16.json when
#: train.amp=bf16). Comment-free JSON files with the same keys live in configs/deepspeed/.
DEFAULT_CONFIG = {
    "zero_optimization": {"stage": 1},
    "zero_allow_untested_optimizer": True,
    "gradient_clipping": 0.0,
    "steps_per_print": 2 ** 31 - 1,
    "wall_clock_breakdown": False,
}


def load_json(path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"dist.deepspeed_config {p}: file not found")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"dist.deepspeed_config {p}: invalid JSON ({e})") from None


def resolve_config(raw: dict | None, *, micro_batch: int, grad_accum: int, world_size: int,
                   amp: str, device: torch.device, source: str = "dist.deepspeed_config") -> dict:
    """The DeepSpeed config dict actually used (pure function, unit-testable).

    Raises UserError naming the JSON key that contradicts our config."""
    cfg = copy.deepcopy(DEFAULT_CONFIG if raw is None else raw)
    if not isinstance(cfg, dict):
        raise UserError(f"{source}: top level must be a JSON object")
    want = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accum,
            "train_batch_size": micro_batch * grad_accum * world_size}
    ours = {"train_micro_batch_size_per_gpu": "data.batch_size / (world size x train.grad_accum)",
            "gradient_accumulation_steps": "train.grad_accum",
            "train_batch_size": "data.batch_size"}
    for key, value in want.items():
        got = cfg.get(key, "auto")
        if got != "auto" and got != value:
            raise UserError(f"{source}: {key}={got!r} conflicts with {ours[key]} = {value} "
                            f"(world size {world_size}); remove the key or set it to \"auto\"")
        cfg[key] = value
    if cfg.get("managed_gradient_accumulation", False) not in (False, "auto"):
        raise UserError(f"{source}: managed_gradient_accumulation must be false (the training loop "
                        "owns the accumulation boundary)")
    cfg["managed_gradient_accumulation"] = False
    cfg.setdefault("zero_allow_untested_optimizer", True)
    cfg.setdefault("steps_per_print", 2 ** 31 - 1)
    if "optimizer" in cfg or "scheduler" in cfg:
        key = "optimizer" if "optimizer" in cfg else "scheduler"
        raise UserError(f"{source}: {key!r} must not be set: the optimizer and the LR schedule come "
                        "from the run config (pretrain/retrain sections)")
    zero = cfg.setdefault("zero_optimization", {"stage": 0})
    stage = int(zero.get("stage", 0))
    if stage not in (0, 1, 2):
        raise UserError(f"{source}: zero_optimization.stage={stage} is not supported (0, 1 or 2; "
                        "ZeRO-3 partitions parameters, which pruning and evaluation need whole)")
    if stage == 1 and zero.get("overlap_comm", False):
        raise UserError(f"{source}: zero_optimization.overlap_comm=true needs stage 2 here "
                        "(managed_gradient_accumulation=false)")
    # precision: one setting (train.amp); the JSON may state it, never contradict it
    want_prec = None if amp == "none" else amp
    for key in ("bf16", "fp16"):
        sect = cfg.get(key)
        enabled = sect.get("enabled", "auto") if isinstance(sect, dict) else "auto"
        if enabled == "auto":
            cfg.setdefault(key, {})
            if not isinstance(cfg[key], dict):
                cfg[key] = {}
            cfg[key]["enabled"] = want_prec == key
        elif bool(enabled) != (want_prec == key):
            raise UserError(f"{source}: {key}.enabled={str(bool(enabled)).lower()} conflicts with "
                            f"train.amp={amp} (one precision for training and evaluation: set "
                            f"train.amp={'' if enabled else 'none'}{key if enabled else ''} or "
                            f"{key}.enabled to \"auto\")")
    if cfg["fp16"]["enabled"] and device.type == "cpu":
        raise UserError(f"{source}: fp16.enabled / train.amp=fp16 needs a GPU (DeepSpeed's CPU "
                        "accelerator has no fp16 training path); use train.amp=bf16 or none on CPU")
    if want_prec is not None:
        # BatchNorm needs its running statistics in its weight's dtype (CPU refuses bf16 weights
        # with fp32 statistics); DeepSpeed >= 0.18 keeps buffers fp32 unless told otherwise
        dt = cfg.setdefault("data_types", {})
        if isinstance(dt, dict):
            dt.setdefault("buffer_dtype", want_prec)
    if stage == 0 and want_prec is not None:
        # ZeRO-0 bf16 keeps no fp32 master weights (pure bf16 updates), ZeRO-0 fp16 uses an
        # optimizer wrapper whose state is not partition-mapped: low precision needs stage >= 1
        raise UserError(f"{source}: {want_prec} with zero_optimization.stage=0 is not supported; "
                        f"use stage 1 or 2 (configs/deepspeed/zero1_bf16.json) or train.amp=none")
    return cfg


def _hooks_snapshot(module: nn.Module) -> dict:
    names = ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks", "_backward_pre_hooks",
             "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
             "_forward_hooks_always_called")
    return {id(m): {n: set(getattr(m, n, {})) for n in names} for m in module.modules()}


class DeepSpeedEngine:
    """A ``deepspeed.DeepSpeedEngine`` around our model and torch optimizer (see module doc)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, device, amp="none",
                 sync_bn=False, compile=False, grad_accum=1, ds_config=None, micro_batch=None,
                 world_size=None, **_):
        self.device = torch.device(device)
        if sync_bn:
            raise UserError("dist.sync_bn=true is not supported with dist.engine=deepspeed")
        if compile:
            raise UserError("train.compile=true is not supported with dist.engine=deepspeed")
        if micro_batch is None:
            raise ValueError("DeepSpeedEngine needs micro_batch")
        _ensure_process_group(self.device)
        world = dist.get_world_size()
        if world_size is not None and world_size != world:
            raise RuntimeError(f"world size {world_size} != process group size {world}")
        raw = load_json(ds_config) if ds_config else None
        source = f"dist.deepspeed_config {ds_config}" if ds_config else "dist.deepspeed_config (default)"
        self.config = resolve_config(raw, micro_batch=micro_batch, grad_accum=grad_accum,
                                     world_size=world, amp=amp, device=self.device, source=source)
        self.amp_dtype = amp_dtype(amp)
        # the parameter order of OUR optimizer (ZeRO replaces its groups' params by flat partitions)
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        self._group_sizes = [len(g["params"]) for g in optimizer.param_groups]
        fp32_init = [p.detach().clone() for p in self._params]
        self._hooks_before = _hooks_snapshot(model)
        self.ds, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config,
                                                dist_init_required=False)
        self.module = model          # DeepSpeed keeps the very same nn.Module (params maybe cast)
        self.model = self.ds         # callable: forward (+ DeepSpeed's hooks)
        self.optimizer = self.ds.optimizer
        # the wrapped optimizer holds whole-parameter torch state (ZeRO-0 fp32) or fp32 partitions
        self._partitioned = any(hasattr(p, "_hp_mapping") for p in self._params)
        if self._partitioned:
            # DeepSpeed built the fp32 master copy from the already-cast bf16/fp16 module: put the
            # exact fp32 values back (each rank writes its own fragment, no communication)
            for p, v in zip(self._params, fp32_init):
                safe_set_full_fp32_param(p, v.to(self.device))
        del fp32_init

    # ----------------------------------------------------------------- the loop's API
    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def no_sync(self, skip: bool):
        """No-op: with managed_gradient_accumulation=false, backward never communicates for
        ZeRO-0/1 (ZeRO-2 reduce-scatters per backward by design); ``step()`` is the boundary."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor):
        # the loop already divided by train.grad_accum: no second 1/gas here
        self.ds.backward(loss, scale_wrt_gas=False)

    def unscale(self):
        """Gradient hooks (GReg) edit ``p.grad`` between backward and step."""
        if self._partitioned or self.config["fp16"]["enabled"]:
            raise UserError("this pruning method edits gradients between backward and step, which "
                            "DeepSpeed supports here only with ZeRO-0 in fp32 "
                            "(configs/deepspeed/zero0_fp32.json); or use dist.engine=ddp")

    def step(self):
        self.ds.step()   # reduce (ZeRO-0/1) or finalize (ZeRO-2), optimizer step, zero grads

    def sync_buffers(self):
        """Rank 0's buffers everywhere (end of an epoch, before evaluation and checkpoint):
        DeepSpeed leaves each rank with BatchNorm statistics of its own shard."""
        dist.broadcast_buffers(self.module)

    @property
    def param_groups(self):
        return self.ds.optimizer.param_groups

    # ----------------------------------------------------------------- checkpoints
    def _base_optimizer(self):
        opt = self.ds.optimizer
        return getattr(opt, "optimizer", opt) if self._partitioned else opt

    def state_dict(self) -> dict:
        """Torch-format optimizer state (+ fp32 master weights); a collective with ZeRO."""
        if not self._partitioned:
            return {"optimizer": self.ds.optimizer.state_dict(), "scaler": None}
        base = self._base_optimizer()
        self._relink()
        keys, scalars = _state_keys(base)
        state = {}
        master = {}
        for i, p in enumerate(self._params):
            full = safe_get_full_fp32_param(p).detach().cpu()
            if p.dtype != torch.float32:   # fp32 modules hold the master weights themselves
                master[i] = full
            if keys:
                s = {k: safe_get_full_optimizer_state(p, k).detach().cpu() for k in keys}
                s.update({k: v.detach().cpu().clone() if torch.is_tensor(v) else v
                          for k, v in scalars.items()})
                state[i] = s
        groups, start = [], 0
        for g, n in zip(self.ds.optimizer.param_groups, self._group_sizes):
            d = {k: v for k, v in g.items() if k != "params"}
            d["params"] = list(range(start, start + n))
            groups.append(d)
            start += n
        return {"optimizer": {"state": state, "param_groups": groups}, "master": master,
                "scaler": None}

    def load_state_dict(self, state: dict):
        opt_state = state["optimizer"]
        if not self._partitioned:
            self.ds.optimizer.load_state_dict(opt_state)
            return
        if len(opt_state["param_groups"]) != len(self._group_sizes) or any(
                len(g["params"]) != n for g, n in zip(opt_state["param_groups"], self._group_sizes)):
            raise UserError("checkpoint optimizer state does not match the model's parameters")
        for g, saved in zip(self.ds.optimizer.param_groups, opt_state["param_groups"]):
            g.update({k: v for k, v in saved.items() if k != "params"})
        for i, p in enumerate(self._params):
            m = (state.get("master") or {}).get(i)
            if m is not None:
                safe_set_full_fp32_param(p, m.to(self.device))
                p.data.copy_(m.to(p.dtype))
        entries = opt_state.get("state") or {}
        if not entries:
            return
        keys = [k for k, v in next(iter(entries.values())).items() if torch.is_tensor(v) and v.dim() > 0]
        scalars = {k: v for k, v in next(iter(entries.values())).items() if k not in keys}
        self._create_optimizer_state(keys, scalars)
        for i, p in enumerate(self._params):
            for k in keys:
                if k in entries.get(i, {}):     # a parameter never stepped has no state
                    safe_set_full_optimizer_state(p, entries[i][k].to(self.device).float(), k)

    def _create_optimizer_state(self, keys, scalars):
        """Give the base optimizer's flat fp32 partitions empty state (as a first step would)
        and let DeepSpeed link the per-parameter fragments to it."""
        base = self._base_optimizer()
        for g in base.param_groups:
            for flat in g["params"]:
                st = base.state[flat]
                for k in keys:
                    st[k] = torch.zeros_like(flat)
                for k, v in scalars.items():   # e.g. AdamW's 0-dim "step" (stays on the CPU)
                    st[k] = v.clone() if torch.is_tensor(v) else v
        self._relink()

    def _relink(self):
        """Point every parameter's fragment at the base optimizer's current state (local).

        DeepSpeed links them once, right after the first step of the FIRST param group, so the
        fragments of later groups (our no-decay group) never see their state: redo it."""
        opt = self.ds.optimizer
        if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()

    # ----------------------------------------------------------------- end of a stage
    def finish(self) -> nn.Module:
        """The plain fp32 module (master weights copied in, DeepSpeed's hooks removed).
        A collective with ZeRO: every rank calls it."""
        module = self.module
        masters = None
        if self._partitioned:
            masters = [safe_get_full_fp32_param(p).detach() for p in self._params]
        destroy = getattr(self.ds, "destroy", None)
        if destroy is not None:
            destroy()
        for m in module.modules():
            before = self._hooks_before.get(id(m), {})
            for name, keep in before.items():
                hooks = getattr(m, name, None)
                if hooks is None:
                    continue
                for hid in [h for h in hooks if h not in keep]:
                    hooks.pop(hid, None)
        for p in module.parameters():
            for attr in ("_hp_mapping", "_dp_group", "_zero_optimizer", "_index_in_param_group"):
                if hasattr(p, attr):
                    with contextlib.suppress(AttributeError):
                        delattr(p, attr)
        if masters is not None:
            with torch.no_grad():
                for p, v in zip(self._params, masters):
                    p.data = v.to(device=p.device, dtype=torch.float32).clone()
        for b in module.buffers():
            if b.is_floating_point() and b.dtype != torch.float32:
                b.data = b.data.float()
        module.zero_grad(set_to_none=True)
        self.ds = self.model = self.optimizer = None
        return module


def _state_keys(base):
    """Per-element state keys (momentum_buffer, exp_avg, ...) and scalar ones (step) of the base
    optimizer's flat partitions; identical on every rank."""
    for g in base.param_groups:
        for flat in g["params"]:
            st = base.state.get(flat)
            if st:
                keys = [k for k, v in st.items() if torch.is_tensor(v) and v.shape == flat.shape]
                scalars = {k: v for k, v in st.items() if k not in keys}
                return keys, scalars
    return [], {}


def _init_comm(backend: str):
    """``deepspeed.init_distributed``: DeepSpeed's communication layer adopts the torch.distributed
    group that :func:`distributed_prune.dist.init` (or :func:`_ensure_process_group`) made. On
    CPU, DeepSpeed's communication backend JIT-compiles a shared-memory all-reduce op (about a
    minute on 2 cores) that only its inference all-reduce uses; training uses torch.distributed
    (gloo), so the build is skipped unless ``DPRUNE_DS_SHM=1``."""
    _quiet()
    if deepspeed.get_accelerator().device_name() == "cpu" and os.environ.get("DPRUNE_DS_SHM") != "1":
        import importlib

        # (``import deepspeed.comm.torch as m`` would bind the torch package: a name clash)
        ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
        if hasattr(ds_torch_comm, "build_shm_op"):
            ds_torch_comm.build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend=backend)


def _ensure_process_group(device: torch.device):
    """DeepSpeed needs a process group even for one process: a 1-rank gloo/nccl group on an
    in-process store (torchrun / the deepspeed launcher have set one up already)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not tdist.is_initialized():
        tdist.init_process_group(backend, store=tdist.HashStore(), rank=0, world_size=1)
        os.environ.setdefault("LOCAL_RANK", "0")
    import deepspeed.comm as ds_comm

    if not ds_comm.is_initialized():
        _init_comm(tdist.get_backend())
