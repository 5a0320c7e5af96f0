"""Reports over constructed run directories."""
import argparse
import json

import pytest

from distributed_prune import cli, report
from distributed_prune.errors import UserError

STEP_01 = "0:0.01,60:0.001,90:0.0001"
STEP_001 = "0:0.001,80:0.0001"


def summary(label="l1 0.01", seed=0, top1=0.92, method="l1", lr=STEP_01, ratios="[0,0.7,0.7,0.7,0]",
            speedup=3.593, status="complete"):
    return {"status": status, "label": label, "model": "resnet56", "dataset": "cifar10",
            "seed": seed, "world_size": 1,
            "dense": {"top1": 0.9378, "params": 853018, "macs": 125485696},
            "pruned": {"top1": 0.5, "params": 250954, "macs": 34921000, "speedup": speedup,
                       "jsv_mean": 1.2},
            "final": {"top1": top1}, "trainability_accuracy": 0.8,
            "setup": {"base_model_sha256": f"base{seed}", "prune_method": method, "reinit": "none",
                      "ratios": ratios, "pretrain_epochs": 200,
                      "pretrain_lr_schedule": "0:0.1,100:0.01,150:0.001", "prune_epochs": 0,
                      "prune_lr_schedule": None, "retrain_epochs": 120, "retrain_lr_schedule": lr,
                      "total_epochs": 320, "total_train_macs": 1.23e15, "train_samples": 50000,
                      "batch_size": 128}}


METRICS = [{"stage": "pretrain", "epoch": 0, "lr": 0.1, "train_loss": 2.0, "top1": 0.4},
           {"stage": "prune", "epoch": 0, "lr": 0.01, "train_loss": 1.5, "top1": 0.5, "jsv_mean": 1.2},
           {"stage": "retrain", "epoch": 0, "lr": 0.01, "train_loss": 1.0, "top1": 0.8, "jsv_mean": 0.9},
           {"stage": "retrain", "epoch": 1, "lr": 0.001, "train_loss": 0.5, "top1": 0.9}]


