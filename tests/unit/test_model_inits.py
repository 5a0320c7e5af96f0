"""models.init_weights re-runs each model's constructor initialization.

Reference: the constructor itself. Seeded identically, re-initialising an already built model must
give the constructor's exact tensors, which holds only if the rule draws the same distributions
on the same layers in the same order as the constructor (torchvision's or the project's own)."""
import warnings

import pytest
import torch

from distributed_prune import models


def _same_as_constructor(build, *, reset, seed=5):
    torch.manual_seed(seed)
    ref = build()
    model = build()  # different draws: the RNG moved on
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a known family must not hit the fallback
        assert models.init_weights(model, reset=reset) is model
    got = model.state_dict()
    assert any(not torch.equal(v, got[k]) for k, v in build().state_dict().items())  # draws differ
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("name", ["mlp_7_relu", "mlp_7_linear", "lenet5", "vgg_tiny"])
def test_default_init_models_redraw_every_layer(name):
    # their constructors keep PyTorch's per-layer defaults: init_weights alone redraws them all
    _same_as_constructor(lambda: models.create(name, num_classes=10), reset=False)


@pytest.mark.parametrize("name, kw", [
    ("resnet20", {}),                                       # project's own (Kaiming convs)
    ("resnet18", {}),                                       # torchvision ResNet family
    ("resnet18", {"zero_init_residual": True}),
    ("mobilenet_v2", {}),
    ("mobilenet_v3_small", {}),
])
def test_constructor_init_is_reproduced(name, kw):
    _same_as_constructor(lambda: models.create(name, num_classes=10, **kw), reset=True)


def test_densenet_rule():
    from torchvision.models import DenseNet

    _same_as_constructor(lambda: DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=8,
                                          num_classes=10), reset=True)


def test_unknown_family_falls_back_with_a_warning():
    model = models.create("squeezenet1_1", num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="model family SqueezeNet") as rec:
        models.init_weights(model)
    assert len(rec) == 1 and "\n" not in str(rec[0].message)
    assert all(not torch.equal(v, before[k]) for k, v in model.state_dict().items() if k.endswith("weight"))


def test_fallback_names_parameters_it_cannot_redraw():
    from torch import nn

    class Tokened(nn.Module):
        def __init__(self):
            super().__init__()
            self.token = nn.Parameter(torch.zeros(3))
            self.fc = nn.Linear(3, 2)

    model = Tokened()
    with pytest.warns(UserWarning, match=r"family Tokened.*1 parameter\(s\) without one keep their "
                                         r"values \(first: token\)"):
        models.init_weights(model, reset=True)
    assert not model.token.any()
