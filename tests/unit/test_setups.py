"""Comparison-setup checker on constructed run sets (docs/science.md section 2)."""
import copy

import pytest

from distributed_prune.errors import UserError
from distributed_prune.setups import check, scratch_budgets, speedup_of

STEP_01 = "0:0.01,60:0.001,90:0.0001"
STEP_001 = "0:0.001,80:0.0001"


def run(label="l1", seed=0, speedup=3.593, base="aa", retrain_epochs=120, retrain_lr=STEP_01,
        prune_epochs=0, prune_lr=None, total_epochs=None, total_macs=1e15, model="resnet56",
        dataset="cifar10"):
    total = 200 + prune_epochs + retrain_epochs if total_epochs is None else total_epochs
    return {"status": "complete", "label": label, "model": model, "dataset": dataset,
            "seed": seed, "world_size": 1,
            "dense": {"top1": 0.93, "params": 853018, "macs": 125485696},
            "pruned": {"top1": 0.5, "params": 250954, "macs": 34921000, "speedup": speedup,
                       "jsv_mean": 1.0},
            "final": {"top1": 0.92}, "trainability_accuracy": 0.8,
            "setup": {"base_model_sha256": base, "prune_method": label.split()[0],
                      "reinit": "none", "ratios": "[0,0.7,0.7,0.7,0]", "pretrain_epochs": 200,
                      "pretrain_lr_schedule": "0:0.1,100:0.01,150:0.001",
                      "prune_epochs": prune_epochs, "prune_lr_schedule": prune_lr,
                      "retrain_epochs": retrain_epochs, "retrain_lr_schedule": retrain_lr,
                      "total_epochs": total, "total_train_macs": total_macs,
                      "train_samples": 50000, "batch_size": 128}}


def seeds(n=3, **kw):
    return [run(seed=s, **kw) for s in range(n)]


def test_retrain_lr_schedule_differs_is_s31_and_not_fair():
    res = check(seeds(label="l1 lr0.01") + seeds(label="l1 lr0.001", retrain_lr=STEP_001))
    assert res.setup == "S3.1" and not res.fair
    assert f"({STEP_01} vs {STEP_001})" in res.reason
    assert "retrain LR schedules differ" in res.reason and "S3.1" in res.reason


def test_canonical_schedule_equality():
    res = check([run(label="a"), run(label="b", retrain_lr="0:0.010,60:1e-3,90:1E-4")])
    assert res.setup == "S4.2" and res.fair


@pytest.mark.parametrize("a,b,expected", [
    ({}, {}, "S4.2"),  # one-shot pruning on both sides: no prune epochs, no prune schedule
    ({"prune_epochs": 10, "prune_lr": "0.01"}, {"prune_epochs": 20, "prune_lr": "0.01"}, "S3.2"),
    ({"prune_epochs": 10, "prune_lr": "0.01"}, {"prune_epochs": 10, "prune_lr": "0.001"}, "S4.1"),
    ({"prune_epochs": 10, "prune_lr": "0.01"}, {"prune_epochs": 10, "prune_lr": "0:0.01"}, "S4.2"),
])
def test_same_base_and_retrain_recipe(a, b, expected):
    res = check(seeds(label="greg", **a) + seeds(label="tpp", **b))
    assert res.setup == expected and res.fair
    if expected != "S4.2":
        assert f": {expected}" in res.reason


def test_different_base_models_is_s1():
    res = check(seeds(label="l1", base="aaa") + seeds(label="tpp", base="bbb"))
    assert res.setup == "S1" and not res.fair
    assert "base model" in res.reason and "not a fair comparison" in res.reason


def test_base_model_rules_per_seed_and_sets():
    per_seed = [run(label=g, seed=s, base=f"h{s}") for g in ("a", "b") for s in range(3)]
    assert check(per_seed).setup == "S4.2"  # same base for the same seed
    crossed = [run(label="a", seed=s, base=f"h{s}") for s in range(2)] + \
              [run(label="b", seed=s, base=f"h{1 - s}") for s in range(2)]
    assert check(crossed).setup == "S1"  # seed 0 of a and b on different bases
    shared = [run(label="a", seed=s, base="h") for s in range(3)] + \
             [run(label="b", seed=s + 5, base="h") for s in range(3)]
    assert check(shared).setup == "S4.2"  # other seeds, same single base
    extra_base = seeds(label="a", base="h") + [run(label="b", seed=9, base="other")]
    assert check(extra_base).setup == "S1"
    unknown = [run(label="a"), run(label="b", base=None)]
    assert check(unknown).setup == "S1"


