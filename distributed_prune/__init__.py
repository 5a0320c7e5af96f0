"""distributed_prune: fair, fast, large-scale filter pruning.

Subpackages are imported lazily so that ``import distributed_prune`` has no side effects
(no CUDA initialisation, no Triton compilation).
"""
import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "models", "prune", "kernels", "train", "data", "flops", "trainability", "config",
    "pipeline", "rundir", "dist", "checkpoint", "report", "setups", "eval", "bench",
)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
