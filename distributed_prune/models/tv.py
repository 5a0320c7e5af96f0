"""Every torchvision classification model, by name, with random init (no download)."""
import functools

from ..errors import UserError


@functools.lru_cache(maxsize=1)
def torchvision_classifiers() -> tuple[str, ...]:
    import torchvision.models as tvm

    return tuple(tvm.list_models(module=tvm))


_AUX_HEADS = ("googlenet", "inception_v3")


def build_torchvision(name, num_classes=1000, **kwargs):
    import torchvision.models as tvm

    if name in _AUX_HEADS:
        # auxiliary classifiers run only in training mode and feed a loss the pipeline does not
        # compute: built only when asked for (model.kwargs aux_logits=true)
        kwargs.setdefault("aux_logits", False)
        if name == "googlenet":
            kwargs.setdefault("init_weights", True)  # torchvision warns when left unset
    try:
        return tvm.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise UserError(f"model.kwargs: torchvision model {name!r} rejected its arguments: {e}") from None
