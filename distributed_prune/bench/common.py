"""Pieces shared by ``dprune bench speedup`` and ``dprune bench train``.

- :func:`pruned_pair`: the dense and the physically pruned model, built by the same
  ``models.create`` -> ``prune.plan`` -> ``prune.apply(mode="physical")`` path as ``dprune run``;
- :class:`TrainSetup`: one model trained by the pipeline's own code (``build_optimizer``,
  ``build_engine("ddp", ...)``, ``train_epoch``) over an in-memory loader;
- timing and output come from :mod:`.harness` (re-exported here for the model benchmarks);
- :func:`train_memory`: the training footprint of a setup (CUDA allocator peak, or the peak-RSS
  delta on CPU; see its docstring for what the CPU number can and cannot say).
"""
from __future__ import annotations

import copy
import ctypes
import os
import platform
import resource
from dataclasses import dataclass

import torch
import torch.nn as nn

from .. import dtypes, flops, models
from ..cmdline import check_output_file, parse_input_size
from ..errors import UserError
from ..train.engine import build_engine
from ..train.loop import train_epoch
from ..train.optim import build_optimizer
from ..train.schedules import EpochIterLR
from .harness import alternate, emit, env_info, md_table, median, spread, sync, time_once  # noqa: F401

RESNET50_RATIOS = "[0,0.6,0.6,0.6,0.21,0]"                  # 2.31x MACs (docs/science.md section 5)


# --------------------------------------------------------------------------- arguments
def add_common_arguments(p) -> None:
    """Options every model benchmark takes: device, CPU threads, seed, JSON output."""
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", default=None, help="also write the JSON object to this file")


def check_seed_and_out(args) -> None:
    """``--seed`` within what torch's generators take (with room for offsets); ``--out`` a file
    name that can be written. Checked up front: a benchmark must not run for minutes and then
    fail to save its result."""
    if not 0 <= args.seed <= MAX_SEED:
        raise UserError(f"--seed: must lie in 0..{MAX_SEED}, got {args.seed}")
    check_output_file("--out", args.out)


MAX_SEED = 2**32 - 1


def base_settings(args) -> dict:
    """Settings every model benchmark resolves the same way (device-dependent defaults)."""
    check_seed_and_out(args)
    device = device_and_threads(args)
    gpu = device.type == "cuda"
    d = defaults(args.model, device)
    return {"device": device, "gpu": gpu, "batch": given(args.batch, d["batch"]),
            "input_size": parse_input_size(args.input_size) if args.input_size else d["input_size"],
            "num_classes": given(args.num_classes, d["num_classes"]),
            "channels_last": gpu if args.channels_last is None else args.channels_last}


def device_and_threads(args) -> torch.device:
    """``--device`` resolved, and ``--threads`` applied to torch (benchmarks share these flags)."""
    device = resolve_device(args.device)
    if args.threads is not None:
        check_positive(threads=args.threads)
        torch.set_num_threads(args.threads)
    return device


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device: expected auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def is_imagenet_model(name: str) -> bool:
    """torchvision classifiers are ImageNet-shaped (1000 classes, 224x224); the project's own
    models (CIFAR ResNets, VGG19_C, ...) are CIFAR-shaped."""
    from ..models.tv import torchvision_classifiers

    return name not in models.MODELS and name in torchvision_classifiers()


def defaults(model: str, device: torch.device) -> dict:
    """Input size, classes and batch when not given: GPU 224x224 / batch 256 for ImageNet nets,
    CPU 64x64 / batch 8 (so a CPU run ends in seconds); CIFAR nets 32x32 everywhere."""
    gpu = device.type == "cuda"
    if is_imagenet_model(model):
        return {"input_size": (3, 224, 224) if gpu else (3, 64, 64), "num_classes": 1000,
                "batch": 256 if gpu else 8}
    return {"input_size": (3, 32, 32), "num_classes": 10, "batch": 256 if gpu else 8}


def given(value, default):
    """``value`` unless it is None (0 is a given value, and an error for check_positive)."""
    return default if value is None else value


