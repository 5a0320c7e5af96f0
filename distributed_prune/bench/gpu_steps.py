"""The steps of ``dprune bench gpu`` (each runs in its own process; see :mod:`.gpu`).

Over 400 lines on purpose: one step per function, all of them sized by the same
:data:`SIZES` table, reads better in one place than split into eight modules.

Every step takes the settings dict (``device``, ``size``, ``out``, ``limit_s``) and returns
``{"figures": [...], "table": markdown, ...data}``; a figure is ``{name, value, unit, target,
op, met, note}``, with ``met`` None on the CPU (the targets are GPU targets). A missing
dependency raises :class:`.gpu_child.Skipped`. Timing uses :mod:`.harness` (warm-up, ABBA
repetitions, medians, CUDA events on GPU).
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import socket
import tempfile
import time
import warnings
from collections import Counter

import torch
import torch.nn as nn

from ..dtypes import DTYPES, amp_dtype, canonical
from . import common, harness
from . import masked as masked_bench
from .gpu_child import Skipped

R50_SPEC = common.RESNET50_RATIOS                 # the 2.31x plan
R50_LIGHT = "[0,0.3,0.3,0.3,0.14,0]"              # the 1.49x plan: the second masked sparsity

# Targets of issue 16 on one H100; H200 figures in brackets there.
DENSE_IMG_S = {"H100": 3000.0, "H200": 3300.0}
TRAIN_SPEEDUP, INFER_SPEEDUP, MEM_RATIO = 1.8, 2.0, 0.7

# masked conv cases: (N, C, H, W, O, k, stride, padding, dilation, groups)
FULL_CASES = {
    "odd_3x3": (3, 37, 29, 31, 53, 3, 1, 1, 1, 1),
    "stride2_3x3": (4, 64, 30, 30, 96, 3, 2, 1, 1, 1),
    "1x1": (8, 256, 14, 14, 512, 1, 1, 0, 1, 1),
    "depthwise": (4, 96, 28, 28, 96, 3, 1, 1, 1, 96),
    "r50_layer1.0.conv2": (32, 64, 56, 56, 64, 3, 1, 1, 1, 1),
    "r50_layer3.0.conv2": (32, 256, 28, 28, 256, 3, 2, 1, 1, 1),
}
SMALL_CASES = {
    "odd_3x3": (2, 7, 9, 11, 10, 3, 1, 1, 1, 1),
    "stride2_3x3": (2, 6, 9, 7, 11, 3, 2, 1, 1, 1),
    "1x1": (2, 16, 6, 6, 24, 1, 1, 0, 1, 1),
    "depthwise": (2, 8, 7, 7, 8, 3, 1, 1, 1, 8),
    "r50_layer1.0.conv2": (1, 64, 4, 4, 64, 3, 1, 1, 1, 1),     # the layers' channels, tiny images
    "r50_layer3.0.conv2": (1, 256, 4, 4, 256, 3, 2, 1, 1, 1),
}
ALL_DTYPES = ("fp32", "bf16", "fp16")

SIZES = {
    "full": dict(model="resnet50", spec=R50_SPEC, light=R50_LIGHT, input=(3, 224, 224), classes=1000,
                 batch=256, steps=5, reps=7, warmup=5, infer_reps=15, small_batch=64,
                 cases=FULL_CASES, dtypes=ALL_DTYPES, layouts=(False, True), norm_layers=None,
                 ffcv=dict(n=3072, image=(300, 260), batch=256, res=224, epochs=3)),
    "small": dict(model="resnet50", spec=R50_SPEC, light=R50_LIGHT, input=(3, 64, 64), classes=1000,
                  batch=4, steps=1, reps=2, warmup=1, infer_reps=2, small_batch=2,
                  cases=SMALL_CASES, dtypes=ALL_DTYPES, layouts=(True,), norm_layers=12,
                  masked_model="resnet20", masked_spec="[0,0.6,0.6,0.6,0]", masked_light="[0,0.3,0.3,0.3,0]",
                  masked_input=(3, 8, 8),
                  ffcv=dict(n=128, image=(80, 70), batch=32, res=64, epochs=2)),
    "tiny": dict(model="resnet20", spec="[0,0.6,0.6,0.6,0]", light="[0,0.3,0.3,0.3,0]", input=(3, 16, 16),
                 classes=10, batch=2, steps=1, reps=1, warmup=1, infer_reps=1, small_batch=2,
                 cases={k: SMALL_CASES[k] for k in ("odd_3x3", "depthwise")}, dtypes=("fp32", "bf16"),
                 layouts=(False, True),
                 norm_layers=4, masked_input=(3, 8, 8),
                 ffcv=dict(n=64, image=(40, 36), batch=16, res=32, epochs=2)),
}


# --------------------------------------------------------------------------- helpers
def _ctx(settings: dict) -> tuple[torch.device, bool, dict]:
    dev = torch.device(settings["device"])
    if dev.type == "cuda":   # an explicit index: DDP's device_ids and init_process_group need one
        torch.cuda.set_device(0)
        dev = torch.device("cuda", 0)
    return dev, dev.type == "cuda", SIZES[settings["size"]]


def _gpu_kind(name: str) -> str:
    return "H200" if "H200" in name else "H100"


def figure(name, value, unit="", *, target=None, op=">=", gpu=True, note="") -> dict:
    met = None
    if target is not None and gpu and value is not None:
        met = bool(value == target if op == "==" else value >= target if op == ">=" else value <= target)
    if target is not None and not gpu:
        note = note or "CPU run"
    return {"name": name, "value": value, "unit": unit, "target": target, "op": op, "met": met, "note": note}


def _fast_path(dev: torch.device) -> tuple[str, bool]:
    """The training settings ``train.amp: auto`` / ``train.channels_last: auto`` give here."""
    from ..train.engine import fast_path

    fp = fast_path(dev.type)
    return fp["amp"], fp["channels_last"]


def _model_settings(dev, sz, *, batch=None, input_size=None) -> dict:
    amp, cl = _fast_path(dev)
    return {"device": dev, "batch": batch or sz["batch"], "input_size": tuple(input_size or sz["input"]),
            "num_classes": sz["classes"], "amp": amp, "channels_last": cl, "dtype": _dtype_name(amp)}


def _dtype_name(amp: str) -> str:
    """The tensor dtype name (fp32 / bf16 / fp16) a ``train.amp`` mode computes in."""
    return canonical(amp_dtype(amp) or torch.float32)


def _setup(model, s: dict, **kw) -> common.TrainSetup:
    return common.TrainSetup(model, device=s["device"], batch=s["batch"], input_size=s["input_size"],
                             num_classes=s["num_classes"], amp=s["amp"], channels_last=s["channels_last"], **kw)


def _backends(dev, op: str = "masked_conv2d") -> dict[str, str]:
    """Every named kernel backend (whatever ``kernels.BACKENDS`` holds now) -> "" when it can
    run ``op`` on ``dev``, else the reason it cannot."""
    from .. import kernels
    from ..kernels import dispatch

    out = {}
    for name in kernels.BACKENDS:
        if name == "auto":
            continue
        try:
            with kernels.set_backend(name):
                chosen = dispatch.select(op, dev)
            out[name] = "" if chosen == name else f"falls back to {chosen} for {op}"
        except Exception as e:  # noqa: BLE001  (a backend that cannot run is skipped by name)
            out[name] = (str(e).splitlines() or [type(e).__name__])[0][:160]
    return out


# --------------------------------------------------------------------------- env
def step_env(settings: dict) -> dict:
    dev, gpu, _ = _ctx(settings)
    import platform

    from ..kernels import dispatch, native
    from ..kernels.dispatch import shape_bucket

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    from importlib import metadata

    for dist_name in ("triton", "torchvision", "torch-pruning", "ffcv", "deepspeed"):
        try:   # the installed version, without importing (deepspeed alone takes seconds)
            info[dist_name] = metadata.version(dist_name)
        except metadata.PackageNotFoundError:
            info[dist_name] = "missing"
    info["native_extension"] = "available" if native.available(build=False) else native.unavailable_reason()
    if gpu:
        p = torch.cuda.get_device_properties(dev)
        info.update(device_name=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                    capability=f"{p.major}.{p.minor}")
        try:
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as e:  # noqa: BLE001
            info["nccl"] = f"unavailable ({type(e).__name__})"
    else:
        info.update(device_name=harness.cpu_name(), cpus=os.cpu_count(), threads=torch.get_num_threads())
    # the backend `auto` picks for each kernel (masked conv: for a ResNet-50 3x3 layer at 60% kept)
    bucket = lambda: shape_bucket((64, 64, 56, 56), (64, 64, 3, 3), (1, 1), 1, 0.6)  # noqa: E731
    info["auto_backend"] = {op: dispatch.select(op, dev, bucket if op == "masked_conv2d" else None)
                            for op in ("filter_norms", "masked_conv2d", "compact_channels")}
    info["fast_path_auto"] = dict(zip(("amp", "channels_last"), _fast_path(dev)))
    rows = [[k, v if not isinstance(v, dict) else ", ".join(f"{a}: {b}" for a, b in v.items())]
            for k, v in info.items()]
    return {"env": info, "table": harness.md_table(["item", "value"], rows), "figures": []}


# --------------------------------------------------------------------------- correctness
UNIT_ROUNDOFF = {"fp32": 2.0 ** -24, "bf16": 2.0 ** -8, "fp16": 2.0 ** -11}
# The Triton interpreter stores fp32 -> bf16 by truncation (numpy has no bf16), not round to
# nearest as the GPU does: one unit in the last place, twice the unit roundoff.
INTERPRETER_BF16_ROUNDOFF = 2.0 ** -7
SUBNORMAL = {"fp32": 0.0, "bf16": 0.0, "fp16": 2.0 ** -24}


def _gamma(k: int) -> float:
    u32 = 2.0 ** -24
    return k * u32 / (1 - k * u32)


def _conv_case(case, dtype, dev, channels_last, seed=0):
    n, c, h, w, o, k, s, p, d, g = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen)
    wt = torch.randn(o, c // g, k, k, generator=gen) / math.sqrt(c // g * k * k)
    b = torch.randn(o, generator=gen)
    om = (torch.rand(o, generator=gen) < 0.6).float()
    om[0] = 1.0
    im = (torch.rand(c, generator=gen) < 0.7).float() if g == 1 else None
    x, wt, b = (t.to(device=dev, dtype=DTYPES[dtype]) for t in (x, wt, b))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return [x, wt, b], [om.to(dev), im.to(dev) if im is not None else None], dict(stride=s, padding=p, dilation=d, groups=g)


def _fwd_bwd(fn, tensors, masks, conv, grad_out=None):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    y = fn(*leaves, masks[0], in_mask=masks[1], **conv)
    if grad_out is None:
        grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    y.backward(grad_out)
    return [y.detach()] + [t.grad for t in leaves], grad_out


def _check_case(backend, case, dtype, dev, channels_last) -> float:
    """Largest |kernel - exact| / allowed over y, dx, dw, db; allowed = u |ref| + 2 gamma_K
    (|a|.|b|) (+ fp16's subnormal spacing): one rounding of each result to the dtype plus fp32
    accumulation over a reduction of length K, the bound of the kernel tests. The reference runs
    in float64 from the same rounded inputs, so it is exact for this purpose."""
    from .. import kernels
    from ..kernels import reference

    tensors, masks, conv = _conv_case(case, dtype, dev, channels_last)
    with kernels.set_backend(backend):
        got, go = _fwd_bwd(kernels.masked_conv2d, tensors, masks, conv)
    up = [t.double() for t in tensors]
    ref, _ = _fwd_bwd(reference.masked_conv2d, up, masks, conv, go.double())
    bound, _ = _fwd_bwd(reference.masked_conv2d, [t.abs() for t in up],
                        [m.abs() if m is not None else None for m in masks], conv, go.double().abs())
    n, c, _, _, o, k, _, _, _, g = case
    oh, ow = got[0].shape[2:]
    lengths = [c // g * k * k + 1, o // g * k * k, n * oh * ow, n * oh * ow]   # y, dx, dw, db
    worst = 0.0
    from ..kernels.dispatch import interpreter_enabled

    u = INTERPRETER_BF16_ROUNDOFF if dtype == "bf16" and interpreter_enabled() else UNIT_ROUNDOFF[dtype]
    for t, r, bnd, length in zip(got, ref, bound, lengths):
        allowed = u * r.abs() + 2 * _gamma(length) * bnd + SUBNORMAL[dtype] + 1e-30
        worst = max(worst, float(((t.double() - r).abs() / allowed).max()))
    return worst


def _norms_check(dev, sz) -> list[dict]:
    from torchvision.models import resnet50

    from .. import kernels
    from ..kernels import dispatch, reference

    torch.manual_seed(0)
    convs = [m for m in resnet50(weights=None).modules() if isinstance(m, nn.Conv2d)]
    ws = [m.weight.detach().to(dev) for m in convs[:sz["norm_layers"]]]
    gs = [torch.randn_like(w) for w in ws]
    rows = []
    for backend, why in _backends(dev, "filter_norms").items():
        if backend == "reference" or (backend == "native" and "falls back" in why):
            continue   # the reference is the ground truth; native has no filter_norms of its own
        if why:
            rows.append({"backend": backend, "criterion": "-", "worst": None, "why": why})
            continue
        for crit, p, grads in (("l1", 1, None), ("l2", 2, None), ("taylor", 1, gs)):
            with kernels.set_backend(backend):
                got = dispatch.filter_norms(ws, p, grads)
            ref = reference.filter_norms([w.double() for w in ws], p, [g.double() for g in grads] if grads else None)
            worst = 0.0
            for i, (w, a, r) in enumerate(zip(ws, got, ref)):
                # l1 / l2 sum non-negative terms: relative error gamma_K; Taylor's |sum w g| can
                # cancel, so its error is bounded by sum |w g| instead
                bnd = r.abs() if grads is None else (w.double().abs() * gs[i].double().abs()).flatten(1).sum(1)
                allowed = 2 * _gamma(w[0].numel()) * bnd + 2.0 ** -24 * r.abs() + 1e-30
                worst = max(worst, float(((a.double() - r).abs() / allowed).max()))
            rows.append({"backend": backend, "criterion": crit, "worst": worst, "why": ""})
    return rows


def step_correctness(settings: dict) -> dict:
    dev, gpu, sz = _ctx(settings)
    if gpu:   # exact fp32 against exact fp32 (the kernels honour allow_tf32, like cuDNN)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    backends = {b: why for b, why in _backends(dev).items() if b != "reference"}
    rows, results = [], []
    deadline = time.monotonic() + 0.75 * settings["limit_s"]   # leave time for filter_norms
    for b, why in backends.items():
        if why:
            rows.append([b, "all", "", "", f"skipped: {why}"])
            results.append({"backend": b, "skipped": why})
            continue
        for name, case in sz["cases"].items():
            for dtype in sz["dtypes"]:
                for cl in sz["layouts"]:
                    if time.monotonic() > deadline:
                        results.append({"backend": b, "case": name, "dtype": dtype, "channels_last": cl,
                                        "skipped": "out of time"})
                        continue
                    try:
                        worst = _check_case(b, case, dtype, dev, cl)
                        ok, err = worst <= 1.0, ""
                    except Exception as e:  # noqa: BLE001  (one failing case must not hide the rest)
                        worst, ok, err = None, False, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                    results.append({"backend": b, "case": name, "dtype": dtype, "channels_last": cl,
                                    "worst_err_over_bound": worst, "ok": ok, "error": err})
                    rows.append([b, name, dtype, "channels_last" if cl else "nchw",
                                 err or f"{worst:.3f} of the bound" + ("" if ok else " FAIL")])
    norms = _norms_check(dev, sz)
    for r in norms:
        rows.append([r["backend"], f"filter_norms {r['criterion']}", "fp32", "-",
                     f"skipped: {r['why']}" if r["why"] else f"{r['worst']:.3f} of the bound"
                     + ("" if r["worst"] <= 1.0 else " FAIL")])
    checked = [r for r in results if "ok" in r]
    norms_checked = [r for r in norms if r["worst"] is not None]
    figures = [figure("masked conv fwd+bwd cases within bound", sum(r["ok"] for r in checked), "",
                      target=len(checked), op="==", gpu=True),
               figure("filter_norms (l1/l2/taylor) within bound", sum(r["worst"] <= 1.0 for r in norms_checked), "",
                      target=len(norms_checked), op="==", gpu=True)]
    not_run = sum(1 for r in results if r.get("skipped") == "out of time")
    if not checked:
        figures[0]["note"] = "no compiled backend ran"
    elif not_run:
        figures[0]["note"] = f"{not_run} cases not run: out of time"
    table = harness.md_table(["backend", "case", "dtype", "layout", "worst error / bound"], rows)
    return {"masked_conv": results, "filter_norms": norms, "figures": figures, "table": table}


# --------------------------------------------------------------------------- train
def _profile_top(setup: common.TrainSetup, gpu: bool, n: int = 8) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=acts) as prof:
        setup.run(3)
    key = "self_device_time_total" if gpu else "self_cpu_time_total"
    ev = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)[:n]
    total = sum(getattr(e, key, 0) for e in prof.key_averages()) or 1
    return [{"op": e.key, "self_ms": getattr(e, key, 0) / 3e3, "share": getattr(e, key, 0) / total} for e in ev]


def step_train(settings: dict) -> dict:
    dev, gpu, sz = _ctx(settings)
    common.set_backend_flags(dev)
    s = _model_settings(dev, sz)
    pair = common.pruned_pair(sz["model"], sz["spec"], sz["classes"], s["input_size"])
    pair8 = common.pruned_pair(pair.dense, sz["spec"], sz["classes"], s["input_size"], round_to=8)
    models = {"dense": pair.dense, "pruned": pair.pruned, "pruned_r8": pair8.pruned}
    setups = {k: _setup(m, s) for k, m in models.items()}
    for st in setups.values():
        st.run(sz["warmup"])
    mem = {k: common.train_memory(setups[k], steps=2) for k in ("pruned_r8", "pruned", "dense")}
    t = harness.alternate({k: (lambda st=st: st.run(sz["steps"])) for k, st in setups.items()},
                          reps=sz["reps"], warmup=0, device=dev)
    step_ms = {k: harness.median(v) / sz["steps"] for k, v in t.items()}
    infer = {k: common.inference_fn(m, device=dev, batch=s["batch"], input_size=s["input_size"], dtype=s["dtype"],
                                    channels_last=s["channels_last"]) for k, m in models.items()}
    ti = harness.medians(harness.alternate(infer, reps=sz["infer_reps"], warmup=sz["warmup"], device=dev))
    img_s = {k: s["batch"] * 1e3 / v for k, v in step_ms.items()}
    kind = _gpu_kind(torch.cuda.get_device_name(dev)) if gpu else "H100"
    figs = [figure(f"dense training img/s ({kind} target)", img_s["dense"], "img/s", target=DENSE_IMG_S[kind], gpu=gpu)]
    macs = {"pruned": pair.mac_speedup, "pruned_r8": pair8.mac_speedup}
    for k, label in (("pruned", "2.31x plan"), ("pruned_r8", "2.31x plan, round_to 8")):
        figs += [figure(f"{label}: MAC speedup", macs[k], "x"),
                 figure(f"{label}: training speedup", img_s[k] / img_s["dense"], "x", target=TRAIN_SPEEDUP, gpu=gpu),
                 figure(f"{label}: inference speedup", ti["dense"] / ti[k], "x", target=INFER_SPEEDUP, gpu=gpu),
                 figure(f"{label}: peak training memory / dense",
                        mem[k]["peak_mem_bytes"] / mem["dense"]["peak_mem_bytes"], "x",
                        target=MEM_RATIO, op="<=", gpu=gpu)]
    profile = {}
    if gpu and any(f["met"] is False for f in figs):   # a missed target comes with its profile
        profile = {k: _profile_top(setups[k], gpu) for k in ("dense", "pruned")}
    rows = [[k, f"{img_s[k]:.1f}", f"{step_ms[k]:.2f}", f"{ti[k]:.2f}", f"{mem[k]['peak_mem_bytes'] / 2**20:.0f}",
             f"{harness.spread(t[k]):.2f}"] for k in models]
    table = (f"{sz['model']} {sz['spec']}, batch {s['batch']} x {'x'.join(map(str, s['input_size']))}, "
             f"amp {s['amp']}, channels_last {s['channels_last']}, median of {sz['reps']} ABBA reps x "
             f"{sz['steps']} steps; memory: {mem['dense']['memory_method']}\n\n"
             + harness.md_table(["model", "train img/s", "ms/step", "infer ms/batch", "peak MiB", "spread"], rows))
    for k, top in profile.items():
        table += f"\n\nprofile, {k} (3 steps, top ops by self time)\n" + harness.md_table(
            ["op", "self ms/step", "share"], [[e["op"][:60], f"{e['self_ms']:.2f}", f"{e['share']:.1%}"] for e in top])
    return {"settings": {k: v for k, v in s.items() if k != "device"}, "img_s": img_s, "step_ms": step_ms,
            "infer_ms": ti, "memory": mem, "mac_speedup": macs, "profile": profile, "figures": figs, "table": table,
            "plan_sha256": {"pruned": pair.plan.sha256(), "pruned_r8": pair8.plan.sha256()}}


# --------------------------------------------------------------------------- masked phase
def _masked_model(dense: nn.Module, plan) -> nn.Module:
    """The masked phase's model: the plan's channels masked, pruned convs swapped for the
    masked-conv kernels (``prune.apply(mode="mask", kernel="masked_conv")``)."""
    from .. import prune

    return prune.apply(copy.deepcopy(dense), plan, mode="mask", kernel="masked_conv")


def step_masked(settings: dict) -> dict:
    from .. import kernels

    dev, gpu, sz = _ctx(settings)
    common.set_backend_flags(dev)
    model = sz.get("masked_model", sz["model"])
    s = _model_settings(dev, sz, input_size=sz.get("masked_input"))
    backends = _backends(dev)
    rows, data, figs = [], {}, []
    specs = {"2.31x plan" if model == "resnet50" else "60%": sz.get("masked_spec", sz["spec"]),
             "1.49x plan" if model == "resnet50" else "30%": sz.get("masked_light", sz["light"])}
    start = time.monotonic()
    for i, (label, spec) in enumerate(specs.items()):
        if i and time.monotonic() - start > 0.55 * settings["limit_s"]:   # keep what was measured
            rows.append([label, "-", "skipped", "out of time (the first sparsity took over half the limit)"])
            continue
        pair = common.pruned_pair(model, spec, sz["classes"], s["input_size"])
        masked = _masked_model(pair.dense, pair.plan)
        fns = {"dense": _setup(pair.dense, s)}
        fns["dense"].run(1)
        runs = {"dense": (lambda st=fns["dense"]: st.run(sz["steps"]))}
        for b, why in backends.items():
            if why:
                continue
            st = _setup(masked, s)

            def run(st=st, b=b):
                with kernels.set_backend(b):
                    st.run(sz["steps"])
            if gpu:   # warm-up (and compilation) outside the timed repetitions; the CPU
                run()  # interpreter compiles nothing and is slow, so it is timed cold once
            runs[b] = run
        # compact execution (the gradual phase's default): the cut model of the masks
        compact, _ = masked_bench.compact_setup(pair.dense, pair.plan, s, amp=s["amp"])
        compact.run(1)
        runs["compact"] = (lambda st=compact: st.run(sz["steps"]))
        t = harness.medians(harness.alternate(runs, reps=sz["reps"] if gpu else 1, warmup=0, device=dev))
        ms = {k: v / sz["steps"] for k, v in t.items()}
        data[label] = {"spec": spec, "mac_speedup": pair.mac_speedup, "step_ms": ms}
        for k, v in ms.items():
            rows.append([label, k, f"{v:.2f}", f"{v / ms['dense']:.2f}x"])
            if k != "dense":
                what = "compact step" if k == "compact" else f"masked step, {k} backend"
                figs.append(figure(f"{label}: {what} / dense", v / ms["dense"], "x"))
    for b, why in backends.items():
        if why:
            rows.append(["-", b, "skipped", why])
    table = (f"{model}, batch {s['batch']} x {'x'.join(map(str, s['input_size']))}, amp {s['amp']}, "
             f"median of {sz['reps']} ABBA reps x {sz['steps']} steps\n\n"
             + harness.md_table(["sparsity", "model / backend", "ms/step", "vs dense"], rows))
    return {"masked": data, "backends": backends, "figures": figs, "table": table}


# --------------------------------------------------------------------------- host syncs
def _count_syncs(fn) -> tuple[int, Counter]:
    """Host synchronisations during ``fn()`` as torch.cuda.set_sync_debug_mode("warn") reports
    them (one warning per synchronising call), with the Python lines that made them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    hits = [w for w in caught if "synchroniz" in str(w.message).lower()]
    return len(hits), Counter(f"{os.path.basename(w.filename)}:{w.lineno}" for w in hits)


def step_syncs(settings: dict) -> dict:
    from .. import kernels
    from ..prune import methods
    from ..prune.regularize import GReg, TPP
    from ..train.stage import regularizer_hooks

    dev, gpu, sz = _ctx(settings)
    common.set_backend_flags(dev)
    s = _model_settings(dev, sz, batch=sz["small_batch"], input_size=sz.get("masked_input") if not gpu else None)
    model = sz["model"] if gpu else sz.get("masked_model", sz["model"])
    pair = common.pruned_pair(model, sz["spec"] if model == sz["model"] else sz.get("masked_spec", sz["spec"]),
                              sz["classes"], s["input_size"])
    cases = {}
    plain = _setup(pair.dense, s)
    cases["plain"] = (plain, {})
    for name, cls in (("greg", GReg), ("tpp", TPP)):
        st = _setup(pair.dense, s)
        module = st.engine.module
        reg = cls(module, methods.targets(pair.plan, module))
        cases[name] = (st, regularizer_hooks(reg, module))   # the training stage's own hooks
    cases["masked"] = (_setup(_masked_model(pair.dense, pair.plan), s), {})
    k = 4
    data, rows, figs = {}, [], []
    # On the CPU nothing is counted (set_sync_debug_mode is CUDA's): the same code paths run once,
    # the masked model on the reference kernels (the Triton interpreter takes seconds per conv).
    with contextlib.nullcontext() if gpu else kernels.set_backend("reference"):
        for name, (st, loop) in cases.items():
            if gpu:
                st.run(2, **loop)   # warm-up: cuDNN autotuning and lazy initialisation sync once
                one, _ = _count_syncs(lambda st=st, loop=loop: st.run(1, **loop))
                many, sites = _count_syncs(lambda st=st, loop=loop: st.run(1 + k, **loop))
                per_step = (many - one) / k   # the epoch's one loss readout cancels out
                top = [f"{site} x{n}" for site, n in sites.most_common(3)]
            else:
                st.run(2, **loop)
                per_step, top = None, []
            data[name] = {"syncs_per_step": per_step, "top_sites": top}
            rows.append([name, "n/a (CPU)" if per_step is None else f"{per_step:g}", "; ".join(top)])
            figs.append(figure(f"host syncs per {name} training step", per_step, "",
                               target=0.0 if name == "plain" else None, op="<=", gpu=gpu,
                               note="" if gpu else "CUDA only"))
    table = (f"{model}, batch {s['batch']}, amp {s['amp']}; counted with torch.cuda.set_sync_debug_mode over "
             f"{k} steps (one-step run subtracted)\n\n" + harness.md_table(["step", "syncs/step", "where"], rows))
    return {"syncs": data, "figures": figs, "table": table}


# --------------------------------------------------------------------------- ddp
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def step_ddp(settings: dict) -> dict:
    import torch.distributed as tdist

    from .. import models

    dev, gpu, sz = _ctx(settings)
    common.set_backend_flags(dev)
    backend = "nccl" if gpu else "gloo"
    if not tdist.is_available() or (gpu and not tdist.is_nccl_available()):
        raise Skipped(f"torch.distributed {backend} is not available")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    tdist.init_process_group(backend, rank=0, world_size=1, **({"device_id": dev} if gpu else {}))
    try:
        # on the CPU the small CIFAR net of the masked step: what runs matters here, not its size
        name = sz["model"] if gpu else sz.get("masked_model", sz["model"])
        s = _model_settings(dev, sz, batch=sz["small_batch"], input_size=None if gpu else sz.get("masked_input"))
        torch.manual_seed(0)
        model = models.create(name, num_classes=sz["classes"])
        ddp, plain = _setup(model, s, ddp=True), _setup(model, s, ddp=False)
        start = [p.detach().clone() for p in plain.engine.module.parameters()]
        # cuDNN autotuning picks per-process algorithms: compare one deterministic step
        torch.backends.cudnn.benchmark = False
        ddp.cudnn_benchmark = plain.cudnn_benchmark = False
        ddp.run(1)
        plain.run(1)
        moved = max(float((p - q).abs().max()) for p, q in zip(plain.engine.module.parameters(), start))
        diff = max(float((p - q).abs().max()) for p, q in zip(ddp.engine.module.parameters(),
                                                               plain.engine.module.parameters()))
        ddp.cudnn_benchmark = plain.cudnn_benchmark = True
        t = harness.alternate({"ddp": lambda: ddp.run(sz["steps"]), "plain": lambda: plain.run(sz["steps"])},
                              reps=sz["reps"], warmup=1, device=dev)
        ms = {k: harness.median(v) / sz["steps"] for k, v in t.items()}
        wrapped = isinstance(ddp.engine.model, nn.parallel.DistributedDataParallel)
    finally:
        tdist.destroy_process_group()
    figs = [figure("DDP wraps the model (one-process group)", wrapped, "", target=True, op="==", gpu=True),
            figure("DDP vs plain parameters after one step (max abs diff / max update)", diff / max(moved, 1e-30),
                   "", target=1e-2, op="<=", gpu=True),
            figure(f"DDP ({backend}) step time / plain", ms["ddp"] / ms["plain"], "x"),
            figure(f"DDP ({backend}) img/s", s["batch"] * 1e3 / ms["ddp"], "img/s")]
    rows = [["backend", backend], ["static_graph", ddp.engine.static_graph], ["batch", s["batch"]],
            ["DDP ms/step", f"{ms['ddp']:.2f}"], ["plain ms/step", f"{ms['plain']:.2f}"],
            ["max |param diff| after one step", f"{diff:.3g} (update {moved:.3g})"]]
    return {"backend": backend, "static_graph": ddp.engine.static_graph, "step_ms": ms, "param_diff": diff,
            "figures": figs, "table": harness.md_table(["item", "value"], rows)}


# --------------------------------------------------------------------------- ffcv
def step_ffcv(settings: dict) -> dict:
    from ..data.ffcv import require_ffcv
    from ..errors import UserError

    try:
        require_ffcv()
    except UserError as e:
        raise Skipped(f"{e} (README: carrying wheels to an offline GPU node)") from None
    from ..data.beton import write_beton
    from ..data.ffcv import build_ffcv_loaders

    dev, gpu, sz = _ctx(settings)
    f = sz["ffcv"]
    amp, cl = _fast_path(dev)
    dtype = _dtype_name(amp)
    with tempfile.TemporaryDirectory(prefix="dprune-bench-gpu-") as tmp:
        path = os.path.join(tmp, "synthetic.beton")
        t0 = time.perf_counter()
        info = write_beton("synthetic", out=path, mode="jpg", num_samples=f["n"], image_size=f["image"],
                           progress=False)
        write_s = time.perf_counter() - t0
        loader = build_ffcv_loaders(path, None, pipeline="imagenet", batch_size=f["batch"],
                                    num_workers=os.cpu_count(), device=dev, image_size=f["res"],
                                    channels_last=cl, dtype=dtype, os_cache=True)[0]
        times, first = [], None
        for epoch in range(f["epochs"]):
            loader.set_epoch(epoch)
            n, t0 = 0, time.perf_counter()
            for x, y in loader:
                n += len(y)
                if first is None:
                    first = {"device": str(x.device), "dtype": str(x.dtype).replace("torch.", ""),
                             "shape": list(x.shape), "channels_last": bool(x.is_contiguous(memory_format=torch.channels_last))}
            harness.sync(dev)
            times.append(time.perf_counter() - t0)
    rates = [n / t for t in (times[1:] or times)]
    img_s = harness.median(rates)
    on_device = first is not None and first["device"].startswith(dev.type)
    kind = _gpu_kind(torch.cuda.get_device_name(dev)) if gpu else "H100"
    figs = [figure("batches arrive on the device in the training dtype",
                   bool(on_device and canonical(first["dtype"]) == dtype), "", target=True, op="==", gpu=True),
            figure("FFCV img/s (synthetic JPEGs)", img_s, "img/s", target=DENSE_IMG_S[kind], gpu=gpu,
                   note="target: the dense training rate it must feed")]
    rows = [["images", f"{f['n']} JPEGs ~{f['image'][0]}x{f['image'][1]}, beton {info['bytes'] / 2**20:.1f} MiB, "
             f"written in {write_s:.1f} s"], ["pipeline", f"imagenet, {f['res']} px, batch {f['batch']}, "
                                              f"{os.cpu_count()} threads"],
            ["first batch", first], ["epoch s", ", ".join(f"{t:.2f}" for t in times)], ["img/s (after epoch 0)", f"{img_s:.0f}"]]
    return {"img_s": img_s, "epoch_s": times, "first_batch": first, "figures": figs,
            "table": harness.md_table(["item", "value"], rows)}


# --------------------------------------------------------------------------- compile time
def step_compile(settings: dict) -> dict:
    from .. import kernels
    from ..kernels import dispatch

    dev, gpu, sz = _ctx(settings)
    if not dispatch.triton_usable(dev):
        raise Skipped("triton cannot run here (not installed, or no CUDA device and no interpreter)")
    dtype = torch.bfloat16 if gpu else torch.float32
    ws = [torch.randn(64, 64, 3, 3, device=dev), torch.randn(256, 64, 1, 1, device=dev)]
    case = FULL_CASES["r50_layer1.0.conv2"] if gpu else SMALL_CASES["r50_layer1.0.conv2"]
    tensors, masks, conv = _conv_case(case, "bf16" if gpu else "fp32", dev, channels_last=gpu)
    calls = {
        "filter_norms (l1)": lambda: dispatch.filter_norms(ws, 1),
        f"masked_conv2d fwd+bwd ({str(dtype).replace('torch.', '')}, {'channels_last' if gpu else 'nchw'})":
            lambda: _fwd_bwd(kernels.masked_conv2d, tensors, masks, conv),
    }
    rows, data, figs = [], {}, []
    with kernels.set_backend("triton"):
        for name, fn in calls.items():
            first = harness.time_once(fn, dev)
            again = harness.median([harness.time_once(fn, dev) for _ in range(3)])
            data[name] = {"first_ms": first, "steady_ms": again}
            rows.append([name, f"{first:.1f}", f"{again:.2f}"])
            figs.append(figure(f"{name}: first call (compile + run)", first / 1e3, "s",
                               note="" if gpu else "interpreter: nothing is compiled"))
    note = ("fresh TRITON_CACHE_DIR: every kernel compiles on its first call" if gpu
            else "Triton interpreter (no compilation): times the interpreted first call")
    return {"compile": data, "figures": figs,
            "table": note + "\n\n" + harness.md_table(["kernel", "first call ms", "then ms"], rows)}
