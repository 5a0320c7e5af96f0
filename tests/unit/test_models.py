import pytest
import torch

from distributed_prune import models
from distributed_prune.errors import UserError


@pytest.mark.parametrize("name,shape,params", [
    ("mlp_7_linear", (64,), None), ("mlp_7_relu", (64,), None), ("lenet5", (1, 8, 8), None),
    ("resnet20", (3, 32, 32), 0.27e6), ("resnet56", (3, 32, 32), 0.85e6), ("resnet110", (3, 32, 32), 1.7e6),
    ("vgg19_c", (3, 32, 32), 20.0e6), ("resnet18", (3, 32, 32), None),
])
def test_create_and_forward(name, shape, params):
    net = models.create(name, num_classes=10)
    assert net(torch.randn(2, *shape)).shape == (2, 10)
    if params:
        n = sum(p.numel() for p in net.parameters())
        assert abs(n - params) / params < 0.03


def test_mlp_structure():
    net = models.create("mlp_7_linear", num_classes=10, in_features=1024)
    lin = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert len(lin) == 7 and lin[0].in_features == 1024 and all(m.out_features == 100 for m in lin[:-1])
    assert not any(isinstance(m, torch.nn.ReLU) for m in net.modules())
    assert any(isinstance(m, torch.nn.ReLU) for m in models.create("mlp_7_relu").modules())


def test_vgg19_c_has_16_convs_and_one_linear():
    net = models.create("vgg19_c", num_classes=100)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 16 and [c.out_channels for c in convs][:3] == [64, 64, 128]
    assert len([m for m in net.modules() if isinstance(m, torch.nn.Linear)]) == 1


def test_cifar_resnet_option_a_has_no_shortcut_params():
    net = models.create("resnet56")
    assert not any("shortcut" in n for n, _ in net.named_parameters())
    assert len([m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]) == 55


def test_registry_lists_own_and_torchvision():
    names = models.list_models()
    for n in ("mlp_7_linear", "resnet56", "vgg19_c", "lenet5", "resnet50", "mobilenet_v2", "densenet121"):
        assert n in names


def test_unknown_model_is_user_error():
    with pytest.raises(UserError, match="nosuchnet"):
        models.create("nosuchnet")


def test_registry_rejects_duplicates():
    with pytest.raises(ValueError):
        models.register("resnet56")(lambda num_classes=10: None)


def test_check_kwargs_follows_the_factory_signature():
    models.check_kwargs("mlp_7_linear", {"width": 50, "in_features": 32})  # both taken
    net = models.create("mlp_7_linear", num_classes=10, width=50)
    assert net.features[1].out_features == 50
    with pytest.raises(UserError, match=r"model\.kwargs: model 'vgg_tiny' takes no argument 'width'"):
        models.check_kwargs("vgg_tiny", {"width": 2})
    with pytest.raises(UserError, match="num_classes"):
        models.check_kwargs("resnet20", {"num_classes": 3})
    # create() refuses the same way instead of a TypeError from the factory call
    with pytest.raises(UserError, match="'foo'"):
        models.create("lenet5", foo=1)
    # torchvision builders take **kwargs: refused when built, still as a UserError naming model.kwargs
    models.check_kwargs("resnet18", {"foo": 1})
    with pytest.raises(UserError, match=r"model\.kwargs"):
        models.create("resnet18", foo=1)
