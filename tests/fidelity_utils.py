"""Closed-form weights and inputs of the fidelity fixtures (``/work/shared/fidelity/README.md``).

Each fixture folder holds ``keys.json`` (every official state-dict entry as ``[key, shape, dtype]``,
sorted by key; the position is ``key_index``) and the official code's output for the weights and
input defined here. Both formulas are evaluated in float64 and cast afterwards, in C order.

    weights: s = sin(0.731 * i + 0.5 * (key_index + 1)),  i = 0 .. n-1
        "...running_var"         -> 1 + 0.5 s^2
        "...running_mean"        -> 0.1 s
        1-D and "...bias"        -> 0.02 s
        0-D or 1-D otherwise     -> 1 + 0.1 s
        otherwise                -> s * sqrt(3 / fan_in),  fan_in = n // shape[0]
        non-float entries        -> 0
    input:   x = sin(0.0123 i) + 0.5 sin(0.00071 i),  i = 0 .. numel-1
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["FIDELITY_DIR", "fixture_dir", "official_state_dict", "formula_weight", "formula_input"]

#: ``/work/shared/fidelity`` seen from the repository root (``/work/main``)
FIDELITY_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "fidelity"

_TORCH_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


def fixture_dir(name: str) -> Path | None:
    """The fixture folder ``name`` (e.g. ``msa2net_paper``), or None when it is not there."""
    path = FIDELITY_DIR / name
    return path if (path / "keys.json").is_file() else None


def formula_weight(key: str, shape, key_index: int) -> np.ndarray:
    """The float64 value of one state-dict entry (see the module docstring)."""
    shape = tuple(int(d) for d in shape)
    n = math.prod(shape)
    i = np.arange(n, dtype=np.float64)
    s = np.sin(0.731 * i + 0.5 * (key_index + 1))
    if key.endswith("running_var"):
        v = 1.0 + 0.5 * s**2
    elif key.endswith("running_mean"):
        v = 0.1 * s
    elif len(shape) == 1 and key.endswith("bias"):
        v = 0.02 * s
    elif len(shape) <= 1:
        v = 1.0 + 0.1 * s
    else:
        fan_in = n // shape[0]
        v = s * math.sqrt(3.0 / fan_in)
    return v.reshape(shape)


def official_state_dict(keys_json_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Rebuild the official-key state dict of a fixture from its ``keys.json``."""
    entries = json.loads(Path(keys_json_path).read_text())
    sd: dict[str, torch.Tensor] = {}
    for key_index, (key, shape, dtype) in enumerate(entries):
        tdtype = _TORCH_DTYPES.get(str(dtype).replace("torch.", ""))
        if tdtype is None:
            raise ValueError(f"{key}: unsupported dtype {dtype!r} in {keys_json_path}")
        if not tdtype.is_floating_point:
            sd[key] = torch.zeros(tuple(shape), dtype=tdtype)
            continue
        value = formula_weight(key, shape, key_index).astype(np.float32)
        sd[key] = torch.from_numpy(np.ascontiguousarray(value)).to(tdtype)
    return sd


def formula_input(shape) -> np.ndarray:
    """The fixture input: float32 array of ``shape`` (C order over the whole array)."""
    shape = tuple(int(d) for d in shape)
    i = np.arange(math.prod(shape), dtype=np.float64)
    x = np.sin(0.0123 * i) + 0.5 * np.sin(0.00071 * i)
    return x.astype(np.float32).reshape(shape)
