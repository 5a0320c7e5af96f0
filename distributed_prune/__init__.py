"""distributed_prune: fair, fast, large-scale filter pruning.

Subpackages are imported lazily so that ``import distributed_prune`` has no side effects
(no CUDA initialisation, no Triton compilation).
"""
import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "models", "prune", "kernels", "train", "data", "flops", "trainability", "config",
    "pipeline", "rundir", "dist", "checkpoint", "report", "setups", "eval", "bench", "export",
)


def load(path, device="cpu"):
    """The pruned model of a run directory or checkpoint file, ready to use::

        net = distributed_prune.load("runs/debug_cpu")   # eval mode, on ``device``

    The architecture is rebuilt from the run's config and replayed from its plan, the weights
    are loaded with ``torch.load(weights_only=True)`` (see :mod:`distributed_prune.export`)."""
    return importlib.import_module(f"{__name__}.export").load(path, device=device)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
