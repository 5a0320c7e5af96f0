"""Kernel benchmark on ResNet-50's convolution shapes.

    dprune bench kernels [--device cuda|cpu] [--dtype bf16] [--batch 64] [--reps N]
                         [--out FILE.json] [--write-tuning [FILE]]
    python -m distributed_prune.bench.kernels --device cpu --out kernels.json

Measures, in one run and against baselines timed in the same run:

1. importance of all ResNet-50 conv weights: ``filter_norms`` (Triton: one launch) vs a
   per-layer PyTorch loop (the reference), as a speedup;
2. masked conv forward+backward with 30/50/70/90% of the output channels masked, for each backend
   available (reference = dense conv on masked weights, triton, native = csrc gather + vendor conv),
   as time relative to the dense vendor convolution (cuDNN / oneDNN) of the same layer.

Shapes come from torchvision's ``resnet50`` (no weights), walked with forward hooks on a
meta-device forward; identical layers are timed once and weighted by their count.  Times are
medians of alternating (ABBA) repetitions after warm-up, dense and every backend of a row in
the same repetitions (:mod:`.harness`: CUDA events on GPU, ``time.perf_counter`` on CPU).
``--write-tuning`` stores the fastest masked-conv backend per shape bucket in the table read by :mod:`distributed_prune.kernels.dispatch`.  CPU numbers do not measure the GPU targets.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ..cmdline import ArgumentParser
from ..dtypes import DTYPES
from . import harness

SPARSITIES = (0.3, 0.5, 0.7, 0.9)


def resnet50_conv_shapes(batch: int) -> list[dict]:
    """Unique ResNet-50 conv layers at 224x224: input shape, conv params and how often each
    occurs (53 convs -> about 20 unique), found by hooking every nn.Conv2d of torchvision's
    resnet50 during a forward on the meta device (no weights, no compute)."""
    from torchvision.models import resnet50

    with torch.device("meta"):
        model = resnet50(weights=None)
    seen: dict[tuple, dict] = {}

    def hook(mod, inputs, _out):
        x = inputs[0]
        key = (tuple(x.shape[1:]), mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
               mod.dilation, mod.groups)
        if key not in seen:
            seen[key] = dict(name=names[mod], x=(batch, *x.shape[1:]),
                             w=(mod.out_channels, mod.in_channels // mod.groups, *mod.kernel_size),
                             stride=tuple(mod.stride), padding=tuple(mod.padding),
                             dilation=tuple(mod.dilation), groups=mod.groups, count=0)
        seen[key]["count"] += 1

    names = {m: n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    handles = [m.register_forward_hook(hook) for m in names]
    with torch.no_grad():
        model(torch.empty(1, 3, 224, 224, device="meta"))
    for h in handles:
        h.remove()
    return list(seen.values())


def resnet50_conv_weights(device, dtype) -> list[torch.Tensor]:
    from torchvision.models import resnet50

    model = resnet50(weights=None).to(device=device, dtype=dtype)
    return [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


def _timer(device: torch.device, reps: int, warmup: int):
    """``bench({name: fn}) -> {name: median ms}``: the shared harness (ABBA repetitions after
    warm-up; CUDA events on GPU, perf_counter on CPU)."""
    def bench(fns):
        return harness.medians(harness.alternate(fns, reps=reps, warmup=warmup, device=device))
    return bench


def _available_backends(device: torch.device, wanted: list[str]) -> dict[str, str]:
    """backend -> "" if usable, else the reason it is skipped."""
    from distributed_prune.kernels import dispatch, native
    status = {}
    for name in wanted:
        if name in ("reference", "gather"):
            status[name] = ""
        elif name == "triton":
            ok = device.type == "cuda" and dispatch.triton_usable(device) \
                and not dispatch.interpreter_enabled()
            status[name] = "" if ok else "needs a CUDA GPU (the interpreter is not timed)"
        elif name == "native":
            status[name] = "" if native.available() else native.unavailable_reason()
    return status


def bench_importance(device, dtype, bench, backends) -> dict:
    from distributed_prune.kernels import dispatch, reference
    ws = resnet50_conv_weights(device, dtype)
    fns = {"loop": lambda: reference.filter_norms(ws, 1)}
    if backends.get("triton") == "":
        with dispatch.set_backend("triton"):
            got = dispatch.filter_norms(ws, 1)
        for g, r in zip(got, reference.filter_norms(ws, 1)):
            torch.testing.assert_close(g, r, atol=1e-3, rtol=1e-3)

        def triton_norms():
            with dispatch.set_backend("triton"):
                dispatch.filter_norms(ws, 1)
        fns["triton"] = triton_norms
    ms = bench(fns)
    row = {"tensors": len(ws), "filters": sum(w.shape[0] for w in ws),
           "elements": sum(w.numel() for w in ws), "per_layer_loop_ms": ms["loop"]}
    if "triton" in ms:
        row["triton_one_launch_ms"] = ms["triton"]
        row["triton_speedup"] = ms["loop"] / ms["triton"]
    return row


def bench_masked_conv(layer, sparsities, device, dtype, bench, backends, in_mask: bool):
    from distributed_prune.kernels import dispatch, reference
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(layer["x"], generator=gen).to(device=device, dtype=dtype)
    x = x.to(memory_format=torch.channels_last).requires_grad_()
    w = (torch.randn(layer["w"], generator=gen) * 0.05).to(device=device, dtype=dtype)
    w = w.to(memory_format=torch.channels_last).requires_grad_()
    conv = dict(stride=layer["stride"], padding=layer["padding"], dilation=layer["dilation"],
                groups=layer["groups"])
    with torch.no_grad():
        go = torch.randn_like(F.conv2d(x, w, None, **conv))

    def dense():
        torch.autograd.grad(F.conv2d(x, w, None, **conv), (x, w), go)

    rows = []
    o, c = layer["w"][0], layer["x"][1]
    for s in sparsities:
        out_mask = torch.ones(o, device=device)
        out_mask[torch.randperm(o, generator=gen)[:round(s * o)]] = 0
        im = None
        if in_mask and c > 3:
            im = torch.ones(c, device=device)
            im[torch.randperm(c, generator=gen)[:round(s * c)]] = 0
        out_idx = torch.nonzero(out_mask).view(-1)
        in_idx = torch.nonzero(im).view(-1) if im is not None else None
        # Dense is timed in the same alternating repetitions as every variant of this row: on a
        # shared machine a baseline taken once drifts with the load.
        fns = {"dense": dense}
        for name, why in backends.items():
            if why:
                continue
            if name == "reference":
                def step():
                    y = reference.masked_conv2d(x, w, None, out_mask, in_mask=im, **conv)
                    torch.autograd.grad(y, (x, w), go)
            else:
                def step(name=name):
                    with dispatch.set_backend(name):
                        # Precomputed indices, as MaskedConv2d caches them (no nonzero sync).
                        y = dispatch._masked_conv2d(x, w, None, out_mask, in_mask=im,
                                                    out_index=out_idx, in_index=in_idx, **conv)
                    torch.autograd.grad(y, (x, w), go)
            fns[name] = step
        ms = bench(fns)
        row = {"layer": layer["name"], "count": layer["count"], "x": list(layer["x"]),
               "w": list(layer["w"]), "stride": layer["stride"][0], "sparsity": s,
               "dense_ms": ms["dense"]}
        for name in fns:
            if name != "dense":
                row[f"{name}_ms"] = ms[name]
                row[f"{name}_vs_dense"] = ms[name] / ms["dense"]
        rows.append(row)
    return rows


def _bucket(row, groups=1):
    from distributed_prune.kernels.dispatch import shape_bucket
    return shape_bucket(row["x"], row["w"], (row["stride"], row["stride"]), groups,
                        1.0 - row["sparsity"])


def write_tuning(path: Path, device: torch.device, rows: list[dict], backends) -> int:
    """Merge the fastest measured backend per shape bucket into the tuning table."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    entries = dict(data.get("entries", {}))
    names = [b for b, why in backends.items() if not why]
    n = 0
    for row in rows:
        timed = {b: row[f"{b}_ms"] for b in names if f"{b}_ms" in row}
        if len(timed) < 2:
            continue
        entries[f"{device.type}|masked_conv2d|{_bucket(row)}"] = min(timed, key=timed.get)
        n += 1
    data.update(version=1, entries=dict(sorted(entries.items())),
                note="written by `dprune bench kernels --write-tuning`: fastest measured "
                     "masked_conv2d backend per shape bucket (see kernels/dispatch.py)")
    harness.write_json(path, data)
    return n


