"""Training throughput of the project's real training step, dense vs pruned.

    dprune bench train                                    # resnet50 [0,0.6,0.6,0.6,0.21,0]; CPU: 8 x 3x64x64
    dprune bench train --model resnet50 --batch 256 --input-size 3,224,224 --amp bf16 --channels-last \\
        --json --out train.json                           # the GPU target run (H100)
    dprune bench train --fast-path-ablation               # each fast-path item on/off, same run
    dprune bench train --profile prof/                    # torch.profiler trace + top ops per model
    dprune bench train --world-size 8 ...                 # -> distributed_prune.bench.scaling

The step is the pipeline's: ``build_optimizer`` + ``build_engine("ddp", ...)`` + ``train_epoch``
(autocast, GradScaler, channels_last, optional torch.compile), fed by an in-memory loader of a
device-resident synthetic batch (no host sync per step; one per timed repetition, when
``train_epoch`` reads its loss). Dense and pruned repetitions of ``--steps`` steps alternate
(ABBA) after ``--warmup`` steps; times are medians (CUDA events on GPU, perf_counter on CPU).

Reported per model: images/s, ms/step, achieved TFLOP/s (3 x forward MACs x 2 flops per image:
forward + two backward matmuls), peak training memory (see :func:`.common.train_memory`: CUDA
allocator peak on GPU, peak-RSS delta on CPU) and the ratios pruned/dense. ``--json`` prints
``model, ratios, device, device_name, amp, channels_last, compile, batch, input_size, steps, reps,
warmup, mac_speedup, plan_sha256, dense {img_s, step_ms, tflops, peak_mem_bytes, macs, params,
spread}, pruned {same}, speedup, mem_ratio, memory_method, torch, timing, cpu_threads, date``,
plus ``ablation`` (rows ``item, on, off, dense_ratio, pruned_ratio, note``; ratio = img/s on / off,
null where n/a) and ``profile`` (written files) when asked.

GPU targets (H100, 224x224, batch 256, bf16 + channels_last): dense ResNet-50 >= 3,000 img/s;
the 2.31x-pruned model trains >= 1.8x faster and uses <= 0.7x the dense peak memory.
"""
from __future__ import annotations

import argparse
import gc
from pathlib import Path

import torch

from ..cmdline import ArgumentParser
from ..errors import UserError
from . import common

