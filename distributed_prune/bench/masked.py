"""Step time of the masked pruning phase, next to the dense and the physically pruned model.

    dprune bench masked                                   # resnet50, CPU: batch 8 x 3x64x64
    dprune bench masked --batch 128 --input-size 3,224,224 --amp bf16 --channels-last \\
        --json --out masked.json                          # the GPU target run (H100/H200)

For each sparsity s (default 0.3, 0.5, 0.7, 0.9; the ratio of every block-inner conv,
``--spec``) the masks of a gradual phase are put at their target on a copy of the dense model
(MaskedConv2d layers + channel hooks, exactly what ``prune.method=gradual`` trains) and one
training step is timed with each masked-conv backend forced (reference = dense conv on masked
weights, gather, native, triton where it runs).  The dense model and the physically pruned model
of the same plan are timed in the same run; every configuration alternates with the others
(ABBA, :func:`.common.alternate`) and the table reports ratios to the dense step.  Mask updates
(every ``prune.masked.update_interval`` steps) are not in the step time; ``update_ms`` is the
cost of one (rescoring all layers, new masks).

``compact`` is the step of compact execution (``prune.masked.execution=compact``, the gradual
default): the cut model of the masks, trained by a :class:`~..train.compact.CompactEngine`
after a real update from no masks to the target (fold back, rescore, cut, new engine and
optimizer with the sliced state).  Nothing is added per step; ``compact_update_ms`` is that
update, and ``compact+upd`` adds it amortised over ``--update-interval`` steps (the config's
default, 100).

Targets (issue 15): at s >= 0.5 the masked step takes <= (1 - s) + 0.15 of the dense step on one
H100/H200 (bf16, channels_last, batch 128, 224 px), <= (1 - s) + 0.3 on CPU (fp32).
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from ..errors import UserError
from ..cmdline import ArgumentParser
from . import common

SPARSITIES = (0.3, 0.5, 0.7, 0.9)
SPEC = "*layer*.conv1:{s},*layer*.conv2:{s}"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="dprune bench masked", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--spec", default=SPEC, help="ratio spec with {s} for the sparsity")
    p.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)))
    p.add_argument("--backends", default="reference,gather,native,triton")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--input-size", default=None)
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    p.add_argument("--channels-last", dest="channels_last", action="store_true", default=None)
    p.add_argument("--update-interval", type=int, default=100,
                   help="steps between mask updates, to amortise compact's update cost")
    p.add_argument("--steps", type=int, default=1, help="steps per timed repetition")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    common.add_common_arguments(p)
    return p


def _usable(name: str, device: torch.device) -> str:
    """"" when ``name`` can be timed on ``device``, else why not."""
    from ..kernels import dispatch, native
    if name in ("reference", "gather"):
        return ""
    if name == "native":
        return "" if native.available() else native.unavailable_reason()
    if name == "triton":
        if device.type == "cuda" and dispatch.triton_usable(device) \
                and not dispatch.interpreter_enabled():
            return ""
        return "needs a CUDA GPU (the interpreter is not timed)"
    return f"unknown backend {name!r}"


def _masked_setup(dense, plan, st: dict, args):
    """A TrainSetup whose model carries the phase's masks at their target."""
    from ..prune.masked import MaskedPhase

    setup = common.TrainSetup(dense, device=st["device"], batch=st["batch"],
                              input_size=st["input_size"], num_classes=st["num_classes"],
                              amp=args.amp, channels_last=st["channels_last"], seed=args.seed)
    net = setup.engine.module
    phase = MaskedPhase(net, plan, kind="gradual", update_interval=1, total_iterations=1,
                        ramp_fraction=1.0, kernel="masked_conv")
    t0 = time.perf_counter()
    phase.update(net, 0, final=True)
    common.sync(st["device"])
    return setup, phase, 1e3 * (time.perf_counter() - t0)


