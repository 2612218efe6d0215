"""What a run needs to continue exactly where it stopped: random-number states and the train-state file.

``NAME.train.pt`` (beside ``NAME.safetensors``) holds tensors and plain Python types only, so it is
read back with ``torch.load(weights_only=True)`` (never unpickling objects): step, epoch and the
position inside it, optimizer / scheduler / GradScaler state, history, best score, timings, the
task's own entries, every rank's random-number states (``rng``: torch CPU, CUDA of the training
device, numpy's legacy global generator, Python's ``random``), and the fp32 weights when the
checkpoint itself was written in fp16.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

__all__ = ["capture_rng", "restore_rng", "write_state", "read_state"]


def capture_rng(device: torch.device) -> dict:
    """This process's random-number states as tensors / plain types."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    out = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def restore_rng(state: dict, device: torch.device) -> None:
    """Set the states captured by ``capture_rng`` (a bare tensor = an old file's torch state only)."""
    if isinstance(state, torch.Tensor):
        torch.set_rng_state(state)
        return
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def write_state(path: str | os.PathLike, state: dict) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then an atomic rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def read_state(path: str | os.PathLike) -> dict | None:
    """The train state at ``path`` (``weights_only`` load), or None when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)
