"""Reports over run directories: tables (mean +- std over seeds), comparison setup, plots.

    dprune report RUN_DIR... [--out FILE] [--json] [--plot PNG]

A RUN_DIR is an ``output.dir`` of ``dprune run`` (``summary.json``, ``metrics.jsonl``, ...);
a directory without ``summary.json`` whose sub-directories have one (a sweep's ``--out``)
stands for those runs.  Runs whose ``status`` is not ``complete`` are skipped with a warning
on stderr: a half-trained run would drag a mean down silently.

Accuracies in summary.json are fractions; every table here prints percentages.  The pipeline
calls :func:`write_run_report` at the end of each run.
"""
from __future__ import annotations

import json
import logging
import math
import os
import statistics
from pathlib import Path
from typing import Any, Iterable, Sequence

from . import rundir, setups
from .cmdline import check_output_file
from .errors import UserError
from .run_report import atomic_write, figure, md_table, save_figure, write_run_report  # noqa: F401

__all__ = ["load_runs", "table", "paper_table", "cross_validate", "scratch_rows", "setup_line", "to_markdown",
           "plot_acc_vs_speedup", "write_run_report", "cli_report", "METRICS"]

log = logging.getLogger(__name__)

# (row key, path in summary.json, scale): accuracies are stored as fractions, shown as %.
METRICS = (
    ("final_top1", ("final", "top1"), 100.0),
    ("pruned_top1", ("pruned", "top1"), 100.0),
    ("ta", ("trainability_accuracy",), 100.0),
    ("speedup", ("pruned", "speedup"), 1.0),
    ("jsv", ("pruned", "jsv_mean"), 1.0),
)


# ------------------------------------------------------------------------------------ loading

def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def _run_dirs(d: Path) -> list[Path]:
    if (d / "summary.json").is_file():
        return [d]
    if not d.is_dir():
        raise UserError(f"run directory not found: {d}")
    subs = sorted(p for p in d.iterdir() if (p / "summary.json").is_file())
    if not subs:
        raise UserError(f"no summary.json in {d} (not a run directory)")
    return subs


_SECTIONS = ("dense", "pruned", "final", "setup")  # summary.json keys whose values are objects


def _check_shape(summary: dict, path: Path) -> None:
    """The sections a report reads must be JSON objects (a hand-edited or foreign file)."""
    for key in _SECTIONS:
        if summary.get(key) is not None and not isinstance(summary[key], dict):
            raise UserError(f"{path}: {key!r} must be a JSON object, got {type(summary[key]).__name__}")


def load_runs(dirs: Iterable[str | os.PathLike]) -> list[dict]:
    """summary.json of each run directory, plus ``dir`` and ``metrics`` (metrics.jsonl rows).

    A missing directory or summary.json is a UserError naming the path; a run whose status is
    not ``complete`` is skipped with a warning (logged to stderr).
    """
    runs = []
    for d in dirs:
        for rd in _run_dirs(Path(d)):
            summary = _read_json(rd / "summary.json")
            _check_shape(summary, rd / "summary.json")
            if not rundir.summary_is_complete(summary):
                log.warning("skipping incomplete run %s (status %s)", rd, summary.get("status"))
                continue
            summary["dir"] = str(rd)
            summary["metrics"] = rundir.read_metrics(rd, strict=True)
            runs.append(summary)
    return runs


# ------------------------------------------------------------------------------------- tables

def _get(run: dict, path: Sequence[str]) -> Any:
    cur: Any = run
    for k in path:
        cur = cur.get(k) if isinstance(cur, dict) else None
    return cur


def _label(run: dict) -> str:
    return str(run.get("label") or _get(run, ("setup", "prune_method")) or "?")


