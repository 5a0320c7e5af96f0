"""Command line: ``dprune`` (or ``python -m distributed_prune``).

    dprune run CONFIG [key=value ...]            pretrain -> prune -> retrain (see configs/)
    dprune quickstart [--out DIR]                the paper's trainability story on digits, on CPU
    dprune plan --model resnet56 --ratios "[0,0.7,0.7,0.7,0]" --num-classes 10 --input-size 3,32,32
    dprune plan --model resnet50 --weights IMAGENET1K_V1 --ratios "[0,0.6,0.6,0.6,0.21,0]"
    dprune report RUN_DIR... [--out FILE] [--json]
    dprune export RUN_DIR --format onnx|torch-export|state-dict [--out FILE] [--input-size C,H,W]
    dprune sweep CONFIG --grid key=v1,v2 [--seeds N] [--launcher local|torchrun|slurm]
    dprune config show CONFIG [key=value ...]
    dprune bench {kernels,train,loader,speedup,masked,gpu,plan} ...
    dprune data write-beton --dataset NAME --out FILE
    dprune models

Bad input is one line on stderr and exit status 2 (never a traceback).
"""
from __future__ import annotations

import argparse
import json
import sys

from .cmdline import ArgumentParser, check_at_least, parse_input_size, run
from .errors import UserError


def cmd_plan(args) -> int:
    import torch

    from . import flops, models, prune

    check_at_least("--num-classes", args.num_classes)
    check_at_least("--round-to", args.round_to)
    if args.new_head and not args.weights:
        raise UserError("--new-head needs --weights")
    if args.num_classes is None and not args.weights:
        args.num_classes = 1000

    x = torch.zeros(1, *parse_input_size(args.input_size))
    try:
        net = models.create(args.model, num_classes=args.num_classes, weights=args.weights,
                            new_head=args.new_head)
    except (RuntimeError, OverflowError, TypeError) as e:  # e.g. a classifier too large to allocate
        raise UserError(f"--model {args.model} --num-classes {args.num_classes}: the model cannot be "
                        f"built ({str(e).splitlines()[0][:200]})") from None
    try:
        dense = flops.count(net, x)
    except RuntimeError as e:
        raise UserError(f"--input-size {args.input_size}: the model cannot run on it ({str(e).splitlines()[0]})") from None
    p = prune.plan(net, args.ratios, criterion=args.criterion, example_input=x,
                   round_to=args.round_to, skip=args.skip or ())
    rows = p.table()
    odd, macs8 = _round_to_8(args, net, x, rows)  # before the cut: it plans the dense model again
    small = prune.apply(net, p, mode="physical")  # the planned object: its graph is reused
    pruned = flops.count(small, x)
    out = {"model": args.model, "ratios": args.ratios, "criterion": args.criterion,
           "dense_macs": dense["macs"], "pruned_macs": pruned["macs"],
           "dense_params": dense["params"], "pruned_params": pruned["params"],
           "speedup": dense["macs"] / max(pruned["macs"], 1),
           "params_reduction": 1 - pruned["params"] / dense["params"],
           "layers": rows, "layer_ratios": p.layer_ratios, "skipped": p.skipped}
    out["not_multiple_of_8"] = odd
    out["round_to_8"] = None if macs8 is None else {
        "pruned_macs": macs8, "speedup": dense["macs"] / max(macs8, 1),
        "mac_cost": macs8 / max(pruned["macs"], 1) - 1}
    if args.json:
        print(json.dumps(out))
        return 0
    # every conv/linear layer with its resolved ratio; "coupled" = pruned with another group's root
    by_root = {r["layer"]: r for r in rows}
    coupled = {m.split(":")[0] for g in p.groups for m in g.members if m.endswith(":out")} - set(by_root)
    print(f"{'layer':40s} {'ratio':>6s} {'channels':>9s} {'kept':>6s}")
    for name, ratio in p.layer_ratios.items():
        r = by_root.get(name)
        if r:
            note = (f"  rounded from {r['asked_kept']} (whole positions of a grouped conv)"
                    if r["kept"] != r["asked_kept"] else "")
            print(f"{name:40s} {r['ratio']:6.3f} {r['channels']:9d} {r['kept']:6d}{note}")
        elif name in p.skipped:
            print(f"{name:40s} {ratio:6.3f} {'':>9s} {'skip':>6s}  {p.skipped[name]}")
        else:
            print(f"{name:40s} {ratio:6.3f} {'':>9s} {'coupled' if name in coupled else '-':>6s}")
    print(f"MACs   {dense['macs'] / 1e6:12.2f} M -> {pruned['macs'] / 1e6:12.2f} M   speedup {out['speedup']:.2f}x")
    print(f"params {dense['params'] / 1e6:12.3f} M -> {pruned['params'] / 1e6:12.3f} M   "
          f"({100 * out['params_reduction']:.2f}% fewer)")
    odd = out["not_multiple_of_8"]
    if odd:
        r8 = out["round_to_8"]
        print(f"kept widths not a multiple of 8 ({len(odd)} of {len(rows)} pruned layers; tensor cores "
              f"prefer multiples of 8): " + ", ".join(f"{r['layer']}={r['kept']}" for r in odd[:8])
              + (f", ... (+{len(odd) - 8})" if len(odd) > 8 else ""))
        print(f"round_to 8 would keep {r8['pruned_macs'] / 1e6:.2f} M MACs ({100 * r8['mac_cost']:+.1f}%), "
              f"speedup {out['speedup']:.2f}x -> {r8['speedup']:.2f}x (see docs/benchmarks/throughput.md)")
    if p.skipped:
        print(f"skipped {len(p.skipped)} layer(s) the default rule cannot prune (marked 'skip')")
    return 0


