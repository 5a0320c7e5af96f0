"""Data-parallel scaling of the project's real training step: 1 process vs N processes.

    dprune bench train --world-size 2                      # CPU: resnet20, 3x32x32, 32 per rank, gloo
    dprune bench train --world-size 2 --engine deepspeed --ds-config configs/deepspeed/zero0_fp32.json
    dprune bench train --world-size 8 --device cuda --model resnet50 --batch 128 --amp bf16 --json
    python -m distributed_prune.bench.scaling --world-size 2 --out scaling.json    (same arguments)

The same training runs in 1 process and in N processes (``torch.multiprocessing`` spawn; gloo on
CPU, nccl on GPU; each process pinned to ``--threads`` CPU threads): ``build_optimizer`` (SGD,
momentum 0.9, weight decay by rank) + ``build_engine(--engine)`` (DDP or DeepSpeed, as the pipeline
builds it) + ``train_epoch`` over an in-memory synthetic batch (seeded per rank; no data loading
in the measurement). Weak scaling: every process keeps ``--batch`` samples per step, so the global
batch is N x ``--batch``. After ``--warmup`` steps, ``--reps`` repetitions of ``--steps`` steps are
timed between barriers by the shared harness (:func:`.harness.time_once`: CUDA events on GPU,
perf_counter on CPU; rank 0's figure); the step time is the median over repetitions.
Throughput is global samples/s and

    efficiency = throughput_N / (N x throughput_1)

(1.0: perfect; below: gradient all-reduce, stragglers, and on a CPU box, cores and memory
bandwidth shared with the other processes - and with anything else running there).
Prints a Markdown table (or the JSON object with ``--json``); ``--out`` writes the JSON.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import socket
import tempfile
from pathlib import Path

import torch

from ..cmdline import ArgumentParser
from ..errors import UserError
from . import harness

ENGINES = ("ddp", "deepspeed")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="dprune bench train --world-size N", description=__doc__.split("\n")[0])
    p.add_argument("--world-size", type=int, default=2, help="processes of the distributed run")
    p.add_argument("--model", default=None, help="default: resnet20 on CPU, resnet50 on GPU")
    p.add_argument("--ratios", default=None, help="benchmark the physically pruned model")
    p.add_argument("--batch", type=int, default=None, help="per process (default: 32 CPU, 128 GPU)")
    p.add_argument("--input-size", default=None, help="C,H,W (default: 3,32,32 CIFAR nets, 3,224,224 "
                                                     "ImageNet nets on GPU, 3,64,64 on CPU)")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--engine", choices=ENGINES, default="ddp")
    p.add_argument("--ds-config", default=None, help="DeepSpeed JSON (default: the engine's)")
    p.add_argument("--bucket-cap-mb", type=int, default=25)
    p.add_argument("--steps", type=int, default=None, help="steps per timed repetition (default: 10)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default: 5)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 3)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", default=None, help="also write the JSON object to this file")
    return p


def _settings(args) -> dict:
    from . import common

    device = common.resolve_device(args.device)
    gpu = device.type == "cuda"
    model = args.model or ("resnet50" if gpu else "resnet20")
    d = common.defaults(model, device)
    s = {"model": model, "ratios": args.ratios, "device": device.type,
         "batch": common.given(args.batch, 128 if gpu else 32),
         "input_size": common.parse_input_size(args.input_size) if args.input_size else d["input_size"],
         "num_classes": common.given(args.num_classes, d["num_classes"]), "amp": args.amp,
         "engine": args.engine, "ds_config": args.ds_config, "bucket_cap_mb": args.bucket_cap_mb,
         "steps": common.given(args.steps, 10), "reps": common.given(args.reps, 5),
         "warmup": common.given(args.warmup, 3), "threads": args.threads, "seed": args.seed}
    common.check_positive(batch=s["batch"], steps=s["steps"], reps=s["reps"], warmup=s["warmup"],
                          threads=s["threads"], num_classes=s["num_classes"])
    common.check_seed_and_out(args)
    if args.world_size < 2:
        raise UserError(f"--world-size: must be >= 2 for a scaling measurement, got {args.world_size}")
    if gpu and args.world_size > torch.cuda.device_count():
        raise UserError(f"--world-size {args.world_size}: only {torch.cuda.device_count()} CUDA devices")
    if args.ds_config and not Path(args.ds_config).is_file():
        raise UserError(f"--ds-config {args.ds_config}: file not found")
    if args.engine == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise UserError("--engine deepspeed: deepspeed is not installed") from None
    return s


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _build_model(s: dict):
    from .. import models
    from . import common

    torch.manual_seed(s["seed"])
    if s["ratios"]:
        return common.pruned_pair(s["model"], s["ratios"], num_classes=s["num_classes"],
                                  input_size=s["input_size"], seed=s["seed"]).pruned
    return models.create(s["model"], num_classes=s["num_classes"])


def _worker(rank: int, world: int, port: int, s: dict, out: str):
    """One process of a measurement (``world`` = 1: no process group). Rank 0 writes ``out``."""
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(s["threads"])
    from .. import dist
    from ..train.engine import build_engine
    from ..train.loop import train_epoch
    from ..train.optim import build_optimizer
    from ..train.schedules import EpochIterLR

    ctx = dist.init(s["device"], "auto", s["engine"])
    engine, ok = None, False
    try:
        model = _build_model(s).to(ctx.device)
        opt = build_optimizer(model, name="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4)
        engine = build_engine(s["engine"], model, opt, device=ctx.device, amp=s["amp"],
                              bucket_cap_mb=s["bucket_cap_mb"], grad_accum=1, ds_config=s["ds_config"],
                              micro_batch=s["batch"], world_size=world)
        lr = EpochIterLR(engine, "0:0.01", 1, 1)
        g = torch.Generator().manual_seed(s["seed"] + 1000 * rank)
        batch = (torch.randn(s["batch"], *s["input_size"], generator=g).to(ctx.device),
                 torch.randint(0, s["num_classes"], (s["batch"],), generator=g).to(ctx.device))

        def run(steps):
            train_epoch(engine, [batch] * steps, epoch=0, lr_driver=lr)   # ends with an all-reduce

        run(s["warmup"])
        times = []
        for _ in range(s["reps"]):
            dist.barrier()   # every rank starts a repetition together
            times.append(harness.time_once(lambda: run(s["steps"]), ctx.device) / s["steps"])
            dist.barrier()
        if rank == 0:
            Path(out).write_text(json.dumps({"step_ms_reps": times}))
        ok = True
    finally:
        del engine
        dist.shutdown(barrier=ok)


def measure(world: int, s: dict) -> dict:
    """Median step time of ``world`` spawned processes."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="dprune-scaling-") as tmp:
        out = os.path.join(tmp, "result.json")
        env_threads = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = str(s["threads"])   # the children's OpenMP pools
        try:
            mp.start_processes(_worker, args=(world, _free_port(), s, out), nprocs=world,
                               start_method="spawn", join=True)
        finally:
            if env_threads is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = env_threads
        reps = json.loads(Path(out).read_text())["step_ms_reps"]
    step_ms = harness.median(reps)
    return {"world_size": world, "batch_per_rank": s["batch"], "global_batch": world * s["batch"],
            "step_ms": round(step_ms, 3), "step_ms_reps": [round(t, 3) for t in reps],
            "samples_s": round(1e3 * world * s["batch"] / step_ms, 2),
            "spread": round(harness.spread(reps), 3)}