def check_positive(**values):
    for k, v in values.items():
        if v is not None and v < (0 if k == "warmup" else 1):
            raise UserError(f"--{k.replace('_', '-')}: must be {'>= 0' if k == 'warmup' else '>= 1'}, got {v}")


# --------------------------------------------------------------------------- models
@dataclass
class Pair:
    """A dense model, its physically pruned copy, the plan, and per-sample MACs / params."""
    dense: nn.Module
    pruned: nn.Module
    plan: "prune.Plan"
    input_size: tuple[int, ...]
    dense_macs: int
    pruned_macs: int
    dense_params: int
    pruned_params: int

    @property
    def mac_speedup(self) -> float:
        return self.dense_macs / max(self.pruned_macs, 1)


def pruned_pair(model, ratios, num_classes: int | None = None, input_size=(3, 32, 32),
                round_to: int | None = None, criterion: str = "l1", seed: int = 0) -> Pair:
    """Dense + physically pruned model exactly as ``dprune run`` makes them.

    ``model``: a registry name (created after ``torch.manual_seed(seed)``, as the pipeline does
    before building its model) or an ``nn.Module`` (used as the dense model, e.g. a checkpoint's
    weights). The plan is ``prune.plan(dense, ratios, criterion, example_input=(1, *input_size),
    round_to)`` and the pruned model ``prune.apply(deepcopy(dense), plan, mode="physical")``: the
    calls of ``prune.decide.decide`` and of the pipeline's surgery step, with their defaults.
    """
    from .. import prune   # lazily: torch-pruning is optional for the benchmarks that never prune

    if isinstance(model, str):
        torch.manual_seed(seed)
        model = models.create(model, num_classes=10 if num_classes is None else num_classes)
    dense = model.cpu()
    x = torch.zeros(1, *input_size)
    try:
        d = flops.count(dense, x)
    except RuntimeError as e:
        raise UserError(f"--input-size {','.join(map(str, input_size))}: the model cannot run on it "
                        f"({str(e).splitlines()[0]})") from None
    plan = prune.plan(dense, ratios, criterion=criterion, example_input=x, round_to=round_to, seed=seed)
    small = prune.apply(copy.deepcopy(dense), plan, mode="physical")
    p = flops.count(small, x)
    return Pair(dense, small, plan, tuple(input_size), d["macs"], p["macs"], d["params"], p["params"])