def compact_setup(dense, plan, st: dict, *, amp: str = "none", seed: int = 0):
    """A TrainSetup whose engine is a CompactEngine, after one timed update from no masks to the
    phase's target; returns (setup, update ms). ``st``: device, batch, input_size, num_classes,
    channels_last (as :func:`.common.base_settings` gives them)."""
    from ..prune.masked import MaskedPhase
    from ..train.compact import CompactEngine
    from ..train.engine import build_engine
    from ..train.optim import build_optimizer
    from ..train.schedules import EpochIterLR

    device = st["device"]
    setup = common.TrainSetup(dense, device=device, batch=st["batch"],
                              input_size=st["input_size"], num_classes=st["num_classes"],
                              amp=amp, channels_last=st["channels_last"], seed=seed)
    full = setup.engine.module

    def build(m):
        m.to(device)
        if st["channels_last"]:
            m.to(memory_format=torch.channels_last)
        opt = build_optimizer(m, name="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4)
        return build_engine("ddp", m, opt, device=device, amp=amp)

    # update 0 keeps every channel, update 1 (the end of a one-step ramp) reaches the target
    phase = MaskedPhase(full, plan, kind="gradual", update_interval=1, total_iterations=1,
                        ramp_fraction=1.0, execution="compact")
    eng = CompactEngine(full, phase, build)
    setup.engine, setup.lr_driver = eng, EpochIterLR(eng, "0:0.01", 1, 1)
    setup.run(1, grad_hook=lambda it: eng.step_hook(None, it))     # grads and momentum exist
    spent = []

    def timed(it):
        common.sync(device)
        t0 = time.perf_counter()
        eng.step_hook(None, it)
        common.sync(device)
        spent.append(1e3 * (time.perf_counter() - t0))
    setup.run(1, grad_hook=timed, iteration0=1)
    if phase.n_pruned() != sum(g.n - len(g.keep) for g in plan.groups):
        raise RuntimeError("bench masked: the compact update did not reach the target")
    return setup, spent[0]


def _with_backend(setup, name, steps):
    from ..kernels import set_backend

    def run():
        with set_backend(name):
            setup.run(steps)
    return run


def bench(args):
    st = common.base_settings(args)
    common.check_positive(steps=args.steps, reps=args.reps, warmup=args.warmup, batch=st["batch"],
                          update_interval=args.update_interval)
    try:
        sparsities = [float(s) for s in args.sparsities.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--sparsities: expected comma-separated numbers, got {args.sparsities!r}") \
            from None
    if not sparsities or not all(0 < s < 1 for s in sparsities):
        raise UserError(f"--sparsities: each must lie in (0, 1), got {args.sparsities!r}")
    if "{s}" not in args.spec:
        raise UserError(f"--spec must contain {{s}} (the sparsity), got {args.spec!r}")
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    skipped = {b: why for b in wanted if (why := _usable(b, st["device"]))}
    backends = [b for b in wanted if b not in skipped]
    device = st["device"]
    common.set_backend_flags(device)
    torch.manual_seed(args.seed)
    from .. import models
    dense = models.create(args.model, num_classes=st["num_classes"])
    fns = {"dense": common.TrainSetup(dense, device=device, batch=st["batch"],
                                      input_size=st["input_size"], num_classes=st["num_classes"],
                                      amp=args.amp, channels_last=st["channels_last"],
                                      seed=args.seed).run}
    info = {}
    for s in sparsities:
        pair = common.pruned_pair(copy.deepcopy(dense), args.spec.format(s=s),
                                  input_size=st["input_size"], seed=args.seed)
        pruned = common.TrainSetup(pair.pruned, device=device, batch=st["batch"],
                                   input_size=st["input_size"], num_classes=st["num_classes"],
                                   amp=args.amp, channels_last=st["channels_last"], seed=args.seed)
        fns[f"pruned@{s}"] = pruned.run
        setup, phase, update_ms = _masked_setup(dense, pair.plan, st, args)
        info[s] = {"mac_speedup": pair.mac_speedup, "update_ms": update_ms,
                   "plan_sha256": pair.plan.sha256(), "masked_channels": phase.n_pruned()}
        for b in backends:
            fns[f"masked[{b}]@{s}"] = _with_backend(setup, b, args.steps)
        compact, info[s]["compact_update_ms"] = compact_setup(dense, pair.plan, st, amp=args.amp,
                                                              seed=args.seed)
        fns[f"compact@{s}"] = compact.run
    steps = args.steps
    fns = {k: (f if k.startswith("masked") else (lambda f=f: f(steps))) for k, f in fns.items()}
    times = common.alternate(fns, reps=args.reps, warmup=args.warmup, device=device)
    med = {k: common.median(v) / steps for k, v in times.items()}
    dense_ms = med["dense"]
    slack = 0.15 if device.type == "cuda" else 0.3
    rows, table_rows = [], []
    for s in sparsities:
        row = {"sparsity": s, "dense_ms": dense_ms, "pruned_ms": med[f"pruned@{s}"],
               "pruned_ratio": med[f"pruned@{s}"] / dense_ms, "target_ratio": (1 - s) + slack,
               **info[s]}
        cells = [f"{s:.1f}", f"{info[s]['mac_speedup']:.2f}x", f"{row['pruned_ratio']:.2f}"]
        for b in backends:
            r = med[f"masked[{b}]@{s}"] / dense_ms
            row[f"{b}_ms"] = med[f"masked[{b}]@{s}"]
            row[f"{b}_ratio"] = r
            cells.append(f"{r:.2f}")
        row["compact_ms"] = med[f"compact@{s}"]
        row["compact_ratio"] = row["compact_ms"] / dense_ms
        row["compact_amortized_ratio"] = (row["compact_ms"] + info[s]["compact_update_ms"]
                                          / args.update_interval) / dense_ms
        cells += [f"{row['compact_ratio']:.2f}", f"{row['compact_amortized_ratio']:.2f}"]
        cells += [f"{row['target_ratio']:.2f}" if s >= 0.5 else "-",
                  f"{info[s]['update_ms']:.0f} / {info[s]['compact_update_ms']:.0f}"]
        rows.append(row)
        table_rows.append(cells)
    header = (["sparsity", "MACs x", "pruned"] + [f"masked[{b}]" for b in backends]
              + ["compact", f"compact+upd/{args.update_interval}", "target",
                 "update ms (masked / compact)"])
    result = {"model": args.model, "spec": args.spec, "batch": st["batch"],
              "input_size": list(st["input_size"]), "amp": args.amp,
              "channels_last": st["channels_last"], "steps": steps, "reps": args.reps,
              "warmup": args.warmup, "backends": backends, "skipped": skipped,
              "update_interval": args.update_interval,
              "dense_ms": dense_ms, "rows": rows, **common.env_info(device)}
    text = (f"masked phase step time / dense step ({args.model}, batch {st['batch']}, "
            f"{'x'.join(map(str, st['input_size']))}, {args.amp}, {device.type}; dense "
            f"{dense_ms:.1f} ms/step)\n" + common.md_table(header, table_rows))
    if skipped:
        text += "\n" + "\n".join(f"skipped {b}: {why}" for b, why in skipped.items())
    return result, text


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    res, text = bench(args)
    common.emit(res, text, as_json=args.json, out=args.out)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