def cmd_export(args) -> int:
    from .export import export

    size = parse_input_size(args.input_size) if args.input_size else None
    out = export(args.run, args.format, out=args.out, input_size=size)
    print(f"dprune: wrote {out}")
    return 0


def _round_to_8(args, net, x, rows) -> tuple[list, int | None]:
    """Pruned layers whose kept width is not a multiple of 8 (and not their full width), and the
    MACs the same plan would keep with ``round_to=8`` (None when nothing is off or the plan is
    already rounded to 8): the price of tensor-core-friendly widths. ``net`` is the dense model."""
    import copy

    from . import flops, prune

    odd = [{"layer": r["layer"], "kept": r["kept"]} for r in rows
           if r["kept"] % 8 and r["kept"] != r["channels"]]
    if not odd or (args.round_to and args.round_to % 8 == 0):
        return odd, None
    copy_ = copy.deepcopy(net)
    p8 = prune.plan(copy_, args.ratios, criterion=args.criterion, example_input=x, round_to=8,
                    skip=args.skip or ())
    return odd, flops.count(prune.apply(copy_, p8, mode="physical"), x)["macs"]


def cmd_models(args) -> int:
    from . import models

    print("\n".join(models.list_models()))
    return 0


def _lazy(module: str, func: str = "main"):
    """A subcommand implemented by ``module.func(args)`` (imported only when used)."""

    def run(args):
        import importlib

        return getattr(importlib.import_module(f"distributed_prune.{module}"), func)(args)

    return run


def _passthrough(module: str):
    """A subcommand whose module parses its own argv (benchmarks)."""

    def run(args):
        import importlib

        return importlib.import_module(f"distributed_prune.{module}").main(args.rest)

    return run


