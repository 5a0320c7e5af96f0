"""Measured vs MAC speedup of a physically pruned model.

    dprune bench speedup --model resnet50 --ratios "[0,0.6,0.6,0.6,0.21,0]"            # CPU: 8 x 3x64x64
    dprune bench speedup --model resnet50 --ratios "[0,0.6,0.6,0.6,0.21,0]" \\
        --batch 256 --input-size 3,224,224 --dtype bf16 --channels-last --json --out speedup.json
    dprune bench speedup --round-to-table [--model resnet50] [--ratios "SPEC;SPEC"]   # round_to none/8/16/32
    dprune bench speedup --model resnet50 --weights IMAGENET1K_V1 --ratios "[0,0.6,0.6,0.6,0.21,0]"

Builds the dense model and the pruned one as ``dprune run`` does (:func:`.common.pruned_pair`),
then times, alternating dense and pruned repetitions (ABBA) after warm-up:

- inference: eval mode, ``no_grad``, one forward of a batch, weights and input in ``--dtype``;
- training: forward + backward + SGD step through the project's engine and optimizer
  (``train_epoch`` of one step; ``--dtype`` is the engine's autocast dtype, weights stay fp32).

Times are medians of ``--reps`` repetitions (CUDA events on GPU, perf_counter on CPU). The table
gives the MAC speedup, the measured speedups and their ratio (measured / MAC: 1.0 means the
pruned model is as much faster as its MACs say).

``--weights``: the dense model is torchvision's pretrained one (the L1 criterion scores its
weights; speed does not depend on which channels are kept, only on how many).

``--json`` prints one object: ``model, weights, ratios, round_to, criterion, device, device_name, dtype,
channels_last, compile, batch, input_size, num_classes, reps, warmup, dense_macs, pruned_macs,
dense_params, pruned_params, mac_speedup, plan_sha256, infer {dense_ms, pruned_ms, speedup,
dense_img_s, pruned_img_s, efficiency, dense_spread, pruned_spread}, train {same keys},
efficiency {infer, train}, torch, timing, cpu_threads, date`` (``*_ms``: median ms per batch;
``efficiency`` = measured speedup / MAC speedup; ``*_spread`` = (max - min) / median of the reps).
With ``--round-to-table``: ``{"round_to_table": [rows], ...settings}``, one row per (ratios,
round_to) with ``mac_speedup, infer_speedup, train_speedup, infer_efficiency, train_efficiency,
dense_macs, pruned_macs, spread`` (largest of the four) ``, kept_min, kept_multiple, kept {layer:
channels kept}, channels {layer: channels before}, plan_sha256``.
"""
from __future__ import annotations

import argparse

import torch

from .. import dtypes
from ..cmdline import ArgumentParser
from ..errors import UserError
from . import common

ROUND_TO_RATIOS = ("[0,0.6,0.6,0.6,0.21,0]", "[0,0.74,0.74,0.6,0.21,0]", "[0,0.68,0.68,0.68,0.5,0]",
                   "[0,0.3,0.3,0.3,0.14,0]")   # ResNet-50, docs/science.md section 5: 2.31x 2.56x 3.06x 1.49x
ROUND_TOS = (None, 8, 16, 32)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="dprune bench speedup", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model name (resnet50 with --round-to-table)")
    p.add_argument("--ratios", default=None, help="ratio spec; with --round-to-table, specs separated by ';'")
    p.add_argument("--criterion", default="l1")
    p.add_argument("--weights", default=None,
                   help="torchvision pretrained weights (IMAGENET1K_V1, DEFAULT, ...) for the dense model")
    p.add_argument("--new-head", action="store_true", help="with --weights: a new classifier head for --num-classes")
    p.add_argument("--batch", type=int, default=None, help="default: 256 on GPU, 8 on CPU")
    p.add_argument("--input-size", default=None, help="C,H,W (default: 224 on GPU, 64 on CPU; CIFAR nets 32)")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--dtype", choices=list(dtypes.DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="default: on for GPU, off for CPU")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--round-to", type=int, default=None)
    p.add_argument("--round-to-table", action="store_true",
                   help="MAC and measured speedups for round_to none/8/16/32 over the ResNet-50 ratios")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default: 30 GPU, 5 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls (default: 5 GPU, 1 CPU)")
    common.add_common_arguments(p)
    return p