# fast-path items: (name, settings when on, settings when off, measurable on CPU, note when n/a)
ABLATIONS = (
    ("channels_last + bf16 autocast", {"channels_last": True, "amp": "bf16"},
     {"channels_last": False, "amp": "none"}, True, ""),
    ("cudnn.benchmark", {"cudnn_benchmark": True}, {"cudnn_benchmark": False}, False, "cuDNN only"),
    ("fused SGD (vs foreach)", {"fused": True}, {"fused": False}, True, ""),
    ("torch.compile", {"compile": True}, {"compile": False}, False,
     "skipped on CPU (minutes of compile on 2 cores)"),
    ("device-resident batch (vs pinned H2D non_blocking)", {"host_batch": False}, {"host_batch": True}, False,
     "no host-to-device copy on CPU"),
)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="dprune bench train", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--ratios", default=common.RESNET50_RATIOS)
    p.add_argument("--criterion", default="l1")
    p.add_argument("--round-to", type=int, default=None)
    p.add_argument("--batch", type=int, default=None, help="default: 256 on GPU, 8 on CPU")
    p.add_argument("--input-size", default=None, help="C,H,W (default: 224 on GPU, 64 on CPU; CIFAR nets 32)")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], default=None, help="default: bf16 GPU, none CPU")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="default: on for GPU, off for CPU")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--steps", type=int, default=None, help="steps per timed repetition (default: 10 GPU, 2 CPU)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per model (default: 5 GPU, 3 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per model (default: 10 GPU, 1 CPU)")
    p.add_argument("--world-size", type=int, default=1, help="> 1: distributed_prune.bench.scaling")
    p.add_argument("--fast-path-ablation", action="store_true")
    p.add_argument("--profile", default=None, metavar="DIR")
    common.add_common_arguments(p)
    return p


def _settings(args) -> dict:
    s = common.base_settings(args)
    gpu = s.pop("gpu")
    s.update({"amp": args.amp or ("bf16" if gpu else "none"),
              "compile": args.compile, "steps": common.given(args.steps, 10 if gpu else 2),
              "reps": common.given(args.reps, 5 if gpu else 3), "warmup": common.given(args.warmup, 10 if gpu else 1)})
    common.check_positive(batch=s["batch"], steps=s["steps"], reps=s["reps"], warmup=s["warmup"],
                          num_classes=s["num_classes"], round_to=args.round_to)
    return s


def _setup(model, s: dict, **over) -> common.TrainSetup:
    kw = {"amp": s["amp"], "channels_last": s["channels_last"], "compile": s["compile"], **over}
    return common.TrainSetup(model, device=s["device"], batch=s["batch"], input_size=s["input_size"],
                             num_classes=s["num_classes"], **kw)


def _warm(setups: dict, s: dict):
    """Warm-up steps (cuDNN autotuning, compilation, optimizer state) of every setup."""
    for st in setups.values():
        st.run(max(s["warmup"], 1))


def _time(setups: dict, s: dict) -> dict:
    """Per setup, ms per step of each of the alternating repetitions of ``steps`` steps."""
    t = common.alternate({k: (lambda st=st: st.run(s["steps"])) for k, st in setups.items()},
                         reps=s["reps"], warmup=0, device=s["device"])
    return {k: [ms / s["steps"] for ms in v] for k, v in t.items()}


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def ablation(pair: common.Pair, s: dict) -> list[dict]:
    """Each fast-path item on and off (everything else as in ``s``), dense and pruned, in this
    run; ratio = img/s with the item on / img/s with it off."""
    gpu = s["device"].type == "cuda"
    rows = []
    for name, on, off, cpu_ok, why in ABLATIONS:
        row = {"item": name, "on": on, "off": off, "dense_ratio": None, "pruned_ratio": None, "note": ""}
        if not gpu and not cpu_ok:
            row["note"] = f"n/a on CPU: {why}"
            rows.append(row)
            continue
        setups = {f"{m}:{k}": _setup(getattr(pair, m), s, **cfg)
                  for m in ("dense", "pruned") for k, cfg in (("on", on), ("off", off))}
        _warm(setups, s)
        t = {k: common.median(v) for k, v in _time(setups, s).items()}
        for m in ("dense", "pruned"):
            row[f"{m}_ratio"] = t[f"{m}:off"] / t[f"{m}:on"]
        if not gpu and "amp" in on:
            row["note"] = "CPU bf16 autocast (not the GPU fast path)"
        rows.append(row)
        del setups
        _free(s["device"])
    return rows


def profile(setups: dict, out_dir: str, s: dict) -> dict:
    """A torch.profiler trace (Chrome JSON) and a key_averages table (top 25 ops by self time)
    of 3 steps of each setup, after one unprofiled step."""
    from torch.profiler import ProfilerActivity, profile as tprofile, record_function

    d = Path(out_dir)
    gpu = s["device"].type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    sort = "self_device_time_total" if gpu else "self_cpu_time_total"
    files = {}
    for name, st in setups.items():
        st.run(1)
        with tprofile(activities=acts) as prof:
            for i in range(3):
                with record_function(f"train_step_{i}"):
                    st.run(1)
        trace, table = d / f"trace_{name}.json", d / f"ops_{name}.txt"
        prof.export_chrome_trace(str(trace))
        table.write_text(prof.key_averages().table(sort_by=sort, row_limit=25) + "\n")
        files[name] = {"trace": str(trace), "ops": str(table)}
    return files


def bench(args) -> tuple[dict, str]:
    s = _settings(args)
    dev = s["device"]
    common.set_backend_flags(dev)
    pair = common.pruned_pair(args.model, args.ratios, s["num_classes"], s["input_size"], args.round_to,
                              args.criterion, seed=args.seed)
    setups = {"dense": _setup(pair.dense, s), "pruned": _setup(pair.pruned, s)}
    _warm(setups, s)
    # memory before timing, smaller model first: on CPU a failed RSS reset then over-states dense only
    mem = {k: common.train_memory(setups[k], steps=2) for k in ("pruned", "dense")}
    t = _time(setups, s)
    res = {"model": args.model, "ratios": args.ratios, "round_to": args.round_to, **common.env_info(dev),
           "amp": s["amp"], "channels_last": s["channels_last"], "compile": s["compile"], "batch": s["batch"],
           "input_size": list(s["input_size"]), "num_classes": s["num_classes"], "steps": s["steps"],
           "reps": s["reps"], "warmup": s["warmup"], "mac_speedup": pair.mac_speedup,
           "plan_sha256": pair.plan.sha256(), "memory_method": mem["dense"]["memory_method"]}
    for k, macs, params in (("dense", pair.dense_macs, pair.dense_params),
                            ("pruned", pair.pruned_macs, pair.pruned_params)):
        step_ms = common.median(t[k])
        img_s = s["batch"] * 1e3 / step_ms
        res[k] = {"img_s": img_s, "step_ms": step_ms, "tflops": 3 * 2 * macs * img_s / 1e12,
                  "peak_mem_bytes": mem[k]["peak_mem_bytes"], "macs": macs, "params": params,
                  "spread": common.spread(t[k])}
    res["speedup"] = res["pruned"]["img_s"] / res["dense"]["img_s"]
    res["mem_ratio"] = res["pruned"]["peak_mem_bytes"] / res["dense"]["peak_mem_bytes"]
    if args.profile:
        res["profile"] = profile(setups, args.profile, s)
    del setups
    _free(dev)
    if args.fast_path_ablation:
        res["ablation"] = ablation(pair, s)
    return res, _text(res)


def _text(r: dict) -> str:
    d, p = r["dense"], r["pruned"]
    rows = [[k, f"{x['img_s']:.1f}", f"{x['step_ms']:.1f}", f"{x['tflops']:.3f}",
             f"{x['peak_mem_bytes'] / 2**20:.0f}", f"{x['macs'] / 1e6:.1f}", f"{x['spread']:.2f}"]
            for k, x in (("dense", d), ("pruned", p))]
    rows.append(["pruned/dense", f"{r['speedup']:.2f}x", "", "", f"{r['mem_ratio']:.2f}x",
                 f"1/{r['mac_speedup']:.2f}", ""])
    out = (f"{r['model']} {r['ratios']}  {r['device_name']} ({r['device']}, {r['cpu_threads']} threads)  "
           f"amp={r['amp']}{' channels_last' if r['channels_last'] else ''}{' compile' if r['compile'] else ''}"
           f"  batch {r['batch']} x {'x'.join(map(str, r['input_size']))}  median of {r['reps']} alternating"
           f" reps x {r['steps']} steps ({r['timing']}); memory: {r['memory_method']}\n"
           + common.md_table(["model", "img/s", "ms/step", "TFLOP/s", "peak MiB", "MMACs/img", "spread"], rows))
    if "ablation" in r:
        fmt = lambda v: "n/a" if v is None else f"{v:.2f}x"  # noqa: E731
        out += "\n\nfast-path ablation (img/s with the item on / off)\n" + common.md_table(
            ["item", "dense", "pruned", "note"],
            [[a["item"], fmt(a["dense_ratio"]), fmt(a["pruned_ratio"]), a["note"]] for a in r["ablation"]])
    if "profile" in r:
        out += "\n\nprofile: " + ", ".join(f"{k}: {v['trace']}, {v['ops']}" for k, v in r["profile"].items())
    return out


def main(argv=None) -> int:
    argv = list(argv if argv is not None else __import__("sys").argv[1:])
    pre = ArgumentParser(prog="dprune bench train", add_help=False)
    pre.add_argument("--world-size", type=int, default=1)
    known, _ = pre.parse_known_args(argv)
    if known.world_size > 1:
        try:
            from . import scaling
        except ImportError as e:
            raise UserError(f"dprune bench train --world-size {known.world_size}: the scaling benchmark "
                            f"is not available ({e})") from None
        return scaling.main(argv)
    args = build_parser().parse_args(argv)
    if args.world_size < 1:
        raise UserError(f"--world-size: must be >= 1, got {args.world_size}")
    if args.profile:  # fail before minutes of benchmarking, not after
        try:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--profile {args.profile}: cannot create the directory ({e.strerror})") from None
    res, text = bench(args)
    common.emit(res, text, as_json=args.json, out=args.out)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