def build_parser(with_data: bool = True) -> argparse.ArgumentParser:
    """The ``dprune`` parser; ``with_data=False`` leaves out the ``data`` subcommands' options
    (importing them imports torch, which ``dprune --help`` and argument errors do not need)."""
    p = ArgumentParser(prog="dprune", description="Fair, fast, large-scale filter pruning.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    s = sub.add_parser("plan", help="per-layer kept channels, MACs, params and speedup")
    s.add_argument("--model", required=True)
    s.add_argument("--ratios", required=True)
    s.add_argument("--num-classes", type=int, default=None, help="default: 1000, or the classes of --weights")
    s.add_argument("--input-size", default="3,224,224")
    s.add_argument("--criterion", default="l1")
    s.add_argument("--weights", default=None,
                   help="torchvision pretrained weights (IMAGENET1K_V1, DEFAULT, ...): the criterion scores them")
    s.add_argument("--new-head", action="store_true", help="with --weights: a new classifier head for --num-classes")
    s.add_argument("--round-to", type=int, default=None)
    s.add_argument("--skip", action="append", help="glob pattern of layers never pruned")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("models", help="list the model names create() accepts")
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("run", help="run the pipeline from a YAML config")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    s.set_defaults(func=_lazy("pipeline", "cli_run"))

    s = sub.add_parser("export", help="write a run's pruned model (ONNX, torch.export, state dict)")
    s.add_argument("run", help="run directory or checkpoint file")
    s.add_argument("--format", required=True, help="onnx | torch-export | state-dict")
    s.add_argument("--out", default=None, help="output file (default: RUN_DIR/export/pruned.{onnx,pt2,pt})")
    s.add_argument("--input-size", default=None, help="one sample's shape C,H,W (default: the plan's)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("quickstart", help="the embedded default experiment (digits, CPU)")
    s.add_argument("--out", default="runs/quickstart")
    s.add_argument("--fast", action="store_true", help="fewer epochs (for smoke tests)")
    s.set_defaults(func=_lazy("quickstart", "cli_main"))

    s = sub.add_parser("report", help="table over runs and the comparison setup they satisfy")
    s.add_argument("runs", nargs="+")
    s.add_argument("--out", default=None)
    s.add_argument("--json", action="store_true")
    s.add_argument("--plot", default=None, help="PNG of accuracy vs speedup")
    s.add_argument("--cross", default=None, metavar="A,B",
                   help="cross-validate two methods over the runs' retraining recipes (e.g. l1,tpp)")
    s.set_defaults(func=_lazy("report", "cli_report"))

    s = sub.add_parser("sweep", help="expand a grid of overrides into runs")
    s.add_argument("config")
    s.add_argument("--grid", action="append", default=[], help="key=v1,v2 (repeatable)")
    s.add_argument("--seeds", type=int, default=1)
    s.add_argument("--launcher", choices=["local", "torchrun", "slurm"], default="local")
    s.add_argument("--out", default="runs/sweep")
    s.add_argument("--nproc", type=int, default=1)
    s.add_argument("overrides", nargs="*")
    s.set_defaults(func=_lazy("sweep", "cli_sweep"))

    s = sub.add_parser("config", help="show the resolved config")
    csub = s.add_subparsers(dest="config_cmd", required=True, parser_class=ArgumentParser)
    c = csub.add_parser("show")
    c.add_argument("config")
    c.add_argument("overrides", nargs="*")
    c.set_defaults(func=_lazy("config", "cli_show"))

    s = sub.add_parser("bench", help="benchmarks (print a table, write JSON)")
    bsub = s.add_subparsers(dest="bench", required=True, parser_class=ArgumentParser)
    for name in BENCHES:
        b = bsub.add_parser(name, add_help=False)
        b.add_argument("rest", nargs=argparse.REMAINDER)
        b.set_defaults(func=_passthrough(f"bench.{name}"))

    s = sub.add_parser("data", help="datasets")
    dsub = s.add_subparsers(dest="data_cmd", required=True, parser_class=ArgumentParser)
    w = dsub.add_parser("write-beton", help="write an FFCV .beton file")
    if with_data:  # its option lists live in data.beton, which imports torch: only when used
        from .data.beton import add_arguments as beton_arguments

        beton_arguments(w)
    w.set_defaults(func=_lazy("data.beton", "main"))
    return p


BENCHES = ("kernels", "train", "loader", "speedup", "masked", "gpu", "plan")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # launchers that pass --local_rank (deepspeed without --no_local_rank): dist.py reads LOCAL_RANK
    argv = [a for i, a in enumerate(argv) if not a.startswith("--local_rank")
            and not (i > 0 and argv[i - 1] == "--local_rank")]
    return run(lambda: _dispatch(argv))


def _dispatch(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] in BENCHES:
        # benchmarks parse their own options (argparse REMAINDER drops leading "--x" options)
        import importlib

        return int(importlib.import_module(f"distributed_prune.bench.{argv[1]}").main(argv[2:]) or 0)
    args, extra = build_parser(with_data=bool(argv) and argv[0] == "data").parse_known_args(argv)
    # key=value overrides may also follow options (dprune sweep CFG --grid a=1,2 b=3)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        raise UserError(f"dprune: unrecognized arguments: {' '.join(extra)}")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
