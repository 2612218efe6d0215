"""Keep triton out of a napari process whose OpenGL canvas runs on an LLVM-based Mesa driver.

The crash: ``import triton`` segfaults once Mesa's llvmpipe (software OpenGL: Xvfb, remote
desktops, VMs) has loaded the system ``libLLVM`` for napari's canvas; triton's ``libtriton.so``
bundles its own LLVM and the two collide. Loading triton *before* the canvas is harmless. The
plugin reaches triton only through MSA²Net's ``timm`` import (timm -> torchvision ->
``torch._dynamo`` -> triton) when a dock loads a model, and never uses ``torch.compile``.

So the docks call :func:`block_triton_if_unsafe` right before they load a model: it marks triton
as absent (``sys.modules["triton"] = None``, torch then runs without it) only when importing it
would crash this process, i.e. triton is not loaded yet and an LLVM library is mapped into the
process (Linux ``/proc/self/maps``). Everywhere else (no canvas, a hardware driver without LLVM,
triton already loaded, macOS/Windows, ``GENSEG_ALLOW_TRITON=1``) nothing is touched, so other
plugins keep triton.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["llvm_is_mapped", "block_triton_if_unsafe"]


def llvm_is_mapped(maps: Path = Path("/proc/self/maps")) -> bool:
    """True when a ``libLLVM`` shared library is mapped into this process (Linux; False elsewhere)."""
    try:
        with open(maps, encoding="utf-8", errors="replace") as f:
            return any("libLLVM" in line for line in f)
    except OSError:
        return False


def block_triton_if_unsafe() -> bool:
    """Mark triton as absent when importing it would crash this process; True when it did."""
    if "triton" in sys.modules or os.environ.get("GENSEG_ALLOW_TRITON") == "1":
        return False
    if not llvm_is_mapped():
        return False
    sys.modules["triton"] = None
    return True