def test_different_speedup_or_network_is_not_comparable():
    res = check(seeds(label="a", speedup=2.0) + seeds(label="b", speedup=3.59))
    assert res.setup is None and not res.fair and res.extra == []
    assert "speedups differ (2.00x vs 3.59x)" in res.reason
    res = check([run(label="a"), run(label="b", model="resnet110")])
    assert res.setup is None and "networks differ (resnet56 vs resnet110)" in res.reason
    # within tolerance is the same speedup
    assert check([run(label="a", speedup=2.0), run(label="b", speedup=2.03)]).setup == "S4.2"


def test_compression_rate_when_no_macs():
    r = run()
    r["pruned"].update(speedup=None, macs=None)
    r["dense"]["macs"] = None
    assert speedup_of(r) == pytest.approx(853018 / 250954)


def test_table_of_ratios_is_checked_per_column():
    runs = [run(label=g, seed=s, speedup=sp, retrain_lr=lr)
            for g, lr in (("lr0.01", STEP_01), ("lr0.001", STEP_001))
            for sp in (1.45, 3.59) for s in range(2)]
    res = check(runs)
    assert res.setup == "S3.1" and len(res.details["points"]) == 2


def test_extras_total_epochs_and_macs():
    a = run(label="p30f90", prune_epochs=30, retrain_epochs=90, total_epochs=320, total_macs=1e15)
    b = run(label="p60f60", prune_epochs=60, retrain_epochs=60, total_epochs=320, total_macs=1.005e15)
    res = check([a, b])
    assert res.setup == "S2" and res.extra == ["SX-A", "SX-B"] and not res.fair
    c = copy.deepcopy(b)
    c["setup"].update(total_epochs=330, total_train_macs=1.2e15)
    assert check([a, c]).extra == []
    d = copy.deepcopy(b)
    d["setup"]["total_epochs"] = 300
    assert check([a, d]).extra == ["SX-B"]


def test_single_group_is_checked_against_itself():
    res = check(seeds(label="l1"))
    assert res.setup == "S4.2" and "one group only" in res.reason


def test_empty_is_user_error():
    with pytest.raises(UserError):
        check([])


def test_scratch_budgets():
    b = scratch_budgets(200, 120, 2)
    assert b["scratch_e"] == 320 and b["scratch_b"] == 520 and b["scratch_b_epochs"] == 520
    b = scratch_budgets(200, 120, 3.593)
    assert b["scratch_b"] == pytest.approx(200 * 3.593 + 120) and b["scratch_b_epochs"] == 839
    assert scratch_budgets(200, 90, 2, prune_epochs=30)["scratch_b"] == 550
    with pytest.raises(UserError):
        scratch_budgets(200, 120, 0)


def test_scratch_recipe_uses_k1_and_stretches_the_schedule():
    from distributed_prune.setups import scratch_recipe

    # ResNet56: base trained 200 epochs, retrain 120 at 0:0.01,60:0.001,90:0.0001
    e, s = scratch_recipe("E", base_epochs=200, retrain_epochs=120,
                          retrain_schedule="0:0.01,60:0.001,90:0.0001", speedup=2.0)
    assert e == 320 and s == "0:0.01,160:0.001,240:0.0001"
    # ResNet34 P30F90 at 0.9: K1 = 30, speedup 7.7: 321 epochs, milestones scaled by 321/90
    e, s = scratch_recipe("B", base_epochs=30, retrain_epochs=90, speedup=7.7,
                          retrain_schedule="0:0.1,30:0.01,60:0.001,75:0.0001")
    assert e == pytest.approx(30 * 7.7 + 90)
    f = e / 90
    assert s == f"0:0.1,{round(30 * f)}:0.01,{round(60 * f)}:0.001,{round(75 * f)}:0.0001"
    e, s = scratch_recipe("B", base_epochs=10, retrain_epochs=10, speedup=2.5,
                          retrain_schedule="cosine:0.1:0")
    assert e == 35 and s == "cosine:0.1:0"
    with pytest.raises(UserError, match="pretrain.base_epochs"):
        scratch_recipe("E", base_epochs=None, retrain_epochs=120, retrain_schedule="0.1", speedup=2)
    with pytest.raises(UserError, match="retrain.epochs"):
        scratch_recipe("B", base_epochs=5, retrain_epochs=0, retrain_schedule="0.1", speedup=2)
