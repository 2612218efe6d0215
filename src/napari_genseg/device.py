"""Device and numeric precision: one rule for inference and training (no napari, no Qt).

* ``resolve_device``: "auto" = CUDA > MPS > CPU; an unavailable explicit device falls back to the
  CPU with a warning.
* ``resolve_precision``: "auto" = fp32 on the CPU (the same masks on every machine, whatever its
  SIMD units), bf16 autocast on CUDA GPUs that support it (fp16 otherwise), fp16 on MPS. "fp16"
  asked on a CPU runs fp32 with one warning (fp16 autocast on CPUs is slow and partial); "bf16"
  on a CPU is honoured as asked (an opt-in speed choice).
* ``autocast_context``: ``torch.autocast`` for bf16/fp16, a null context for fp32.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from .errors import InputError

__all__ = ["DeviceError", "PRECISIONS", "resolve_device", "resolve_precision", "autocast_context", "warn_once"]

#: precision choices of the CLI, the dock widgets and training configs
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

_WARNED: set[str] = set()


class DeviceError(InputError, ValueError):
    """A device or precision name that is not one of the known forms (a user's option)."""


def warn_once(message: str, category: type[Warning] = UserWarning, stacklevel: int = 3) -> None:
    """``warnings.warn`` once per process and message (a batch loop must not repeat it)."""
    if message in _WARNED:
        return
    _WARNED.add(message)
    warnings.warn(message, category, stacklevel=stacklevel)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> cuda > mps > cpu; ``"cuda"``, ``"cuda:1"``, ``"mps"``, ``"cpu"`` as asked.

    An explicit device that is not available falls back to the CPU with a ``UserWarning``.
    Raises :class:`DeviceError` for a malformed device string.
    """
    if isinstance(device, torch.device):
        return device
    device = (device or "auto").lower()
    mps_ok = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_ok:
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        warnings.warn(f"{device} requested but CUDA is not available; using cpu", stacklevel=2)
        return torch.device("cpu")
    if device == "mps" and not mps_ok:
        warnings.warn("mps requested but not available; using cpu", stacklevel=2)
        return torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise DeviceError(f"unknown device {device!r} (auto, cpu, cuda, cuda:N, mps)") from None


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision that runs on ``device`` for the requested one (see the module docstring).

    Returns "fp32", "bf16" or "fp16". Raises :class:`DeviceError` (a ValueError) for a name outside
    ``PRECISIONS``.
    """
    if precision not in PRECISIONS:
        raise DeviceError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if device.type == "mps":
            return "fp16"
        return "fp32"
    if precision == "fp16" and device.type == "cpu":
        warn_once("fp16 was asked on the CPU, where fp16 autocast is slow and partial: running fp32")
        return "fp32"
    return precision


def autocast_context(device: torch.device, precision: str):
    """``torch.autocast`` to bf16/fp16 on ``device``; a null context for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
