"""Every torchvision classifier prunes correctly (cut == masked == hook reference, logits and
input gradients) or refuses with one line naming a layer.

A representative subset runs in CI; the whole zoo is marked ``zoo`` and runs only when asked for
(``pytest -m zoo tests/zoo``). With ``DPRUNE_ZOO_RESULTS=FILE`` set, every zoo check appends its
record (JSON line) to FILE as it finishes, for docs/benchmarks/zoo.md.
"""
import json
import os
import re

import pytest
import torchvision

import zoo_check
from distributed_prune import models, prune
from distributed_prune.errors import UserError

ALL = torchvision.models.list_models(module=torchvision.models)

# one line, naming a layer in quotes (what every refusal must look like)
_NAMED = re.compile(r"'[\w.]+'")


def _check_and_assert(name, spec, px):
    rec = zoo_check.check(name, spec, px)
    if rec["status"] == "refused":
        assert "\n" not in rec["message"] and _NAMED.search(rec["message"]), rec["message"]
    return rec


@pytest.mark.parametrize("name,spec,px", [
    ("resnet18", "0.5", 32),
    ("resnext50_32x4d", "0.5", 32),                 # grouped convs, default rule
    ("resnext50_32x4d", "layer1.0.conv2:0.5", 32),  # grouped conv as root
    ("resnext50_32x4d", "layer1.0.conv1:0.3", 32),  # feeds a grouped conv: rounded to whole positions
    ("regnet_x_400mf", "0.5", 32),
    ("regnet_x_400mf", "*f.b.0:0.5", 32),
    ("mobilenet_v3_small", "0.5", 32),
    ("shufflenet_v2_x0_5", "0.5", 32),              # channel shuffle: branch-inner convs only
    ("googlenet", "0.5", 32),                       # built without auxiliary heads
    ("convnext_tiny", "0.5", 32),                   # layer_scale: skip-listed
])
def test_zoo_subset(name, spec, px):
    rec = _check_and_assert(name, spec, px)
    assert rec["status"] == "ok", rec
    assert rec["groups"] > 0 and rec["pruned_macs"] < rec["dense_macs"]


@pytest.mark.zoo
@pytest.mark.parametrize("name", ALL)
def test_zoo_all(name):
    rec = _check_and_assert(name, "0.5", 64)
    out = os.environ.get("DPRUNE_ZOO_RESULTS")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(rec) + "\n")


def test_grouped_conv_rounding_is_reported():
    """32 groups of 4 channels: 0.3 of 128 asks to keep 89, which no uniform cut gives; the plan
    keeps whole positions (a multiple of 32) and reports what was asked."""
    import torch

    net = models.create("resnext50_32x4d", num_classes=10).eval()
    p = prune.plan(net, "layer1.0.conv1:0.3", example_input=torch.zeros(1, 3, 32, 32))
    (row,) = [r for r in p.table() if r["layer"] == "layer1.0.conv1"]
    assert row["asked_kept"] == 128 - 39 and row["kept"] % 32 == 0 and row["kept"] == 96
    kept = p.groups[0].keep
    # the same in-group positions are kept in every one of the 32 groups of layer1.0.conv2
    pos = {i % 4 for i in kept}
    assert sorted(kept) == sorted(g * 4 + q for g in range(32) for q in pos)


def test_default_rule_skips_and_explicit_spec_refuses():
    import torch

    net = models.create("convnext_tiny", num_classes=10).eval()
    x = torch.zeros(1, 3, 32, 32)
    p = prune.plan(net, "0.5", example_input=x)
    assert "cannot be pruned" in p.skipped["features.1.0.block.0"]  # layer_scale / LayerNorm2d
    assert p.layer_ratios["features.1.0.block.0"] == 0.0
    assert prune.Plan.from_json(p.to_json()) == p
    with pytest.raises(UserError, match=r"'features\.1\.0\.block\.0'"):
        prune.plan(net, "features.1.0.block.0:0.5", example_input=x)


def test_aux_heads_only_when_asked():
    net = models.create("googlenet", num_classes=10)
    assert net.aux1 is None
    assert models.create("googlenet", num_classes=10, aux_logits=True).aux1 is not None
