"""Comparison-setup checker (docs/science.md section 2): which setup does a set of runs satisfy?

The setups form a ladder, each rung adding one thing held equal::

    S1    same dataset, network, and speedup (MACs ratio; the params compression rate when
          a run has no MACs), equal within ``speedup_tol`` (relative)
    S2    + the same base model (``setup.base_model_sha256``, see below)
    S3.1  + the same number of retraining epochs
    S3.2  + the same retraining LR schedule (canonical text: "0:0.01,60:0.001" == "0:0.010,60:1e-3")
    S4.1  + the same number of pruning epochs (null counts as 0: one-shot pruning)
    S4.2  + the same pruning LR schedule (null on both sides is equal)

and two extras, reported next to the rung: SX-A (same total epochs of pretrain + prune +
retrain) and SX-B (same total training MACs, within ``flops_tol`` relative).  Only S3.2 or
stricter is *fair*; an S1 or S2 comparison is always reported as not fair.

What is compared.  A *group* is the runs sharing a ``label`` (a method and its recipe: one
row of a paper table); seeds are repeats inside a group.  Runs are first split into
*comparison points* by (dataset, network, speedup): the columns of a paper table, so a
table over ratios 0.3 ... 0.9 is checked column by column rather than refused because the
columns differ in speedup.  A point holding two or more groups is a comparison; the result
is the weakest rung over all comparisons.  When the runs hold a single group, that group is
checked against itself (its seeds).  When there are several groups but no point holds two
of them, the runs are not comparable (``setup`` is None) and ``reason`` says what differs.

Same base model (S2), within one comparison point:

* every run must name its base model (a null hash fails S2);
* runs with the same seed in different groups must have the same hash (a per-seed base);
* every group must use the same *set* of base models: a group that averages over bases the
  other groups never saw is not compared on the same base models.  With one shared base for
  all seeds, both rules reduce to "one hash everywhere".  Pass only the seeds all groups ran
  when a group has extra seeds with their own base.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

from .errors import UserError

__all__ = ["SETUPS", "SetupResult", "check", "scratch_budgets", "scratch_recipe", "speedup_of",
           "canonical_schedule"]

SETUPS = ("S1", "S2", "S3.1", "S3.2", "S4.1", "S4.2")
FAIR = ("S3.2", "S4.1", "S4.2")


@dataclass
class SetupResult:
    """The strictest setup the runs satisfy.

    ``setup``: one of :data:`SETUPS`, or None when not even S1 holds; ``extra``: the subset of
    ``["SX-A", "SX-B"]`` that holds; ``reason``: why the setup is not stricter (or why the runs
    are not comparable); ``fair``: True only for S3.2 or stricter; ``details``: per comparison
    point results and the groups.
    """

    setup: str | None
    extra: list[str] = field(default_factory=list)
    reason: str = ""
    fair: bool = False
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"setup": self.setup, "extra": list(self.extra), "reason": self.reason,
                "fair": self.fair, "details": self.details}


def _get(run: dict, *path: str) -> Any:
    cur: Any = run
    for key in path:
        if not isinstance(cur, dict):
            return None
        cur = cur.get(key)
    return cur


def speedup_of(run: dict) -> float | None:
    """MACs speedup of a run; the params compression rate when it has no MACs; else None."""
    s = _get(run, "pruned", "speedup")
    if s is None:
        dm, pm = _get(run, "dense", "macs"), _get(run, "pruned", "macs")
        if dm and pm:
            s = dm / pm
    if s is None:
        dp, pp = _get(run, "dense", "params"), _get(run, "pruned", "params")
        if dp and pp:
            s = dp / pp
    return None if s is None else float(s)


def _close(a: float, b: float, tol: float) -> bool:
    return abs(a - b) <= tol * max(abs(a), abs(b))


def canonical_schedule(text: Any) -> Any:
    """Canonical schedule text; the raw value when absent or unparsable (compared as is)."""
    if text is None:
        return None
    from .train.schedules import parse_schedule

    try:
        return parse_schedule(text).text
    except (UserError, ValueError):
        return str(text)


def _fmt(v: Any) -> str:
    return "n/a" if v is None else str(v)


def _differ(values: Iterable[Any]) -> list[Any]:
    """Distinct values in first-seen order."""
    out: list[Any] = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def _group_of(run: dict) -> str:
    return str(run.get("label") or _get(run, "setup", "prune_method") or "?")


def _base_model_problem(runs: list[dict]) -> str | None:
    """Why the runs are not on the same base model (S2 rules in the module docstring)."""
    by_group: dict[str, dict[Any, Any]] = {}
    for r in runs:
        h = _get(r, "setup", "base_model_sha256")
        if not h:
            return f"base model unknown for a run of {_group_of(r)!r} (seed {r.get('seed')})"
        by_group.setdefault(_group_of(r), {})[r.get("seed")] = h
    groups = list(by_group)
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            for seed in sorted(set(by_group[a]) & set(by_group[b]), key=str):
                ha, hb = by_group[a][seed], by_group[b][seed]
                if ha != hb:
                    return (f"different base models for seed {seed}: {str(ha)[:12]} ({a}) vs "
                            f"{str(hb)[:12]} ({b})")
            sa, sb = set(by_group[a].values()), set(by_group[b].values())
            if sa != sb:
                only = sorted(str(h)[:12] for h in sa ^ sb)
                return (f"groups {a!r} and {b!r} use different sets of base models "
                        f"(not shared: {', '.join(only)})")
    return None


def _ladder(runs: list[dict]) -> tuple[str, str]:
    """Strictest rung S1..S4.2 for runs already equal on S1; with the reason it stops there."""
    problem = _base_model_problem(runs)
    if problem:
        return "S1", f"{problem}: S1"
    rungs = [
        ("S3.1", "retrain epochs", lambda r: _get(r, "setup", "retrain_epochs")),
        ("S3.2", "retrain LR schedules",
         lambda r: canonical_schedule(_get(r, "setup", "retrain_lr_schedule"))),
        ("S4.1", "prune epochs", lambda r: _get(r, "setup", "prune_epochs") or 0),
        ("S4.2", "prune LR schedules",
         lambda r: canonical_schedule(_get(r, "setup", "prune_lr_schedule"))),
    ]
    level = "S2"
    for rung, what, key in rungs:
        values = _differ(key(r) for r in runs)
        if len(values) > 1:
            return level, f"{what} differ ({' vs '.join(_fmt(v) for v in values)}): {level}"
        level = rung
    return level, "same dataset, network, speedup, base model, retraining and pruning recipe: S4.2"


def _extras(runs: list[dict], flops_tol: float) -> list[str]:
    extra = []
    totals = _differ(_get(r, "setup", "total_epochs") for r in runs)
    if len(totals) == 1 and totals[0] is not None:
        extra.append("SX-A")
    macs = [_get(r, "setup", "total_train_macs") for r in runs]
    if macs and all(m is not None for m in macs) and _close(min(macs), max(macs), flops_tol):
        extra.append("SX-B")
    return extra


def _points(runs: list[dict], speedup_tol: float) -> list[dict]:
    """Split runs into comparison points: same dataset, network and speedup (within tol)."""
    points: list[dict] = []
    for r in runs:
        key = (r.get("dataset"), r.get("model"))
        s = speedup_of(r)
        ratios = _get(r, "setup", "ratios")
        for p in points:
            if p["key"] != key:
                continue
            if s is not None and p["speedup"] is not None and _close(s, p["speedup"], speedup_tol):
                break
            if s is None and p["speedup"] is None and ratios == p["ratios"]:
                break
        else:
            p = {"key": key, "speedup": s, "ratios": ratios, "runs": []}
            points.append(p)
        p["runs"].append(r)
    return points


def _describe(p: dict) -> str:
    dataset, model = p["key"]
    s = "?" if p["speedup"] is None else f"{p['speedup']:.2f}x"
    return f"{model}/{dataset} at {s}"


def _not_comparable(points: list[dict], groups: list[str]) -> str:
    """Say what differs between the first two groups' runs."""
    first: dict[str, tuple[dict, dict]] = {}
    for p in points:
        for r in p["runs"]:
            first.setdefault(_group_of(r), (r, p))
    (ra, pa), (rb, pb) = first[groups[0]], first[groups[1]]
    pairs = [("datasets", ra.get("dataset"), rb.get("dataset")),
             ("networks", ra.get("model"), rb.get("model"))]
    diffs = [f"{what} differ ({_fmt(a)} vs {_fmt(b)})" for what, a, b in pairs if a != b]
    if not diffs:
        sp = [("n/a" if q["speedup"] is None else f"{q['speedup']:.2f}x") for q in (pa, pb)]
        diffs = [f"speedups differ ({sp[0]} vs {sp[1]})"]
    return f"not comparable: {'; '.join(diffs)} between {groups[0]!r} and {groups[1]!r}"


