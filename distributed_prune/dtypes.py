"""The one table of floating-point dtype names.

``fp32`` / ``bf16`` / ``fp16`` (with the aliases torch prints: ``float32``, ``bfloat16``,
``float16``, ``half``) name a tensor dtype everywhere: benchmark ``--dtype`` options, kernel
tests, FFCV loader output. ``train.amp`` names an autocast mode: ``none`` (fp32, no autocast),
``bf16`` or ``fp16``.
"""
from __future__ import annotations

import torch

from .errors import UserError

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16,
                                  "fp16": torch.float16}
_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16",
            "half": "fp16"}
AMP_MODES = ("none", "bf16", "fp16")


def canonical(name: str | torch.dtype) -> str:
    """``"fp32"``, ``"bf16"`` or ``"fp16"`` for a name, an alias or a torch dtype (ValueError
    for anything else)."""
    if isinstance(name, torch.dtype):
        name = str(name).removeprefix("torch.")
    name = _ALIASES.get(str(name), str(name))
    if name not in DTYPES:
        raise ValueError(name)
    return name


def parse(name: str | torch.dtype, key: str = "dtype") -> torch.dtype:
    """The torch dtype named ``name``; an unknown name is a UserError naming ``key``."""
    try:
        return DTYPES[canonical(name)]
    except ValueError:
        raise UserError(f"{key}: unknown dtype {name!r}; choose one of "
                        f"{', '.join(DTYPES)}") from None


def amp_dtype(amp: str) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` (None for ``none``)."""
    if amp not in AMP_MODES:
        raise UserError(f"train.amp: unknown mode {amp!r}; choose one of {', '.join(AMP_MODES)}")
    return None if amp == "none" else DTYPES[amp]


def amp_mode(name: str | torch.dtype) -> str:
    """The ``train.amp`` mode that computes in dtype ``name`` (``fp32`` -> ``none``)."""
    name = canonical(name)
    return "none" if name == "fp32" else name
