"""Command line: ``dprune`` (or ``python -m distributed_prune``).

    dprune run CONFIG [key=value ...]            pretrain -> prune -> retrain (see configs/)
    dprune quickstart [--out DIR]                the paper's trainability story on digits, on CPU
    dprune plan --model resnet56 --ratios "[0,0.7,0.7,0.7,0]" --num-classes 10 --input-size 3,32,32
    dprune report RUN_DIR... [--out FILE] [--json]
    dprune sweep CONFIG --grid key=v1,v2 [--seeds N] [--launcher local|torchrun|slurm]
    dprune config show CONFIG [key=value ...]
    dprune bench {kernels,train,loader,speedup,plan} ...
    dprune data write-beton --dataset NAME --out FILE
    dprune models

Bad input is one line on stderr and exit status 2 (never a traceback).
"""
from __future__ import annotations

import argparse
import json
import sys

from .errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default prints the usage too)
        raise UserError(f"{self.prog}: {message}")


def parse_input_size(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--input-size: expected comma-separated integers like 3,32,32, got {text!r}") from None
    if not dims or any(d <= 0 for d in dims):
        raise UserError(f"--input-size: dimensions must be positive, got {text!r}")
    return dims


def cmd_plan(args) -> int:
    import torch

    from . import flops, models, prune

    net = models.create(args.model, num_classes=args.num_classes)
    x = torch.zeros(1, *parse_input_size(args.input_size))
    try:
        dense = flops.count(net, x)
    except RuntimeError as e:
        raise UserError(f"--input-size {args.input_size}: the model cannot run on it ({str(e).splitlines()[0]})") from None
    p = prune.plan(net, args.ratios, criterion=args.criterion, example_input=x,
                   round_to=args.round_to, skip=args.skip or ())
    small = prune.apply(net, p, mode="physical")  # the planned object: its graph is reused
    pruned = flops.count(small, x)
    rows = p.table()
    out = {"model": args.model, "ratios": args.ratios, "criterion": args.criterion,
           "dense_macs": dense["macs"], "pruned_macs": pruned["macs"],
           "dense_params": dense["params"], "pruned_params": pruned["params"],
           "speedup": dense["macs"] / max(pruned["macs"], 1),
           "params_reduction": 1 - pruned["params"] / dense["params"],
           "layers": rows, "layer_ratios": p.layer_ratios, "skipped": p.skipped}
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
    if p.skipped:
        print(f"skipped {len(p.skipped)} layer(s) the default rule cannot prune (marked 'skip')")
    return 0


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
    p = _Parser(prog="dprune", description="Fair, fast, large-scale filter pruning.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("plan", help="per-layer kept channels, MACs, params and speedup")
    s.add_argument("--model", required=True)
    s.add_argument("--ratios", required=True)
    s.add_argument("--num-classes", type=int, default=1000)
    s.add_argument("--input-size", default="3,224,224")
    s.add_argument("--criterion", default="l1")
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
    csub = s.add_subparsers(dest="config_cmd", required=True, parser_class=_Parser)
    c = csub.add_parser("show")
    c.add_argument("config")
    c.add_argument("overrides", nargs="*")
    c.set_defaults(func=_lazy("config", "cli_show"))

    s = sub.add_parser("bench", help="benchmarks (print a table, write JSON)")
    bsub = s.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    for name in BENCHES:
        b = bsub.add_parser(name, add_help=False)
        b.add_argument("rest", nargs=argparse.REMAINDER)
        b.set_defaults(func=_passthrough(f"bench.{name}"))

    s = sub.add_parser("data", help="datasets")
    dsub = s.add_subparsers(dest="data_cmd", required=True, parser_class=_Parser)
    w = dsub.add_parser("write-beton", help="write an FFCV .beton file")
    if with_data:  # its option lists live in data.beton, which imports torch: only when used
        from .data.beton import add_arguments as beton_arguments

        beton_arguments(w)
    w.set_defaults(func=_lazy("data.beton", "main"))
    return p


BENCHES = ("kernels", "train", "loader", "speedup", "plan")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # launchers that pass --local_rank (deepspeed without --no_local_rank): dist.py reads LOCAL_RANK
    argv = [a for i, a in enumerate(argv) if not a.startswith("--local_rank")
            and not (i > 0 and argv[i - 1] == "--local_rank")]
    try:
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
    except UserError as e:
        print(f"dprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dprune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head`: stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