def bench(args) -> tuple[dict, str]:
    s = _settings(args)
    one = measure(1, s)
    many = measure(args.world_size, s)
    eff = many["samples_s"] / (args.world_size * one["samples_s"])
    result = {
        "model": s["model"], "ratios": s["ratios"], "device": s["device"], "engine": s["engine"],
        "ds_config": s["ds_config"], "amp": s["amp"], "input_size": list(s["input_size"]),
        "num_classes": s["num_classes"], "batch_per_rank": s["batch"], "steps": s["steps"],
        "reps": s["reps"], "warmup": s["warmup"], "threads_per_rank": s["threads"],
        "backend": "nccl" if s["device"] == "cuda" else "gloo", "scaling": "weak",
        "results": [one, many], "efficiency": round(eff, 4),
        "torch": torch.__version__, "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    rows = [[r["world_size"], r["batch_per_rank"], r["global_batch"], f"{r['step_ms']:.1f}",
             f"{r['samples_s']:.1f}", f"{r['spread']:.2f}"] for r in (one, many)]
    table = harness.md_table(["processes", "batch/rank", "global batch", "ms/step", "samples/s", "spread"], rows)
    text = (f"{s['model']}{' pruned ' + s['ratios'] if s['ratios'] else ''} on {s['device']} "
            f"({result['backend']}, engine {s['engine']}, amp {s['amp']}, input {s['input_size']}, "
            f"{s['threads']} thread(s)/process)\n\n{table}\n\n"
            f"scaling efficiency (throughput_{args.world_size} / ({args.world_size} x throughput_1)): {eff:.3f}")
    return result, text


def main(argv=None) -> int:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    result, text = bench(args)
    harness.emit(result, text, as_json=args.json, out=args.out)
    return 0


if __name__ == "__main__":
    import sys

    from ..cmdline import run   # one error path: "dprune: error: ..." and exit status 2

    argv = sys.argv[1:]
    if not any(a.startswith("--world-size") for a in argv):
        argv = ["--world-size", "2", *argv]
    sys.exit(run(lambda: main(argv)))
