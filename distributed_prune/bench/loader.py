"""Loader benchmark: FFCV .beton vs torchvision ImageFolder + PIL, same augmentation, on CPU.

    dprune bench loader [--num-images 2000] [--size 400x350] [--workers N] [--batch 64]
                        [--epochs 3] [--ranks 1,2] [--out FILE.json]
    python -m distributed_prune.bench.loader ...   (same arguments)

Generates ``num-images`` deterministic photo-like JPEGs (quality 90, sides ~``size`` +-10%,
10 classes) as an ImageFolder in a temporary directory, writes a .beton from it (all JPEG, so
both loaders decode the same JPEGs) and a second one as ffcv-imagenet's recipe does
(``proportion`` mode: each image stored raw with probability 0.5, else JPEG), then measures:

1. throughput (images/s) of one process with ``--workers`` workers (torchvision: worker
   processes; FFCV: decoding threads): RandomResizedCrop(224) + horizontal flip + normalized
   float32 NCHW, batch ``--batch``, ``drop_last``. The three loaders live in one fresh
   process and their epochs are interleaved (``--epochs`` rounds of one epoch each), so load
   from other jobs hits them alike. Round 0 (worker start, numba compilation) is reported
   apart; the rate is the median (and best) over the later rounds.
2. memory of FFCV ranks: ``R`` spawned processes (a gloo group, ``distributed=True``, the
   workers split between them) read the same .beton with ``os_cache`` on and off; per rank the
   resident set (RSS), proportional set (PSS: shared pages divided among the processes that
   map them) and private memory from ``/proc/self/smaps_rollup`` half-way through the last
   epoch, and the peak RSS (VmHWM).

Prints markdown tables with the FFCV / torchvision ratio and writes everything to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from ..cmdline import ArgumentParser, parse_image_size
from . import harness

MB = 1 << 20


# ----------------------------------------------------------------------------- memory

def _smaps(pid: int | str = "self") -> dict:
    """RSS / PSS / private bytes of one process from /proc (Linux), {} where unavailable."""
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Rss", "Pss", "Private_Clean", "Private_Dirty"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        return {}
    return {"rss": out.get("Rss", 0), "pss": out.get("Pss", 0),
            "private": out.get("Private_Clean", 0) + out.get("Private_Dirty", 0)}


def _self_memory() -> dict:
    """This process's memory and its peak RSS (VmHWM: unlike ru_maxrss, not inherited from
    the process that spawned it)."""
    peak = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return {**{f"{k}_mb": round(v / MB, 1) for k, v in _smaps().items()},
            "peak_rss_mb": round(peak / MB, 1)}


# ----------------------------------------------------------------------------- data

def _save_jpeg(args) -> None:
    from PIL import Image

    source, start, stop, root = args
    for i in range(start, stop):
        image, label = source[i]
        Image.fromarray(image).save(Path(root) / f"class_{label:02d}" / f"{i:06d}.jpg",
                                    quality=90)


def make_image_folder(root: Path, num_images: int, size, workers: int) -> Path:
    """Deterministic ImageFolder of JPEGs (see the module docstring) at ``root/train``."""
    import multiprocessing as mp

    from distributed_prune.data.beton import SyntheticImages

    source = SyntheticImages(num_images, size, num_classes=10, seed=0, size_jitter=0.1)
    train = root / "train"
    for c in range(10):
        (train / f"class_{c:02d}").mkdir(parents=True, exist_ok=True)
    step = max(1, -(-num_images // (4 * workers)))
    jobs = [(source, a, min(a + step, num_images), str(train)) for a in range(0, num_images, step)]
    with mp.get_context("fork").Pool(workers) as pool:
        pool.map(_save_jpeg, jobs)
    return train


# ----------------------------------------------------------------------------- timing

def _epoch(loader) -> tuple[int, float]:
    start, n = time.perf_counter(), 0
    for _, labels in loader:
        n += len(labels)
    return n, time.perf_counter() - start


def _rates(n: int, times: list[float]) -> dict:
    rates = [n / t for t in (times[1:] or times)]
    return {"images_per_epoch": n, "first_epoch_s": round(times[0], 3),
            "epoch_s": [round(t, 3) for t in times],
            "images_per_s": round(harness.median(rates), 1),
            "best_images_per_s": round(max(rates), 1)}


def _torchvision_loader(folder: Path, batch: int, workers: int):
    """ImageFolder + PIL decode, RandomResizedCrop(224) + flip + ToTensor + Normalize."""
    import torch
    from torchvision import datasets, transforms as T

    from distributed_prune.data.torchvision import IMAGENET_MEAN, IMAGENET_STD

    tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    ds = datasets.ImageFolder(str(folder), transform=tf)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True,
                                       num_workers=workers, persistent_workers=workers > 0,
                                       generator=torch.Generator().manual_seed(0))


def _ffcv_loader(beton: str, batch: int, workers: int, **kwargs):
    """The project's ``imagenet`` train pipeline at 224 px, float32 on CPU."""
    from distributed_prune.data.ffcv import build_ffcv_loaders

    return build_ffcv_loaders(beton, None, pipeline="imagenet", batch_size=batch,
                              num_workers=workers, image_size=224, **kwargs)[0]