def write_run(root, name, s, metrics=METRICS):
    d = root / name
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps(s))
    (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return d


@pytest.fixture
def two_recipes(tmp_path):
    """l1 and tpp, each under two retrain recipes, 3 seeds, two ratios."""
    dirs = []
    acc = {("l1", STEP_01): 0.92, ("l1", STEP_001): 0.91, ("tpp", STEP_01): 0.93, ("tpp", STEP_001): 0.915}
    for (m, lr), a in acc.items():
        for ratios, sp in (("[0,0.5,0.5,0.5,0]", 1.99), ("[0,0.7,0.7,0.7,0]", 3.59)):
            for seed in range(3):
                s = summary(label=f"{m} {lr}", seed=seed, top1=a + 0.01 * seed, method=m, lr=lr,
                            ratios=ratios, speedup=sp)
                dirs.append(write_run(tmp_path, f"{m}-{lr}-{ratios}-{seed}".replace(":", "_"), s))
    return dirs


def test_table_mean_std_over_three_seeds(tmp_path):
    dirs = [write_run(tmp_path, f"s{i}", summary(seed=i, top1=t)) for i, t in enumerate((0.90, 0.91, 0.92))]
    runs = report.load_runs(dirs)
    assert [r["dir"] for r in runs] == [str(d) for d in dirs] and len(runs[0]["metrics"]) == 4
    (row,) = report.table(runs)
    assert row["n"] == 3 and row["seeds"] == [0, 1, 2]
    assert row["final_top1"] == pytest.approx(91.0) and row["final_top1_std"] == pytest.approx(1.0)
    assert row["pruned_top1"] == pytest.approx(50.0) and row["ta"] == pytest.approx(80.0)
    assert row["speedup"] == pytest.approx(3.593) and row["jsv"] == pytest.approx(1.2)


def test_incomplete_runs_skipped_and_sweep_dir_expanded(tmp_path, caplog):
    write_run(tmp_path, "a", summary())
    write_run(tmp_path, "b", summary(status="running"))
    runs = report.load_runs([tmp_path])  # a directory of run directories
    assert len(runs) == 1 and "skipping incomplete run" in caplog.text


def test_missing_dir_or_summary_is_user_error(tmp_path):
    with pytest.raises(UserError, match="nope"):
        report.load_runs([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty"):
        report.load_runs([tmp_path / "empty"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "summary.json").write_text("{not json")
    with pytest.raises(UserError, match="summary.json"):
        report.load_runs([bad])


def test_paper_table_layout(two_recipes):
    pt = report.paper_table(report.load_runs(two_recipes))
    assert pt["columns"] == ["[0,0.5,0.5,0.5,0]", "[0,0.7,0.7,0.7,0]"]
    assert [r["label"] for r in pt["rows"]] == [f"{m} {lr}" for m in ("l1", "tpp") for lr in (STEP_01, STEP_001)]
    assert pt["rows"][0]["cells"]["[0,0.7,0.7,0.7,0]"] == "93.00 ± 1.00"
    assert pt["dense_top1"] == pytest.approx(93.78)


def test_cross_validation_verdicts(two_recipes):
    runs = report.load_runs(two_recipes)
    cv = report.cross_validate(runs, "tpp", "l1")
    assert cv["verdict"] == "A better under both recipes" and cv["winner"] == "tpp"
    assert cv["text"].startswith("tpp better") and len(cv["cells"]) == 4
    assert report.cross_validate(runs, "l1", "tpp")["verdict"] == "B better under both recipes"
    # make l1 win under the small LR only: the ranking depends on the recipe
    for r in runs:
        if r["setup"]["prune_method"] == "l1" and r["setup"]["retrain_lr_schedule"] == STEP_001:
            r["final"]["top1"] += 0.05
    assert report.cross_validate(runs, "tpp", "l1")["verdict"] == \
        "inconclusive: depends on the retraining recipe"
    with pytest.raises(UserError):
        report.cross_validate([r for r in runs if r["setup"]["retrain_lr_schedule"] == STEP_01], "tpp", "l1")


def test_cli_json(two_recipes, capsys):
    args = argparse.Namespace(runs=[str(d) for d in two_recipes], out=None, json=True, plot=None)
    assert report.cli_report(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"setup", "extra", "reason", "rows", "fair", "scratch_budgets"} <= set(out)
    assert out["setup"] == "S3.1" and out["fair"] is False and "retrain LR schedules differ" in out["reason"]
    assert out["extra"] == ["SX-A", "SX-B"] and len(out["rows"]) == 8
    assert out["cross_validation"]["winner"] == "tpp"
    sb = out["scratch_budgets"][0]
    assert sb["scratch_e"] == 320 and sb["scratch_b"] == pytest.approx(200 * 1.99 + 120)


def test_cli_markdown_out_and_plot(tmp_path, capsys):
    dirs = [write_run(tmp_path / "runs", f"s{i}", summary(seed=i, top1=0.9 + 0.01 * i)) for i in range(2)]
    md, png = tmp_path / "out" / "report.md", tmp_path / "acc.png"
    rc = cli.main(["report", *map(str, dirs), "--out", str(md), "--plot", str(png)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Comparison setup: S4.2" in printed and "Scratch-B" in printed
    text = md.read_text()
    assert "90.50 ± 0.71" in text and "Comparison setup:" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in md.parent.iterdir() if p.name.endswith(".tmp")]


def test_cli_missing_dir_exit_2(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


def test_write_run_report(tmp_path):
    s = summary()
    path = report.write_run_report(tmp_path, s, METRICS)
    text = path.read_text()
    assert path == tmp_path / "report.md"
    assert "92.00" in text and "Per epoch" in text and "Scratch-B" in text
    assert "![top1](top1.png)" in text and (tmp_path / "top1.png").stat().st_size > 0
    assert (tmp_path / "jsv.png").read_bytes()[:4] == b"\x89PNG"