def _fmt_ratio(row, name):
    v = row.get(f"{name}_vs_dense")
    return f"{v:6.2f}x" if v is not None else "    n/a"


def format_tables(result: dict) -> str:
    lines = []
    imp = result["importance"]
    lines.append(f"Importance (L1, {imp['tensors']} ResNet-50 conv weights, {imp['filters']} "
                 f"filters): per-layer PyTorch loop {imp['per_layer_loop_ms']:.3f} ms")
    if "triton_one_launch_ms" in imp:
        lines.append(f"  filter_norms Triton (1 launch): {imp['triton_one_launch_ms']:.3f} ms "
                     f"-> {imp['triton_speedup']:.1f}x faster than the loop")
    else:
        lines.append(f"  filter_norms Triton: n/a ({result['backends'].get('triton', '')})")
    names = [b for b, why in result["backends"].items() if not why]
    lines.append("")
    lines.append("Masked conv fwd+bwd, time relative to dense conv of the same layer "
                 "(lower is better; <1 = faster than dense)")
    head = f"{'layer':<22}{'input':>18}{'filters':>9}{'s':>4}{'sparsity':>9}{'dense ms':>10}"
    head += "".join(f"{n:>11}" for n in names)
    lines.append(head)
    for row in result["masked_conv"]:
        shape = "x".join(map(str, row["x"][1:]))
        k = f"{row['w'][2]}x{row['w'][3]}"
        line = (f"{row['layer'][:21]:<22}{shape:>18}{row['w'][0]:>5} {k:<3}{row['stride']:>4}"
                f"{row['sparsity']:>9.0%}{row['dense_ms']:>10.3f}")
        line += "".join(f"{_fmt_ratio(row, n):>11}" for n in names)
        lines.append(line)
    lines.append("")
    lines.append("ResNet-50 total (each layer weighted by its count), relative to dense:")
    for s, tot in result["totals"].items():
        parts = ", ".join(f"{n} {tot[n]:.2f}x" for n in names if n in tot)
        lines.append(f"  {float(s):.0%} masked: dense {tot['dense_ms']:.2f} ms; {parts}")
    skipped = {b: why for b, why in result["backends"].items() if why}
    for b, why in skipped.items():
        lines.append(f"  ({b} not measured: {why})")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="dprune bench kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--batch", type=int, default=None, help="default: 64 on cuda, 2 on cpu")
    p.add_argument("--reps", type=int, default=None,
                   help="timed alternating repetitions per row (default: 20 cuda, 5 cpu)")
    p.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)),
                   help="fractions of output channels masked (default 0.3,0.5,0.7,0.9)")
    p.add_argument("--backends", default="reference,gather,triton,native")
    p.add_argument("--in-mask", action="store_true",
                   help="also mask the same fraction of input channels")
    p.add_argument("--max-layers", type=int, default=None,
                   help="time only the first N unique layers (quick runs)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice); 1 gives steadier "
                        "numbers on a shared machine")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    p.add_argument("--write-tuning", nargs="?", const="", default=None, metavar="FILE",
                   help="update the backend table (default: the one dispatch reads)")
    return p