def bench_throughput(folder: str, betons: dict, *, batch: int, workers: int,
                     rounds: int) -> dict:
    """Epochs of all loaders interleaved (round r: one epoch of each), so that load from other
    jobs on the machine hits them alike; round 0 is warm-up. Runs in its own process."""
    loaders = {"torchvision": (_torchvision_loader(Path(folder), batch, workers), None)}
    for name, path in betons.items():
        ff = _ffcv_loader(path, batch, workers, os_cache=True)
        loaders[name] = (ff, ff.set_epoch)
    times = {name: [] for name in loaders}
    counts = {}
    names = list(loaders)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):   # ABBA, as the harness orders reps
            loader, set_epoch = loaders[name]
            if set_epoch is not None:
                set_epoch(r)
            counts[name], t = _epoch(loader)
            times[name].append(t)
    return {name: _rates(counts[name], times[name]) for name in loaders}


def _isolated_main(fn, kwargs: dict, out: str) -> None:
    Path(out).write_text(json.dumps(fn(**kwargs)))


def isolated(fn, out: Path, **kwargs) -> dict:
    """Run ``fn(**kwargs)`` in a fresh spawned process (no threads, workers or compiled
    pipelines left by the caller) and return its JSON-able result."""
    import multiprocessing as mp

    p = mp.get_context("spawn").Process(target=_isolated_main, args=(fn, kwargs, str(out)))
    p.start()
    p.join()
    if p.exitcode != 0:
        raise RuntimeError(f"benchmark process {fn.__name__} failed (exit {p.exitcode})")
    return json.loads(out.read_text())


def _rank_main(rank: int, world: int, init: str, beton: str, batch: int, workers: int,
               epochs: int, os_cache: bool, out: str) -> None:
    """One rank of the memory benchmark (a spawned process); memory read after the last
    epoch's loader was built and while its buffers are allocated (mid-epoch)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    train = _ffcv_loader(beton, batch, workers, os_cache=os_cache, distributed=True)
    times, memory, n = [], None, 0
    for epoch in range(epochs):
        dist.barrier()  # start epochs together: one rank's compile would skew the other's rate
        train.set_epoch(epoch)
        start, n = time.perf_counter(), 0
        for i, (_, labels) in enumerate(train):
            n += len(labels)
            if epoch == epochs - 1 and i == len(train) // 2:
                memory = _self_memory()
        times.append(time.perf_counter() - start)
    Path(out).write_text(json.dumps({**_rates(n, times), "memory": memory}))
    dist.barrier()
    dist.destroy_process_group()


def bench_ranks(beton: Path, *, ranks: int, os_cache: bool, batch: int, workers: int,
                epochs: int, tmp: Path) -> dict:
    """Run ``ranks`` FFCV reader processes on one .beton; per-rank throughput and memory."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    per = max(1, workers // ranks)
    tag = f"r{ranks}_c{int(os_cache)}"
    init = tmp / f"init_{tag}"
    outs = [tmp / f"{tag}_{r}.json" for r in range(ranks)]
    procs = [ctx.Process(target=_rank_main, args=(r, ranks, str(init), str(beton), batch, per,
                                                    epochs, os_cache, str(outs[r])))
             for r in range(ranks)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"a rank of the {ranks}-rank FFCV run failed")
    per_rank = [json.loads(o.read_text()) for o in outs]
    return {"ranks": ranks, "os_cache": os_cache, "workers_per_rank": per, "per_rank": per_rank}


# ----------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="dprune bench loader", description=__doc__.split("\n")[0])
    p.add_argument("--num-images", type=int, default=2000)
    p.add_argument("--size", type=parse_image_size, default=(400, 350), help="WIDTHxHEIGHT of the JPEGs")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3, help="rounds; the first is warm-up")
    p.add_argument("--ranks", default="1,2", help="rank counts for the memory runs ('' = none)")
    p.add_argument("--out", default="bench_loader.json")
    return p


def _md(rows) -> list[str]:
    head, *body = rows
    return harness.md_table(list(head), [list(r) for r in body]).splitlines()