def _ratios(run: dict) -> str:
    return str(_get(run, ("setup", "ratios")))


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample std (None for fewer than two values)."""
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _groups(runs: list[dict]) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        out.setdefault((_label(r), _ratios(r)), []).append(r)
    return out


def table(runs: list[dict]) -> list[dict]:
    """One row per (label, ratios): mean and std over seeds of every metric in :data:`METRICS`.

    Row keys: label, ratios, model, dataset, n, seeds, dirs, and ``<metric>`` / ``<metric>_std``
    (top-1 and TA in %); rows sorted by label (first-seen order) then speedup.
    """
    rows = []
    for (label, ratios), rs in _groups(runs).items():
        row: dict[str, Any] = {"label": label, "ratios": ratios, "model": rs[0].get("model"),
                               "dataset": rs[0].get("dataset"), "n": len(rs),
                               "seeds": [r.get("seed") for r in rs],
                               "dirs": [r.get("dir") for r in rs]}
        for key, path, scale in METRICS:
            vals = [float(v) * scale for v in (_get(r, path) for r in rs) if v is not None]
            row[key], row[f"{key}_std"] = _mean_std(vals)
        rows.append(row)
    order = {lab: i for i, lab in enumerate(dict.fromkeys(r["label"] for r in rows))}
    rows.sort(key=lambda r: (order[r["label"]], r["speedup"] if r["speedup"] is not None else math.inf))
    return rows


def _pm(mean: float | None, std: float | None, digits: int = 2) -> str:
    if mean is None:
        return ""
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def paper_table(runs: list[dict]) -> dict:
    """The paper's layout: one row per label, one column per ratio spec, cells final top-1 %.

    Returns ``{"columns": [ratios...], "speedups": [mean speedup per column], "dense_top1":
    mean dense top-1 %, "rows": [{"label": ..., "cells": {ratios: "93.79 ± 0.12"}}]}``;
    columns are sorted by speedup.
    """
    rows = table(runs)
    speed: dict[str, list[float]] = {}
    for r in rows:
        if r["speedup"] is not None:
            speed.setdefault(r["ratios"], []).append(r["speedup"])
        else:
            speed.setdefault(r["ratios"], [])
    columns = sorted(speed, key=lambda c: statistics.fmean(speed[c]) if speed[c] else math.inf)
    out_rows: dict[str, dict] = {}
    for r in rows:
        out_rows.setdefault(r["label"], {"label": r["label"], "cells": {}})["cells"][r["ratios"]] = \
            _pm(r["final_top1"], r["final_top1_std"])
    dense = [100.0 * v for v in (_get(r, ("dense", "top1")) for r in runs) if v is not None]
    return {"columns": columns,
            "speedups": [statistics.fmean(speed[c]) if speed[c] else None for c in columns],
            "dense_top1": statistics.fmean(dense) if dense else None,
            "rows": list(out_rows.values())}


# ---------------------------------------------------------------------------- cross-validation

def method_of(run: dict) -> str:
    """The pruning method as a row name: ``l1``, ``l1+orthp``, ``scratch``, ``tpp`` ... (the
    re-initialisation is part of the method: L1 and L1 + OrthP are different methods)."""
    m = str(_get(run, ("setup", "prune_method")))
    reinit = _get(run, ("setup", "reinit")) or "none"
    return "scratch" if reinit == "scratch" else m if reinit == "none" else f"{m}+{reinit}"


def _method_matches(run: dict, method: str) -> bool:
    return method in (method_of(run), run.get("label"))


def _recipe(run: dict) -> str:
    """The retraining recipe: canonical retrain LR schedule over the retrain epochs."""
    sched = setups.canonical_schedule(_get(run, ("setup", "retrain_lr_schedule")))
    return f"{sched} x{_get(run, ('setup', 'retrain_epochs'))}"


def cross_validate(runs: list[dict], method_a: str, method_b: str) -> dict:
    """Recipe cross-validation (docs/science.md section 2): is A better than B under every recipe?

    A method is matched by ``setup.prune_method`` or by ``label``; a recipe is a retraining LR
    schedule (canonical) with its epochs.  At each ratio spec, the mean final top-1 of A and B is
    compared under every recipe both ran; the verdict is ``"A better under both recipes"``,
    ``"B better under both recipes"`` (``all N`` for more than two) or ``"inconclusive: depends
    on the retraining recipe"`` (a tie counts as neither winning).  When ratios disagree the
    verdict is ``"inconclusive: depends on the pruning ratio"``.  Means only: look at the std
    in the cells before trusting a small gap.  UserError when no ratio has both methods under
    two or more recipes.
    """
    cell: dict[tuple[str, str, str], list[float]] = {}
    for r in runs:
        top1 = _get(r, ("final", "top1"))
        if top1 is None:
            continue
        for side, m in (("A", method_a), ("B", method_b)):
            if _method_matches(r, m):
                cell.setdefault((_ratios(r), _recipe(r), side), []).append(100.0 * top1)
    cells, per_ratio = [], {}
    for ratios in dict.fromkeys(k[0] for k in cell):
        recipes = [rc for rc in dict.fromkeys(k[1] for k in cell if k[0] == ratios)
                   if (ratios, rc, "A") in cell and (ratios, rc, "B") in cell]
        if len(recipes) < 2:
            continue
        wins = []
        for rc in recipes:
            a, b = (statistics.fmean(cell[(ratios, rc, s)]) for s in "AB")
            winner = "A" if a > b else "B" if b > a else None
            wins.append(winner)
            cells.append({"ratios": ratios, "recipe": rc, "a_top1": a, "b_top1": b,
                          "n_a": len(cell[(ratios, rc, "A")]), "n_b": len(cell[(ratios, rc, "B")]),
                          "winner": {"A": method_a, "B": method_b}.get(winner)})
        under = "both" if len(recipes) == 2 else f"all {len(recipes)}"
        if all(w == "A" for w in wins) or all(w == "B" for w in wins):
            per_ratio[ratios] = f"{wins[0]} better under {under} recipes"
        else:
            per_ratio[ratios] = "inconclusive: depends on the retraining recipe"
    if not per_ratio:
        raise UserError(f"cross-validation of {method_a!r} vs {method_b!r} needs both methods "
                        "retrained under at least two recipes at the same ratios")
    verdicts = set(per_ratio.values())
    verdict = verdicts.pop() if len(verdicts) == 1 else "inconclusive: depends on the pruning ratio"
    winner = {"A": method_a, "B": method_b}.get(verdict[0]) if "better" in verdict else None
    text = verdict if winner is None else verdict.replace(verdict[0], winner, 1)
    return {"method_a": method_a, "method_b": method_b, "verdict": verdict, "winner": winner,
            "text": text, "per_ratio": per_ratio, "cells": cells}


def _auto_cross_validation(runs: list[dict], pair: str | None = None) -> dict | None:
    """Cross-validate ``pair`` ("A,B"), or the two methods when the runs hold exactly two."""
    if pair:
        a, _, b = pair.partition(",")
        if not a or not b:
            raise UserError(f"--cross {pair!r}: expected two methods, e.g. l1,tpp")
        return cross_validate(runs, a.strip(), b.strip())
    methods = list(dict.fromkeys(method_of(r) for r in runs))
    if len(methods) != 2:
        return None
    try:
        return cross_validate(runs, *methods)
    except UserError:
        return None


# ---------------------------------------------------------------------------- scratch budgets

def scratch_rows(runs: list[dict]) -> list[dict]:
    """Scratch-E / Scratch-B budgets per (label, ratios), from the runs' epochs and speedup.

    Rows with no pretraining epochs recorded or no speedup are left out.
    """
    out = []
    for (label, ratios), rs in _groups(runs).items():
        s = rs[0].get("setup") or {}
        speeds = [v for v in (setups.speedup_of(r) for r in rs) if v]
        if s.get("pretrain_epochs") is None or s.get("retrain_epochs") is None or not speeds:
            continue
        speedup = statistics.fmean(speeds)
        b = setups.scratch_budgets(s["pretrain_epochs"], s["retrain_epochs"], speedup,
                                   prune_epochs=s.get("prune_epochs") or 0)
        out.append({"label": label, "ratios": ratios, "pretrain_epochs": s["pretrain_epochs"],
                    "prune_epochs": s.get("prune_epochs") or 0,
                    "retrain_epochs": s["retrain_epochs"], "speedup": speedup, **b})
    return out


# ----------------------------------------------------------------------------------- markdown

def setup_line(result: setups.SetupResult) -> str:
    """``Comparison setup: S3.1 — reason (+ SX-A)``, and whether it is fair."""
    name = result.setup or "none (not comparable)"
    extra = f" (+ {', '.join(result.extra)})" if result.extra else ""
    fair = " [fair]" if result.fair else ""  # the reason already says when it is not fair
    return f"Comparison setup: {name}{extra} — {result.reason}{fair}"


def to_markdown(runs: list[dict], result: setups.SetupResult | None = None,
                cross: dict | None = None) -> str:
    """Markdown report: per-row table, paper layout, comparison setup, scratch budgets."""
    result = result or setups.check(runs)
    rows = table(runs)
    parts = ["# Pruning report", "", setup_line(result), "",
             "## Runs (mean ± std over seeds; top-1 and TA in %)", "",
             md_table(["label", "ratios", "n", "final top-1", "pruned top-1", "TA", "speedup",
                        "mean JSV"],
                       [[r["label"], f"`{r['ratios']}`", r["n"],
                         _pm(r["final_top1"], r["final_top1_std"]),
                         _pm(r["pruned_top1"], r["pruned_top1_std"]), _pm(r["ta"], r["ta_std"]),
                         _pm(r["speedup"], r["speedup_std"]), _pm(r["jsv"], r["jsv_std"], 4)]
                        for r in rows])]
    pt = paper_table(runs)
    base = "" if pt["dense_top1"] is None else f", dense {pt['dense_top1']:.2f}"
    heads = [f"`{c}`" + ("" if s is None else f" ({s:.2f}x)")
             for c, s in zip(pt["columns"], pt["speedups"])]
    parts += ["", f"## Paper layout (final top-1 %{base})", "",
              md_table(["row", *heads], [[r["label"], *(r["cells"].get(c, "") for c in pt["columns"])]
                                         for r in pt["rows"]])]
    sb = scratch_rows(runs)
    if sb:
        parts += ["", "## Scratch baselines (epochs for the pruned architecture)", "",
                  "Scratch-E = K1 + K2 (same epochs); Scratch-B = K1 x speedup + K2 (same FLOPs); "
                  "K1 = pretrain + prune epochs, K2 = retrain epochs.", "",
                  md_table(["label", "ratios", "K1", "K2", "speedup", "Scratch-E", "Scratch-B"],
                            [[r["label"], f"`{r['ratios']}`",
                              r["pretrain_epochs"] + r["prune_epochs"], r["retrain_epochs"],
                              f"{r['speedup']:.2f}", r["scratch_e"],
                              f"{r['scratch_b']:.1f} (→ {r['scratch_b_epochs']})"] for r in sb])]
    if cross:
        parts += ["", f"## Recipe cross-validation: {cross['method_a']} vs {cross['method_b']}", "",
                  f"Verdict: **{cross['text']}**", "",
                  md_table(["ratios", "recipe", cross["method_a"], cross["method_b"], "winner"],
                            [[f"`{c['ratios']}`", c["recipe"], f"{c['a_top1']:.2f}",
                              f"{c['b_top1']:.2f}", c["winner"] or "tie"] for c in cross["cells"]])]
    return "\n".join(parts) + "\n"


def plot_acc_vs_speedup(runs: list[dict], path: str | os.PathLike) -> Path:
    """PNG of final top-1 (%) vs speedup, one line per label (error bars: std over seeds)."""
    fig = figure()
    ax = fig.add_subplot()
    rows = [r for r in table(runs) if r["speedup"] is not None and r["final_top1"] is not None]
    for label in dict.fromkeys(r["label"] for r in rows):
        rs = [r for r in rows if r["label"] == label]
        ax.errorbar([r["speedup"] for r in rs], [r["final_top1"] for r in rs],
                    yerr=[r["final_top1_std"] or 0.0 for r in rs], marker="o", capsize=3, label=label)
    dense = [100.0 * v for v in (_get(r, ("dense", "top1")) for r in runs) if v is not None]
    if dense:
        ax.axhline(statistics.fmean(dense), color="gray", linestyle="--", label="dense")
    ax.set_xlabel("speedup (dense MACs / pruned MACs)")
    ax.set_ylabel("final top-1 (%)")
    ax.grid(alpha=0.3)
    if rows or dense:
        ax.legend(fontsize=8)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------- CLI

def cli_report(args) -> int:
    """``dprune report RUN_DIR... [--out FILE] [--json] [--plot PNG]``.

    Prints the markdown report (or, with ``--json``, one JSON object with ``setup``, ``extra``,
    ``reason``, ``fair``, ``rows``, ``paper_table``, ``scratch_budgets``, ``cross_validation``,
    ``details``); ``--out`` writes the markdown atomically, ``--plot`` a PNG of accuracy vs speedup.
    """
    check_output_file("--out", getattr(args, "out", None))
    check_output_file("--plot", getattr(args, "plot", None))
    runs = load_runs(args.runs)
    if not runs:
        raise UserError(f"no complete runs in {' '.join(map(str, args.runs))}")
    result = setups.check(runs)
    cross = _auto_cross_validation(runs, getattr(args, "cross", None))
    md = to_markdown(runs, result, cross)
    if getattr(args, "out", None):
        atomic_write(args.out, md)
    if getattr(args, "plot", None):
        plot_acc_vs_speedup(runs, args.plot)
    if getattr(args, "json", False):
        print(json.dumps({**result.to_dict(), "rows": table(runs), "paper_table": paper_table(runs),
                          "scratch_budgets": scratch_rows(runs), "cross_validation": cross,
                          "runs": [r["dir"] for r in runs]}))
    else:
        print(md, end="")
        for what, p in (("report", getattr(args, "out", None)), ("plot", getattr(args, "plot", None))):
            if p:
                print(f"wrote {what} {p}")
    return 0
