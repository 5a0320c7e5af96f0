"""`dprune quickstart` (fast mode) on the real digits data: files, keys and the paper's findings."""
import json

from distributed_prune.cli import main


def test_quickstart_fast(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--fast"]) == 0
    shown = capsys.readouterr()
    assert "report" in shown.out
    # a progress bar per arm (stderr) and a short table, not a line per epoch
    lines = shown.out.splitlines()
    assert len(lines) <= 12 and not [ln for ln in lines if ln.startswith(("[pretrain", "[retrain", "[pruned]"))]
    for label in ("LR 0.01", "LR 0.001", "LR 0.01 + OrthP"):
        assert sum(ln.strip().split("  ")[0] == label for ln in lines) == 1, label
    assert {"base (pretrain)", "LR 0.01", "LR 0.001", "LR 0.01 + OrthP"} <= \
        {part.split(":")[0].strip() for part in shown.err.replace("\r", "\n").splitlines() if "epoch" in part}
    data = json.loads((out / "quickstart.json").read_text())
    assert set(data["jsv_by_ratio"]) == {"0.0", "0.1", "0.3", "0.5", "0.7", "0.9"}
    vals = list(data["jsv_by_ratio"].values())
    assert all(a > b for a, b in zip(vals, vals[1:])), "mean JSV must fall with the pruning ratio"
    assert len(data["runs"]) == 3
    for r in data["runs"]:
        assert {"ratio", "lr", "reinit", "top1_by_epoch", "jsv_by_epoch", "trainability_accuracy"} <= set(r)
        assert len(r["top1_by_epoch"]) == 6 and all(j is not None for j in r["jsv_by_epoch"])
    by = {(r["lr"], r["reinit"]): r for r in data["runs"]}
    # OrthP makes every layer orthogonal: a linear net's Jacobian becomes an isometry (JSV 1)
    assert abs(by[(0.01, "orthp")]["jsv_after_prune"] - 1.0) < 1e-3
    assert by[(0.01, "none")]["jsv_after_prune"] < 0.5
    for f in ("report.md", "jsv_vs_ratio.png", "retrain_by_epoch.png"):
        assert (out / f).stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "Did the paper's findings hold" in report and ("HELD" in report)
    for d in ("base", *[r["dir"] for r in data["runs"]]):
        assert json.loads((out / d / "summary.json").read_text())["status"] == "complete"
