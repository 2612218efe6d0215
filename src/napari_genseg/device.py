"""Device and numeric precision: one rule for inference and training (no napari, no Qt).

* ``resolve_device``: "auto" = CUDA > MPS > CPU; an unavailable explicit device falls back to the
  CPU with a warning.
* ``resolve_precision``: "auto" = fp32 on the CPU (the same masks on every machine, whatever its
  SIMD units), bf16 autocast on CUDA GPUs that support it (fp16 otherwise), fp16 on MPS. "fp16"
  asked on a CPU runs fp32 with one warning (fp16 autocast on CPUs is slow and partial); "bf16"
  on a CPU is an opt-in speed choice, honoured only where the CPU computes bf16 natively
  (``cpu_native_bf16``); elsewhere torch emulates it, many times slower than fp32, so it runs
  fp32 with one warning that says why.
* ``cpu_native_bf16``: run-time detection of native bf16 arithmetic (x86: AVX512_BF16 or AMX-BF16;
  Arm: the BF16 extension), the one answer inference and training use.
* ``autocast_context``: ``torch.autocast`` for bf16/fp16, a null context for fp32.
"""

from __future__ import annotations

import contextlib
import functools
import platform
import subprocess
import warnings

import torch

from .errors import InputError

__all__ = ["DeviceError", "PRECISIONS", "resolve_device", "resolve_precision", "autocast_context", "warn_once",
           "cpu_native_bf16", "cpu_bf16_support"]

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


_X86 = ("x86_64", "amd64", "i386", "i686", "x86")
_ARM = ("aarch64", "arm64", "armv8l", "armv9l")
#: /proc/cpuinfo flags of native bf16 arithmetic (Linux kernel names)
_X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_ARM_BF16_FLAGS = ("bf16",)


def cpu_model_name(path: str = "/proc/cpuinfo") -> str:
    """The CPU's model name as the benchmarks print it: the first ``model name`` line of ``path``
    (Linux), else ``platform.processor()`` / ``platform.machine()``, else ``"unknown CPU"``."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _proc_cpu_flags(path: str = "/proc/cpuinfo") -> set[str] | None:
    """The CPU feature flags of the first processor in ``path`` (x86 ``flags``, Arm ``Features``);
    None where the file does not exist (macOS, Windows) or has no such line."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    return set(value.lower().split())
    except OSError:
        return None
    return None


def _torch_x86_bf16() -> tuple[bool, str] | None:
    """torch's own CPUID check (``torch.cpu._is_avx512_bf16_supported`` / ``_is_amx_tile_supported``,
    private; absent in old torch): None when it cannot tell."""
    import torch.cpu as tcpu

    avx = getattr(tcpu, "_is_avx512_bf16_supported", None)
    amx = getattr(tcpu, "_is_amx_tile_supported", None)
    if avx is None and amx is None:
        return None
    try:
        if avx is not None and avx():
            return True, "AVX512_BF16 by torch's CPUID check"
        if amx is not None and amx():
            return True, "AMX by torch's CPUID check"
    except Exception:  # a private API: never let it break a run
        return None
    return False, "no AVX512_BF16 or AMX-BF16 by torch's CPUID check"


def _macos_arm_bf16() -> bool | None:
    """Apple silicon: ``sysctl hw.optional.arm.FEAT_BF16`` (M2 and later); None when unknown."""
    try:
        out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() == "1" if out.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def cpu_bf16_support() -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively, and what the answer rests on (for messages).

    x86: the ``avx512_bf16`` or ``amx_bf16`` flag of ``/proc/cpuinfo`` (Linux), else torch's
    CPUID check. Arm: the ``bf16`` feature of ``/proc/cpuinfo``, or ``hw.optional.arm.FEAT_BF16``
    on macOS. Any other CPU, or one nothing can be learnt about: False. Cached for the process;
    ``torch.backends.cpu.get_cpu_capability()`` is reported alongside (it names the SIMD level
    torch's kernels use, e.g. "AVX2", not bf16 support).
    """
    import torch

    machine = platform.machine().lower()
    try:
        isa = torch.backends.cpu.get_cpu_capability()
    except Exception:  # old torch
        isa = "unknown"
    flags = _proc_cpu_flags()
    if machine in _X86:
        if flags is not None:
            found = [f for f in _X86_BF16_FLAGS if f in flags]
            if found:
                return True, f"x86 CPU with {'/'.join(found).upper()}; torch kernels: {isa}"
            return False, f"x86 CPU without AVX512_BF16 or AMX-BF16; torch kernels: {isa}"
        told = _torch_x86_bf16()
        if told is not None:
            return told[0], f"x86 CPU, {told[1]}; torch kernels: {isa}"
        return False, f"x86 CPU whose bf16 support cannot be read; torch kernels: {isa}"
    if machine in _ARM:
        if flags is not None:
            if any(f in flags for f in _ARM_BF16_FLAGS):
                return True, f"Arm CPU with the BF16 extension; torch kernels: {isa}"
            return False, f"Arm CPU without the BF16 extension; torch kernels: {isa}"
        mac = _macos_arm_bf16() if platform.system() == "Darwin" else None
        if mac is not None:
            return mac, f"Apple CPU {'with' if mac else 'without'} FEAT_BF16; torch kernels: {isa}"
        return False, f"Arm CPU whose bf16 support cannot be read; torch kernels: {isa}"
    return False, f"{machine or 'unknown'} CPU: no native bf16 known; torch kernels: {isa}"


def cpu_native_bf16() -> bool:
    """True when this CPU computes bf16 natively (``cpu_bf16_support``): where bf16 autocast can be
    faster than fp32. Without it torch emulates bf16 in fp32 units, many times slower."""
    return cpu_bf16_support()[0]


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


def resolve_precision(precision: str, device: torch.device, warn: bool = True) -> str:
    """The precision that runs on ``device`` for the requested one (see the module docstring).

    Returns "fp32", "bf16" or "fp16"; ``warn=False`` only asks (no warning, none used up: a
    later call still warns once). Raises :class:`DeviceError` (a ValueError) for a name outside
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
        if warn:
            warn_once("fp16 was asked on the CPU, where fp16 autocast is slow and partial: running fp32")
        return "fp32"
    if precision == "bf16" and device.type == "cpu" and not (support := cpu_bf16_support())[0]:
        if warn:
            warn_once(f"bf16 was asked on the CPU, but this CPU has no native bf16 arithmetic ({support[1]}); "
                      "emulated bf16 is many times slower than fp32: running fp32")
        return "fp32"
    return precision


def autocast_context(device: torch.device, precision: str):
    """``torch.autocast`` to bf16/fp16 on ``device``; a null context for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