def _table(result: dict) -> str:
    """The results as markdown tables (readable in a terminal too)."""
    rows = [("loader", "images/s (median)", "best", "first epoch s")]
    for name, r in result["throughput"].items():
        rows.append((name, f"{r['images_per_s']:.0f}", f"{r['best_images_per_s']:.0f}",
                     f"{r['first_epoch_s']:.1f}"))
    lines = _md(rows)
    lines.append(f"\nffcv / torchvision throughput: {result['ratio']:.2f}x (same JPEGs); "
                 f"{result['ratio_recipe']:.2f}x (ffcv_recipe: 50% stored raw); load average "
                 f"{result['machine']['loadavg_start'][0]:.1f} -> "
                 f"{result['machine']['loadavg_end'][0]:.1f} on {os.cpu_count()} CPUs")
    if result["memory"]:
        rows = [("ranks", "os_cache", "rank", "images/s", "RSS MB", "PSS MB", "private MB",
                 "peak RSS MB")]
        for run in result["memory"]:
            for i, r in enumerate(run["per_rank"]):
                m = r["memory"]
                rows.append((run["ranks"], run["os_cache"], i, f"{r['images_per_s']:.0f}",
                             m["rss_mb"], m["pss_mb"], m["private_mb"], m["peak_rss_mb"]))
        lines += [""] + _md(rows)
    return "\n".join(lines)


def main(argv=None) -> int:
    """Run the benchmark (see the module docstring); prints the table, writes ``--out``."""
    args = build_parser().parse_args(argv)
    from distributed_prune.data.beton import write_beton
    from distributed_prune.data.ffcv import require_ffcv
    from distributed_prune.errors import UserError

    for opt in ("num_images", "workers", "batch"):
        if getattr(args, opt) < 1:
            raise UserError(f"--{opt.replace('_', '-')}: must be >= 1, got {getattr(args, opt)}")
    if args.epochs < 2:  # round 0 is warm-up: at least one timed round
        raise UserError(f"--epochs: must be >= 2 (the first is warm-up), got {args.epochs}")
    try:
        ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
    except ValueError:
        raise UserError(f"--ranks: expected comma-separated rank counts like 1,2, got {args.ranks!r}") from None
    if any(r < 1 for r in ranks):
        raise UserError(f"--ranks: rank counts must be >= 1, got {args.ranks!r}")
    out = Path(args.out)
    if not str(args.out).strip() or out.is_dir() or not out.parent.is_dir():
        raise UserError(f"--out {args.out!r}: expected a file in an existing directory")
    require_ffcv()
    if args.num_images < args.batch * 2:
        raise UserError(f"--num-images must be at least 2 x --batch ({2 * args.batch})")
    load_start = os.getloadavg()  # other jobs on the machine skew every rate
    with tempfile.TemporaryDirectory(prefix="dprune_bench_loader_") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        folder = make_image_folder(tmp, args.num_images, args.size, args.workers)
        gen_s = time.perf_counter() - start
        beton = tmp / "train.beton"
        summary = write_beton("imagefolder", root=tmp, split="train", out=beton, mode="jpg",
                              num_workers=args.workers, progress=False)
        jpeg_mb = sum(f.stat().st_size for f in folder.rglob("*.jpg")) / MB
        recipe_beton = tmp / "train_recipe.beton"
        recipe = write_beton("imagefolder", root=tmp, split="train", out=recipe_beton,
                             mode="proportion", compress_probability=0.5,
                             num_workers=args.workers, progress=False)
        throughput = isolated(bench_throughput, tmp / "throughput.json", folder=str(folder),
                              betons={"ffcv": str(beton), "ffcv_recipe": str(recipe_beton)},
                              batch=args.batch, workers=args.workers, rounds=args.epochs)
        recipe_beton.unlink()
        memory = [bench_ranks(beton, ranks=r, os_cache=c, batch=args.batch,
                              workers=args.workers, epochs=args.epochs, tmp=tmp)
                  for r in ranks for c in (True, False)]
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": sys.version.split()[0],
                    "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "config": {"num_images": args.num_images, "size": list(args.size),
                   "workers": args.workers, "batch": args.batch, "epochs": args.epochs,
                   "ranks": ranks},
        "data": {"generate_s": round(gen_s, 1), "jpeg_mb": round(jpeg_mb, 1),
                 "beton_mb": round(summary["bytes"] / MB, 1), "beton_write_s": summary["seconds"],
                 "recipe_beton_mb": round(recipe["bytes"] / MB, 1)},
        "throughput": throughput,
        "ratio": throughput["ffcv"]["images_per_s"] / throughput["torchvision"]["images_per_s"],
        "ratio_recipe": (throughput["ffcv_recipe"]["images_per_s"]
                         / throughput["torchvision"]["images_per_s"]),
        "memory": memory,
    }
    harness.emit(result, _table(result), out=args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