def _settings(args) -> dict:
    """Resolved settings (device-dependent defaults filled in)."""
    if args.new_head and not args.weights:
        raise UserError("--new-head needs --weights")
    s = common.base_settings(args)
    gpu = s.pop("gpu")
    if args.weights:
        from ..models.pretrained import num_classes_of, resolve

        w = resolve(args.model or "resnet50", args.weights)  # a bad name fails before any timing
        s["weights"] = f"{type(w).__name__}.{w.name}"
        if args.num_classes is None:
            s["num_classes"] = num_classes_of(w)
    s.update({"model": args.model, "dtype": args.dtype or ("bf16" if gpu else "fp32"),
              "compile": args.compile, "reps": common.given(args.reps, 30 if gpu else 5),
              "warmup": common.given(args.warmup, 5 if gpu else 1)})
    common.check_positive(batch=s["batch"], reps=s["reps"], warmup=s["warmup"], round_to=args.round_to,
                          num_classes=s["num_classes"])
    return s


def measure(pair: common.Pair, s: dict, *, dense_fns: dict | None = None) -> dict:
    """Inference and training times of ``pair``, dense and pruned alternating. ``dense_fns``
    reuses the dense callables across calls (the round-to table)."""
    dev = s["device"]
    dense_fns = dense_fns or make_fns(pair.dense, s)
    pruned_fns = make_fns(pair.pruned, s)
    out = {}
    for phase in ("infer", "train"):
        t = common.alternate({"dense": dense_fns[phase], "pruned": pruned_fns[phase]},
                             reps=s["reps"], warmup=s["warmup"], device=dev)
        dm, pm = common.median(t["dense"]), common.median(t["pruned"])
        sp = dm / pm
        out[phase] = {"dense_ms": dm, "pruned_ms": pm, "speedup": sp,
                      "dense_img_s": s["batch"] * 1e3 / dm, "pruned_img_s": s["batch"] * 1e3 / pm,
                      "efficiency": sp / pair.mac_speedup,
                      "dense_spread": common.spread(t["dense"]), "pruned_spread": common.spread(t["pruned"])}
    return out


def make_fns(model, s: dict) -> dict:
    dev = s["device"]
    infer = common.inference_fn(model, device=dev, batch=s["batch"], input_size=s["input_size"],
                                dtype=s["dtype"], channels_last=s["channels_last"], compile=s["compile"])
    setup = common.TrainSetup(model, device=dev, batch=s["batch"], input_size=s["input_size"],
                              num_classes=s["num_classes"], amp=dtypes.amp_mode(s["dtype"]),
                              channels_last=s["channels_last"], compile=s["compile"])
    return {"infer": infer, "train": lambda: setup.run(1)}


def _dense(model: str, s: dict, args):
    """The dense model: the registry name itself (``pruned_pair`` seeds and creates it), or with
    ``--weights`` torchvision's pretrained model (its L1 norms then decide the plan)."""
    if not args.weights:
        return model
    torch.manual_seed(args.seed)
    from .. import models

    return models.create(model, num_classes=s["num_classes"], weights=args.weights, new_head=args.new_head)


def _header(s: dict) -> dict:
    return {"model": s["model"], "weights": s.get("weights"), **common.env_info(s["device"]), "dtype": s["dtype"],
            "channels_last": s["channels_last"], "compile": s["compile"], "batch": s["batch"],
            "input_size": list(s["input_size"]), "num_classes": s["num_classes"], "reps": s["reps"],
            "warmup": s["warmup"]}


def speedup(args) -> tuple[dict, str]:
    s = _settings(args)
    common.set_backend_flags(s["device"])
    pair = common.pruned_pair(_dense(args.model, s, args), args.ratios, s["num_classes"], s["input_size"],
                              args.round_to, args.criterion, seed=args.seed)
    m = measure(pair, s)
    res = {**_header(s), "ratios": args.ratios, "round_to": args.round_to, "criterion": args.criterion,
           "dense_macs": pair.dense_macs, "pruned_macs": pair.pruned_macs,
           "dense_params": pair.dense_params, "pruned_params": pair.pruned_params,
           "mac_speedup": pair.mac_speedup, "plan_sha256": pair.plan.sha256(), **m,
           "efficiency": {"infer": m["infer"]["efficiency"], "train": m["train"]["efficiency"]}}
    rows = [["MACs / sample (M)", f"{pair.dense_macs / 1e6:.1f}", f"{pair.pruned_macs / 1e6:.1f}",
             f"{pair.mac_speedup:.2f}x", "", ""]]
    for phase, label in (("infer", "inference ms / batch"), ("train", "training ms / step")):
        r = m[phase]
        rows.append([label, f"{r['dense_ms']:.2f}", f"{r['pruned_ms']:.2f}", f"{r['speedup']:.2f}x",
                     f"{r['efficiency']:.2f}", f"{r['dense_spread']:.2f} / {r['pruned_spread']:.2f}"])
    text = (f"{args.model} {args.ratios} round_to={args.round_to}  {res['device_name']} ({res['device']}, "
            f"{res['cpu_threads']} threads)  {s['dtype']}{' channels_last' if s['channels_last'] else ''}"
            f"{' compile' if s['compile'] else ''}  batch {s['batch']} x {'x'.join(map(str, s['input_size']))}"
            f"  median of {s['reps']} alternating reps ({res['timing']})\n"
            + common.md_table(["", "dense", "pruned", "speedup", "measured/MAC", "spread d / p"], rows))
    return res, text


