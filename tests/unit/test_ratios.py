import pytest
import torch

from distributed_prune import models, prune
from distributed_prune.errors import UserError
from distributed_prune.prune.ratios import n_pruned, parse


def _table(name, spec, shape=(3, 32, 32), **kw):
    net = models.create(name, num_classes=10)
    return prune.plan(net, spec, example_input=torch.zeros(1, *shape), **kw).layer_ratios


def test_parse_three_formats():
    assert parse("[0,0.7,0.7,0.7,0]").kind == "stages"
    r = parse("[0-5:0.8,6:0]")
    assert r.kind == "ranges" and r.entries == [(0, 5, 0.8), (6, 6, 0.0)]
    g = parse("*layer[1-3]*conv[1-2]:0.6,*layer4*conv[1-2]:0.21")
    assert g.kind == "globs" and g.entries == [("*layer[1-3]*conv[1-2]", 0.6), ("*layer4*conv[1-2]", 0.21)]
    assert parse(0.5).kind == "uniform" and parse([0, 0.5, 0]).kind == "stages"


@pytest.mark.parametrize("bad", ["[0,1.0,0]", "[0,-0.1]", "*conv:1.5", "abc", "[1-x:0.5]", "", "[3-1:0.2]",
                                 "*conv", "[0,,0.5]"])
def test_bad_specs(bad):
    with pytest.raises(UserError, match="prune.ratios"):
        parse(bad)


def test_stage_list_prunes_only_block_inner_convs_resnet56():
    t = _table("resnet56", "[0,0.7,0.7,0.7,0]")
    pruned = {n for n, r in t.items() if r > 0}
    assert pruned == {f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(9)}
    assert all(t[n] == 0.7 for n in pruned)


def test_stage_list_bottleneck_inner_convs_resnet50():
    t = _table("resnet50", "[0,0.6,0.6,0.6,0.21,0]")
    assert t["layer1.0.conv1"] == 0.6 and t["layer1.0.conv2"] == 0.6 and t["layer4.2.conv2"] == 0.21
    assert t["layer1.0.conv3"] == 0 and t["layer1.0.downsample.0"] == 0 and t["conv1"] == 0 and t["fc"] == 0


def test_stage_list_wrong_length_and_chain_model():
    with pytest.raises(UserError, match="needs 5"):
        _table("resnet56", "[0,0.5,0]")
    with pytest.raises(UserError, match="stage"):
        _table("vgg19_c", "[0,0.5,0]")


def test_index_ranges_vgg_and_mlp():
    t = _table("vgg19_c", "[1-15:0.5]")
    vals = list(t.values())
    assert vals[0] == 0 and all(v == 0.5 for v in vals[1:16]) and vals[16] == 0
    t = _table("mlp_7_linear", "[0-5:0.8,6:0]", shape=(64,))
    assert list(t.values()) == [0.8] * 6 + [0.0]
    with pytest.raises(UserError, match="out of range"):
        _table("vgg19_c", "[1-16:0.5,17:0.1]")


def test_globs_later_patterns_win_and_skip():
    t = _table("resnet56", "*layer*.conv1:0.9,*layer3*.conv1:0.5", skip=["layer1.0.conv1"])
    assert t["layer1.1.conv1"] == 0.9 and t["layer3.4.conv1"] == 0.5 and t["layer1.0.conv1"] == 0.0
    with pytest.raises(UserError, match="matches no"):
        _table("resnet56", "*nothing*:0.5")


def test_output_layer_cannot_be_pruned():
    with pytest.raises(UserError, match="output layer"):
        _table("mlp_7_linear", "[6:0.5]", shape=(64,))


def test_option_a_shortcut_coupling_is_refused_by_name():
    with pytest.raises(UserError, match="shortcut"):
        _table("resnet56", "layer1.0.conv2:0.5")


@pytest.mark.parametrize("r,n,expect", [(0.7, 16, 12), (0.3, 10, 3), (0.9, 16, 15), (0.95, 16, 15),
                                        (0.99, 4, 3), (0.0, 8, 0), (0.5, 64, 32), (0.21, 512, 108)])
def test_count_rule(r, n, expect):
    assert n_pruned(r, n) == expect


def test_round_to_keeps_multiple():
    assert 64 - n_pruned(0.7, 64, round_to=8) == 24  # keep 19.2 -> 20 -> 24
    assert (64 - n_pruned(0.3, 64, round_to=16)) % 16 == 0
