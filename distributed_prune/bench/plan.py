"""Planning speed: ``prune.plan`` + physical cut next to torch-pruning's graph build + cut.

    dprune bench plan                                   # resnet50 and densenet201, 224 px, 1 thread
    dprune bench plan --model resnet50 --ratios "[0,0.6,0.6,0.6,0.21,0]" --reps 5 --json

Per model and repetition (a fresh model each time, built outside the timed region):

- ``dprune``: ``prune.plan`` (one trace, groups of the layers with a ratio > 0, L1 scores) then
  ``prune.apply(mode="physical")`` on the same object (the plan's graph is reused);
- ``torch-pruning``: ``DependencyGraph().build_dependency`` then, for every group of the plan,
  ``get_pruning_group(root, ..., the plan's pruned channels)`` and ``group.prune()``: the library's
  own graph build + cut of exactly the same channels (no scoring, which the library would add).

Times are CPU seconds of the process by default (``--clock wall`` for wall time). The two are
timed in ABBA order (which side runs first alternates between repetitions: the second of a pair
runs on warm allocator pages, worth about 20% of the library's build time on ResNet-50); the
table gives medians, their ratio and whether the two cut models have the same parameter shapes. ``--json`` prints one object: ``rows [{model, ratios, input_size,
dprune_s, dprune_plan_s, dprune_cut_s, tp_s, tp_build_s, tp_cut_s, ratio, same_shapes, groups}],
reps, clock, cpu_threads, torch, torch_pruning, device_name, date``.
"""
from __future__ import annotations

import argparse
import contextlib
import io

import torch
import torch.nn as nn

from ..cmdline import ArgumentParser, parse_input_size
from . import common, harness

DEFAULT_RATIOS = {"resnet50": common.RESNET50_RATIOS, "densenet201": "0.5"}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="dprune bench plan", description=__doc__.split("\n")[0])
    p.add_argument("--model", action="append", default=None,
                   help="model name (repeatable; default resnet50 and densenet201)")
    p.add_argument("--ratios", default=None, help="ratio spec (default per model: "
                   + ", ".join(f"{k} {v}" for k, v in DEFAULT_RATIOS.items()) + "; else 0.5)")
    p.add_argument("--input-size", default="3,224,224")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--tp", action=argparse.BooleanOptionalAction, default=True,
                   help="also time torch-pruning's build + cut (--no-tp: dprune only; densenet201's "
                        "group-by-group library cut takes minutes)")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                   help="process CPU time (default; robust on shared cores) or wall time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", default=None, help="also write the JSON object to this file")
    return p


def _ours(model: nn.Module, ratios: str, x: torch.Tensor):
    from .. import prune

    t0 = _clock()
    plan = prune.plan(model, ratios, criterion="l1", example_input=x)
    t1 = _clock()
    prune.apply(model, plan, mode="physical")
    t2 = _clock()
    return plan, t1 - t0, t2 - t1


def _plan(model: nn.Module, ratios: str, x: torch.Tensor):
    from .. import prune

    return prune.plan(model, ratios, criterion="l1", example_input=x)


def _torch_pruning(model: nn.Module, plan, x: torch.Tensor):
    import torch_pruning as tp

    model.eval()
    t0 = _clock()
    with contextlib.redirect_stdout(io.StringIO()):
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=(x,))  # as dprune passes it
    t1 = _clock()
    for g in plan.groups:
        pruned = plan.pruned(g)
        if not pruned:
            continue
        m = model.get_submodule(g.root)
        fn = tp.prune_linear_out_channels if isinstance(m, nn.Linear) else tp.prune_conv_out_channels
        dg.get_pruning_group(m, fn, idxs=pruned).prune()
    t2 = _clock()
    return t1 - t0, t2 - t1


def _clock() -> float:
    return harness.clock(_CLOCK["kind"])


_CLOCK = {"kind": "cpu"}


def _shapes(model):
    return [tuple(p.shape) for p in model.parameters()]


def bench_model(name: str, ratios: str, input_size, num_classes: int, reps: int, seed: int,
                with_tp: bool = True) -> dict:
    from .. import models

    x = torch.zeros(1, *input_size)
    ours, theirs, plan_s, cut_s, build_s, tcut_s = [], [], [], [], [], []  # seconds per rep
    same = True

    def fresh():
        torch.manual_seed(seed)
        return models.create(name, num_classes=num_classes).eval()

    # the library cuts the channels of this (untimed, deterministic) plan; the timed dprune side
    # makes the same plan again
    plan = _plan(fresh(), ratios, x)
    for rep in range(reps):
        a = fresh()
        b = fresh() if with_tp else None
        # ABBA: which side runs first alternates, so neither gains from the other's warm-up
        # (allocator pages, caches)
        sides = ["ours", "tp"] if rep % 2 == 0 else ["tp", "ours"]
        for side in sides:
            if side == "ours":
                mine, tp_, tc = _ours(a, ratios, x)
                if mine.sha256() != plan.sha256():
                    raise RuntimeError("bench plan: the plan differs between repetitions")
            elif with_tp:
                bb, bc = _torch_pruning(b, plan, x)
        if not with_tp:
            bb = bc = float("nan")
        else:
            same = same and _shapes(a) == _shapes(b)
        del b
        ours.append(tp_ + tc)
        plan_s.append(tp_)
        cut_s.append(tc)
        theirs.append(bb + bc)
        build_s.append(bb)
        tcut_s.append(bc)
        del a
    groups = sum(1 for g in plan.groups if len(g.keep) < g.n)
    med = harness.median
    return {"model": name, "ratios": ratios, "input_size": list(input_size), "groups": groups,
            "dprune_s": med(ours), "dprune_plan_s": med(plan_s), "dprune_cut_s": med(cut_s),
            "tp_s": med(theirs) if with_tp else None, "tp_build_s": med(build_s) if with_tp else None,
            "tp_cut_s": med(tcut_s) if with_tp else None,
            "ratio": med(ours) / med(theirs) if with_tp else None,
            "same_shapes": same if with_tp else None}


def _s(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    common.check_positive(reps=args.reps, threads=args.threads, num_classes=args.num_classes)

    size = parse_input_size(args.input_size)
    torch.set_num_threads(args.threads)
    _CLOCK["kind"] = args.clock
    import torch_pruning as tp

    names = args.model or list(DEFAULT_RATIOS)
    rows = [bench_model(n, args.ratios or DEFAULT_RATIOS.get(n, "0.5"), size, args.num_classes,
                        args.reps, args.seed, args.tp) for n in names]
    res = {"rows": rows, "reps": args.reps, "clock": args.clock, **common.env_info(torch.device("cpu")),
           "torch_pruning": getattr(tp, "__version__", "unknown")}
    table = common.md_table(
        ["model", "ratios", "groups", "dprune plan + cut (s)", "plan / cut (s)",
         "torch-pruning build + cut (s)", "build / cut (s)", "dprune / tp", "same shapes"],
        [[r["model"], r["ratios"], r["groups"], f"{r['dprune_s']:.2f}",
          f"{r['dprune_plan_s']:.2f} / {r['dprune_cut_s']:.2f}", _s(r["tp_s"]),
          f"{_s(r['tp_build_s'])} / {_s(r['tp_cut_s'])}",
          f"{r['ratio']:.2f}x" if r["ratio"] else "-", r["same_shapes"]]
         for r in rows])
    text = (f"plan + physical cut ({args.clock} seconds), {res['device_name']}, {res['cpu_threads']} thread(s), input "
            f"{'x'.join(map(str, size))}, median of {args.reps} alternating reps\n{table}")
    common.emit(res, text, as_json=args.json, out=args.out)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