def round_to_table(model, ratio_specs, s: dict, *, round_tos=ROUND_TOS, criterion="l1",
                   seed: int = 0) -> list[dict]:
    """One row per (ratios, round_to): MAC speedup, measured inference and training speedup
    (dense timed alternately with each pruned variant), smallest kept width and whether every
    pruned group keeps a multiple of round_to channels (or all of them). ``model``: a registry
    name or the dense ``nn.Module``."""
    torch.manual_seed(seed)
    from .. import models

    dense = models.create(model, num_classes=s["num_classes"]) if isinstance(model, str) else model
    dense_fns = None
    rows = []
    for spec in ratio_specs:
        for rt in round_tos:
            pair = common.pruned_pair(dense, spec, s["num_classes"], s["input_size"], rt, criterion, seed)
            dense_fns = dense_fns or make_fns(pair.dense, s)
            m = measure(pair, s, dense_fns=dense_fns)
            kept = [(len(g.keep), g.n) for g in pair.plan.groups]
            rows.append({"ratios": spec, "round_to": rt, "mac_speedup": pair.mac_speedup,
                         "infer_speedup": m["infer"]["speedup"], "train_speedup": m["train"]["speedup"],
                         "infer_efficiency": m["infer"]["efficiency"], "train_efficiency": m["train"]["efficiency"],
                         "dense_macs": pair.dense_macs, "pruned_macs": pair.pruned_macs,
                         "spread": max(m[ph][f"{k}_spread"] for ph in ("infer", "train") for k in ("dense", "pruned")),
                         "kept_min": min((k for k, _ in kept), default=None),
                         "kept_multiple": all(k % rt == 0 or k == n for k, n in kept) if rt else True,
                         "kept": {g.root: len(g.keep) for g in pair.plan.groups},
                         "channels": {g.root: g.n for g in pair.plan.groups},
                         "plan_sha256": pair.plan.sha256()})
    return rows


def round_to_main(args) -> tuple[dict, str]:
    args.model = args.model or "resnet50"
    specs = [r.strip() for r in args.ratios.split(";") if r.strip()] if args.ratios else list(ROUND_TO_RATIOS)
    s = _settings(args)
    common.set_backend_flags(s["device"])
    rows = round_to_table(_dense(args.model, s, args), specs, s, criterion=args.criterion, seed=args.seed)
    res = {**_header(s), "criterion": args.criterion, "round_to_table": rows}
    table = common.md_table(
        ["ratios", "round_to", "MAC speedup", "infer speedup", "train speedup", "infer/MAC", "train/MAC",
         "min kept", "spread"],
        [[r["ratios"], r["round_to"] or "none", f"{r['mac_speedup']:.2f}x", f"{r['infer_speedup']:.2f}x",
          f"{r['train_speedup']:.2f}x", f"{r['infer_efficiency']:.2f}", f"{r['train_efficiency']:.2f}",
          r["kept_min"], f"{r['spread']:.2f}"] for r in rows])
    text = (f"{args.model} round_to table  {res['device_name']} ({res['device']}, {res['cpu_threads']} threads)  "
            f"{s['dtype']}  batch {s['batch']} x {'x'.join(map(str, s['input_size']))}  median of "
            f"{s['reps']} alternating reps ({res['timing']})\n{table}")
    return res, text


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.round_to_table:
        res, text = round_to_main(args)
    else:
        if not args.model or not args.ratios:
            raise UserError("dprune bench speedup: --model and --ratios are required (or use --round-to-table)")
        res, text = speedup(args)
    common.emit(res, text, as_json=args.json, out=args.out)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
