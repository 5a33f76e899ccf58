"""Activation dtypes by name: the one mapping from "float32" / "bfloat16" (specs, CLI, Info) to torch; and the
weight modes: "dense" (matrices materialised in the activation dtype) or "int8" (the release's int8 matrices
kept resident with their bf16 scales, model/int8.py)."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
WEIGHT_MODES = ("dense", "int8")


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got '{name}'") from None


def check_weight_mode(name: str) -> str:
    if name not in WEIGHT_MODES:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_MODES)}, got '{name}'")
    return name


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
