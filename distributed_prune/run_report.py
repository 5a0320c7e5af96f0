"""report.md of one run (written by the pipeline at the end of every run), and the Markdown
and figure helpers that :mod:`distributed_prune.report` shares for reports over many runs."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from . import fileio, setups

__all__ = ["write_run_report", "md_table", "figure", "save_figure", "atomic_write"]


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Never a half-written file (see :mod:`distributed_prune.fileio`)."""
    return fileio.write_bytes(path, data.encode() if isinstance(data, str) else data)


def save_figure(fig, path: str | os.PathLike) -> Path:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return atomic_write(path, buf.getvalue())


def figure():
    """A matplotlib Figure drawn by the Agg canvas (no pyplot: no global backend state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    return fig


def fmt_num(v: Any, spec: str = "") -> str:
    if v is None:
        return "n/a"
    return format(v, spec) if spec and isinstance(v, (int, float)) else str(v)


def pct(v: Any) -> str:
    return "n/a" if v is None else f"{100.0 * v:.2f}"


def setup_value(v: Any) -> str:
    if v is None:
        return "n/a"
    return f"{v:.4g}" if isinstance(v, float) else f"`{v}`"


def plot_per_epoch(metrics: list[dict], key: str, ylabel: str, path: Path, scale: float = 1.0,
                    log_y: bool = False) -> Path | None:
    """``key`` per epoch, epochs of all stages laid end to end, one colour per stage."""
    pts = [(m.get("stage"), m.get(key)) for m in metrics]
    if not any(v is not None for _, v in pts):
        return None
    fig = figure()
    ax = fig.add_subplot()
    for stage in dict.fromkeys(s for s, _ in pts):
        xs = [i for i, (s, v) in enumerate(pts) if s == stage and v is not None]
        ax.plot(xs, [pts[i][1] * scale for i in xs], marker=".", label=str(stage))
    ax.set_xlabel("epoch (all stages)")
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def write_run_report(run_dir: str | os.PathLike, summary: dict, metrics: list[dict]) -> Path:
    """Write ``run_dir/report.md`` for one run (summary, Scratch budgets, per-epoch table).

    Also ``top1.png`` (and ``jsv.png`` where JSV was measured) in ``run_dir`` when matplotlib
    is installed.  Returns the report's path.
    """
    run_dir = Path(run_dir)
    s = summary.get("setup") or {}
    dense, pruned = summary.get("dense") or {}, summary.get("pruned") or {}
    lines = [f"# Run {summary.get('label', '')}".rstrip(), "",
             f"{summary.get('model')} on {summary.get('dataset')}, seed {summary.get('seed')}, "
             f"world size {summary.get('world_size')}, status {summary.get('status', 'n/a')}", "",
             md_table(["", "top-1 %", "params", "MACs", "speedup", "mean JSV"], [
                 ["dense", pct(dense.get("top1")), fmt_num(dense.get("params"), ","),
                  fmt_num(dense.get("macs"), ","), "1.00", ""],
                 ["pruned", pct(pruned.get("top1")), fmt_num(pruned.get("params"), ","),
                  fmt_num(pruned.get("macs"), ","), fmt_num(pruned.get("speedup"), ".2f"),
                  fmt_num(pruned.get("jsv_mean"), ".4g")],
                 ["final", pct((summary.get("final") or {}).get("top1")), "", "", "", ""]]),
             "", f"Trainability accuracy: {pct(summary.get('trainability_accuracy'))} %", "",
             "## Setup", "", md_table(["key", "value"], [[k, setup_value(v)] for k, v in s.items()])]
    speedup = setups.speedup_of(summary)
    if s.get("pretrain_epochs") is not None and s.get("retrain_epochs") is not None and speedup:
        b = setups.scratch_budgets(s["pretrain_epochs"], s["retrain_epochs"], speedup,
                                   prune_epochs=s.get("prune_epochs") or 0)
        lines += ["", f"Scratch baselines: Scratch-E {b['scratch_e']} epochs, Scratch-B "
                      f"{b['scratch_b']:.1f} (→ {b['scratch_b_epochs']}) epochs."]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        plots = []
    else:
        plots = [p for p in (
            plot_per_epoch(metrics, "top1", "test top-1 (%)", run_dir / "top1.png", 100.0),
            plot_per_epoch(metrics, "jsv_mean", "mean JSV", run_dir / "jsv.png", log_y=True))
            if p is not None]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    if metrics:
        lines += ["", "## Per epoch", "",
                  md_table(["stage", "epoch", "lr", "train loss", "top-1 %", "mean JSV"],
                            [[m.get("stage"), m.get("epoch"), fmt_num(m.get("lr"), ".3g"),
                              fmt_num(m.get("train_loss"), ".4f"),
                              "" if m.get("top1") is None else f"{100.0 * m['top1']:.2f}",
                              "" if m.get("jsv_mean") is None else f"{m['jsv_mean']:.4g}"]
                             for m in metrics])]
    return atomic_write(run_dir / "report.md", "\n".join(lines) + "\n")