def set_backend_flags(device: torch.device, cudnn_benchmark: bool = True):
    """The backend flags ``pipeline.run`` sets on CUDA (cudnn.benchmark, TF32)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cudnn_benchmark
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# --------------------------------------------------------------------------- inference / training
def inference_fn(model: nn.Module, *, device, batch: int, input_size, dtype: str = "fp32",
                 channels_last: bool = False, compile: bool = False, seed: int = 0):
    """A callable running one eval-mode, no-grad forward of a copy of ``model`` in ``dtype``
    (weights and input cast: low-precision inference as deployed)."""
    m = copy.deepcopy(model).to(device=device, dtype=dtypes.DTYPES[dtype]).eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *input_size, generator=g).to(device=device, dtype=dtypes.DTYPES[dtype])
    if channels_last and x.dim() == 4:
        m = m.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    run = torch.compile(m) if compile else m

    def forward():
        with torch.no_grad():
            run(x)

    return forward


class TrainSetup:
    """One model trained by the pipeline's code: ``build_optimizer`` (SGD, momentum 0.9, weight
    decay by rank; fused on CUDA unless ``fused=False``), ``build_engine("ddp", ...)`` (autocast,
    GradScaler, optional torch.compile) and ``train_epoch`` over an in-memory loader of one
    (x, y) batch repeated ``steps`` times. ``host_batch``: the batch is a pinned host tensor
    copied with ``non_blocking=True`` each step (what a DataLoader with pin_memory hands the
    loop); otherwise it is device-resident (the copy is not measured). One host sync per
    :meth:`run` (train_epoch's loss readout), none per step.
    """

    def __init__(self, model: nn.Module, *, device, batch: int, input_size, num_classes: int,
                 amp: str = "none", channels_last: bool = False, compile: bool = False,
                 fused: bool | None = None, host_batch: bool = False, cudnn_benchmark: bool = True,
                 seed: int = 0, ddp: bool | None = None):
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.cudnn_benchmark = cudnn_benchmark
        net = copy.deepcopy(model).to(self.device)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        opt = build_optimizer(net, name="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4, fused=fused,
                              foreach=None if fused is None else not fused)
        self.engine = build_engine("ddp", net, opt, device=self.device, amp=amp, compile=compile, ddp=ddp)
        self.lr_driver = EpochIterLR(self.engine, "0:0.01", 1, 1)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, *input_size, generator=g)
        y = torch.randint(0, num_classes, (batch,), generator=g)
        if host_batch:
            if self.device.type == "cuda":
                x, y = x.pin_memory(), y.pin_memory()
        else:
            x, y = x.to(self.device), y.to(self.device)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
        self.batch = (x, y)

    def run(self, steps: int = 1, **loop) -> dict:
        """``steps`` training steps; ``loop``: further ``train_epoch`` arguments (a regularizer's
        ``extra_loss`` / ``grad_hook``)."""
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = self.cudnn_benchmark
        return train_epoch(self.engine, [self.batch] * steps, epoch=0, lr_driver=self.lr_driver,
                           channels_last=self.channels_last, **loop)

    def resident_bytes(self) -> int:
        """Bytes of what stays allocated between steps: weights, buffers, optimizer state, the
        device-resident batch."""
        net = self.engine.module
        tensors = list(net.parameters()) + list(net.buffers())
        for st in self.engine.optimizer.state.values():
            tensors += [v for v in st.values() if torch.is_tensor(v)]
        tensors += [t for t in self.batch if t.device == self.device]
        return sum(t.numel() * t.element_size() for t in tensors)


def _rss_reset() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); False if impossible."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)  # hand freed heap pages back, so the reset starts from live memory
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if platform.system() == "Darwin" else r * 1024  # Linux reports KiB


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return _maxrss_bytes()


def train_memory(setup: TrainSetup, steps: int = 2) -> dict:
    """Peak training memory of ``setup`` over ``steps`` steps (run it after warm-up, so the
    optimizer state exists). Returns ``{"peak_mem_bytes", "memory_method"}``.

    GPU: ``torch.cuda.max_memory_allocated`` during the steps, minus what was allocated before
    them, plus this setup's resident bytes (weights, optimizer state, batch): the footprint it
    would have alone on the device, whatever else is resident. Excludes the CUDA context and the
    allocator's cached-but-free blocks.

    CPU: peak RSS delta via ``resource.getrusage`` (``ru_maxrss``) over the RSS at the start,
    plus the resident bytes. Limits: ru_maxrss is a process-lifetime high-water mark, so it is
    first reset with ``/proc/self/clear_refs`` (Linux >= 4.0; where that fails the delta is only
    an upper bound set by the largest earlier phase, ``memory_method`` says
    ``rss_lifetime_peak``); RSS counts pages, not tensors: heap memory freed earlier but kept by
    the C allocator can be reused without raising RSS (``malloc_trim`` first reduces this, so
    the delta may under-count), and oneDNN scratch, thread stacks and allocator rounding are
    included. Good for a pruned/dense ratio at equal settings, not as an absolute figure.
    """
    dev = setup.device
    resident = setup.resident_bytes()
    if dev.type == "cuda":
        sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        setup.run(steps)
        sync(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base + resident
        return {"peak_mem_bytes": int(peak), "memory_method": "cuda.max_memory_allocated"}
    ok = _rss_reset()
    base = _rss_bytes()
    setup.run(steps)
    peak = max(_maxrss_bytes() - base, 0) + resident
    return {"peak_mem_bytes": int(peak), "memory_method": "rss_peak_delta" if ok else "rss_lifetime_peak"}