KNOWN_BACKENDS = ("reference", "gather", "triton", "native")  # those _available_backends knows


def _bad_arguments(args) -> str | None:
    """What is wrong with the options (checked before any timing), or None."""
    for opt in ("batch", "reps", "max_layers", "threads"):
        v = getattr(args, opt)
        if v is not None and v < 1:
            return f"--{opt.replace('_', '-')} must be >= 1, got {v}"
    unknown = [b.strip() for b in args.backends.split(",") if b.strip() and b.strip() not in KNOWN_BACKENDS]
    if unknown:
        return f"--backends: unknown backend {unknown[0]!r} (choose from {', '.join(KNOWN_BACKENDS)})"
    if args.out is not None and (args.out.is_dir() or not str(args.out).strip()):
        return f"--out {args.out}: expected a file name for the JSON results"
    return None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    bad = _bad_arguments(args)
    if bad:
        print(f"dprune bench kernels: {bad}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("dprune bench kernels: --device cuda but no CUDA device is available",
              file=sys.stderr)
        return 2
    try:
        sparsities = [float(s) for s in args.sparsities.split(",") if s]
    except ValueError:
        print(f"dprune bench kernels: bad --sparsities {args.sparsities!r}", file=sys.stderr)
        return 2
    if not all(0.0 <= s < 1.0 for s in sparsities):
        print("dprune bench kernels: --sparsities must lie in [0, 1)", file=sys.stderr)
        return 2
    gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    batch = args.batch or (64 if gpu else 2)
    reps = args.reps or (20 if gpu else 5)
    bench = _timer(device, reps, warmup=3 if gpu else 1)
    backends = _available_backends(device, [b.strip() for b in args.backends.split(",") if b.strip()])

    layers = resnet50_conv_shapes(batch)
    if args.max_layers:
        layers = layers[:args.max_layers]
    result = {
        "benchmark": "kernels", **harness.env_info(device),
        "dtype": str(dtype).replace("torch.", ""), "batch": batch, "channels_last": True,
        "torch": torch.__version__, "backends": backends, "sparsities": sparsities,
    }
    try:
        import triton
        result["triton"] = triton.__version__
    except Exception:
        result["triton"] = None
    result["importance"] = bench_importance(device, dtype, bench, backends)
    rows = []
    for layer in layers:
        rows += bench_masked_conv(layer, sparsities, device, dtype, bench, backends, args.in_mask)
    result["masked_conv"] = rows
    totals = {}
    for s in sparsities:
        sel = [r for r in rows if r["sparsity"] == s]
        tot = {"dense_ms": sum(r["dense_ms"] * r["count"] for r in sel)}
        for b, why in backends.items():
            if not why:
                tot[b] = sum(r[f"{b}_ms"] * r["count"] for r in sel) / tot["dense_ms"]
        totals[str(s)] = tot
    result["totals"] = totals

    print(format_tables(result))
    if args.write_tuning is not None:
        from distributed_prune.kernels.dispatch import tuning_path
        path = Path(args.write_tuning) if args.write_tuning else tuning_path()
        n = write_tuning(path, device, rows, backends)
        print(f"tuning table: {n} entries written to {path}")
    if args.out:
        harness.write_json(args.out, result)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