def check(summaries: list[dict], *, speedup_tol: float = 0.02, flops_tol: float = 0.01) -> SetupResult:
    """The strictest comparison setup ``summaries`` (summary.json dicts) satisfy.

    See the module docstring for what is compared; ``speedup_tol`` and ``flops_tol`` are
    relative tolerances for S1's speedup and SX-B's total training MACs.
    """
    if not summaries:
        raise UserError("no runs to compare")
    groups = _differ(_group_of(r) for r in summaries)
    points = _points(summaries, speedup_tol)
    compared = [p for p in points
                if len(groups) == 1 or len(_differ(_group_of(r) for r in p["runs"])) > 1]
    per_point = []
    for p in compared:
        setup, reason = _ladder(p["runs"])
        per_point.append({"point": _describe(p), "speedup": p["speedup"],
                          "groups": _differ(_group_of(r) for r in p["runs"]),
                          "runs": len(p["runs"]), "setup": setup,
                          "extra": _extras(p["runs"], flops_tol), "reason": reason})
    details = {"groups": groups, "points": per_point,
               "uncompared": [_describe(p) for p in points
                              if not any(p is q for q in compared)]}
    if not per_point:
        return SetupResult(None, [], _not_comparable(points, groups), False, details)
    worst = min(per_point, key=lambda d: SETUPS.index(d["setup"]))
    extra = [x for x in ("SX-A", "SX-B") if all(x in d["extra"] for d in per_point)]
    reason = worst["reason"]
    if len(per_point) > 1:
        reason = f"{reason} (weakest of {len(per_point)} comparison points: {worst['point']})"
    if details["uncompared"]:
        reason += f" [no other group to compare with at {', '.join(details['uncompared'])}]"
    if len(groups) == 1:
        reason = f"one group only ({groups[0]}), seeds compared with each other; {reason}"
    fair = worst["setup"] in FAIR
    if not fair:
        reason += "; not a fair comparison (S3.2 or stricter is needed)"
    return SetupResult(worst["setup"], extra, reason, fair, details)


def scratch_budgets(pretrain_epochs: float, retrain_epochs: float, speedup: float,
                    prune_epochs: float = 0) -> dict:
    """Epoch budgets of the scratch baselines (docs/science.md section 1).

    Scratch-E trains the pruned architecture for the same total epochs, K1 + K2; Scratch-B for
    the same total FLOPs, K1 * (F1/F2) + K2, with F1/F2 = ``speedup``.  K1 counts the pretrain
    epochs plus ``prune_epochs`` (the pruning stage trains the dense, masked model), K2 the
    retrain epochs.  ``scratch_b`` is exact (a float); ``scratch_b_epochs`` rounds it up (a
    whole epoch more rather than less compute), ignoring float noise below 1e-6.
    """
    k1, k2 = float(pretrain_epochs) + float(prune_epochs or 0), float(retrain_epochs)
    if k1 < 0 or k2 < 0:
        raise UserError(f"epochs must be >= 0, got pretrain {pretrain_epochs}, retrain {retrain_epochs}")
    if not speedup or speedup <= 0 or not math.isfinite(speedup):
        raise UserError(f"speedup must be a positive number, got {speedup}")
    scratch_e = k1 + k2
    scratch_b = k1 * float(speedup) + k2
    as_int = (lambda x: int(x) if float(x).is_integer() else x)
    return {"scratch_e": as_int(scratch_e), "scratch_b": scratch_b,
            "scratch_b_epochs": int(math.ceil(round(scratch_b, 6)))}


def scratch_recipe(budget: str, *, base_epochs: float | None, retrain_epochs: float,
                   retrain_schedule: str, speedup: float, prune_epochs: float = 0) -> tuple[float, str]:
    """(epochs, LR schedule text) of a Scratch-E (``budget="E"``) or Scratch-B (``"B"``) run.

    K1 = ``base_epochs``, the epochs that trained the base model the pruned architecture came
    from (refused when unknown), K2 = ``retrain_epochs``.  Scratch-E trains K1 + K2 epochs,
    Scratch-B exactly K1 * speedup + K2 (a fractional last epoch is cut short, so the total
    training MACs equal the pruning run's: SX-B).  The retraining schedule is stretched by
    epochs / K2 (milestones at the same fractions of the run), not extended at its last LR.
    """
    from .train.schedules import parse_schedule

    if budget not in ("E", "B"):
        raise UserError(f"scratch budget must be E or B, got {budget!r}")
    if base_epochs is None:
        raise UserError("Scratch-E/B needs K1, the epochs that trained the base model: the base "
                        "checkpoint does not record them; set pretrain.base_epochs")
    if not retrain_epochs or retrain_epochs <= 0:
        raise UserError(f"Scratch-{budget} needs retrain.epochs > 0 (K2), got {retrain_epochs}")
    b = scratch_budgets(base_epochs, retrain_epochs, speedup, prune_epochs=prune_epochs)
    epochs = float(b["scratch_e"] if budget == "E" else b["scratch_b"])
    sched = parse_schedule(retrain_schedule).stretch(epochs / float(retrain_epochs))
    return epochs, sched.text
