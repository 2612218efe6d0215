"""Slice-by-slice inference over a volume (no napari, no Qt).

``run_volume`` is a generator: it yields a :class:`Progress` after every batch (with that batch's
labels, and probabilities when asked) and *returns* a :class:`VolumeResult` (read it from
``StopIteration.value`` or use :func:`run_to_end`). The dock widget drives it inside a napari
``thread_worker``, the CLI with a progress bar, tests directly. Cancelling = stop iterating (or set
the ``cancel`` callable): the run ends cleanly between batches and the partial result is returned.

The engine knows only the ``Predictor`` protocol (``napari_genseg.predictors.base``): per batch
``set_image`` (embed once), ``predict``, and ``release`` at the end. Which predictor a checkpoint
gets is ``napari_genseg.predictors.make_predictor``'s business, never the engine's.
"""

from __future__ import annotations

import ctypes
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generator

import numpy as np

from .predictors.base import Predictor
from .volume import Volume

__all__ = [
    "parse_slices",
    "Progress",
    "VolumeResult",
    "run_volume",
    "run_to_end",
    "trim_heap",
]

#: least seconds between two heap trims during a run (``run_volume``)
TRIM_INTERVAL_S = 1.0
_MALLOC_TRIM = None  # glibc's malloc_trim once looked up; False where there is none


def trim_heap() -> bool:
    """Give the heap memory freed since the last call back to the operating system (glibc's
    ``malloc_trim(0)``, which also releases free pages inside the heap). Returns False where the C
    library has no ``malloc_trim`` (macOS, Windows, musl): nothing is done there.

    Why: the model runtimes (ONNX Runtime without its arena, torch on the CPU) allocate and free
    a batch's activations (~25 MB per 256² slice for the MSA²Net demo) through ``malloc``; glibc
    keeps freed blocks below its (growing) mmap threshold in the heap, where they count in the
    process's RSS (~100 MB after a run at batch 4) beside the whole-volume arrays that come later.
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        _MALLOC_TRIM = False
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(None).malloc_trim
                fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
                _MALLOC_TRIM = fn
            except (OSError, AttributeError):
                pass
    if not _MALLOC_TRIM:
        return False
    _MALLOC_TRIM(0)
    return True


# ----------------------------------------------------------------------------- slices
def parse_slices(slices, n: int, current: int | None = None) -> list[int]:
    """None/"all" -> every slice; "current" -> [current]; int -> [i]; (start, stop) -> range
    (stop exclusive); a string "a:b" or "a-b" (inclusive end for "a-b"); an iterable of ints."""
    if n <= 0:
        raise ValueError("the volume has no slices")
    if slices is None or slices == "all":
        out = list(range(n))
    elif slices == "current":
        if current is None:
            raise ValueError("no current slice given")
        out = [int(current)]
    elif isinstance(slices, (int, np.integer)):
        out = [int(slices)]
    elif isinstance(slices, str):
        s = slices.replace(" ", "")
        if ":" in s:
            a, b = s.split(":", 1)
            out = list(range(int(a or 0), int(b) if b else n))
        elif "-" in s[1:]:
            a, b = s.split("-", 1) if not s.startswith("-") else (s, "")
            out = list(range(int(a), int(b) + 1))
        else:
            out = [int(s)]
    elif isinstance(slices, tuple) and len(slices) == 2:
        out = list(range(int(slices[0]), int(slices[1])))
    else:
        out = [int(i) for i in slices]
    if not out:
        raise ValueError(f"empty slice range {slices!r}")
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise ValueError(f"slice {bad[0]} is outside the volume (0..{n - 1})")
    return out


# ----------------------------------------------------------------------------- the run
@dataclass
class Progress:
    done: int
    total: int
    z: list[int]
    outputs: dict[str, np.ndarray]
    elapsed: float

    @property
    def fraction(self) -> float:
        return self.done / max(self.total, 1)


@dataclass
class VolumeResult:
    labels: np.ndarray  # (Z, H, W) uint8, zeros where not run
    z: list[int]  # slices that were run
    cancelled: bool
    elapsed: float
    probs: np.ndarray | None = None  # (Z, K, H, W) float16 when asked
    extras: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    backend: str = "torch"  # the predictor's runtime ("torch", "onnxruntime")
    #: what the 3-D post-processing did (``postprocessing.PostprocessReport``); None = not run
    postprocessing: Any = None

    @property
    def slices_per_second(self) -> float:
        return len(self.z) / self.elapsed if self.elapsed > 0 else float("nan")


def run_volume(
    predictor: Predictor,
    volume: Volume,
    slices=None,
    batch_size: int = 4,
    current: int | None = None,
    cancel: Callable[[], bool] | None = None,
) -> Generator[Progress, None, VolumeResult]:
    """Run ``predictor`` over the chosen slices of ``volume`` in batches.

    Yields a Progress per batch; returns the VolumeResult (also when cancelled or closed early).
    ``"labels"`` fill ``VolumeResult.labels``; ``"probs"`` (when the predictor returns them, e.g.
    ``SegmentationPredictor(return_probs=True)``) fill ``VolumeResult.probs``; any other output
    lands in ``VolumeResult.extras[name][z]``. ``predictor.release()`` runs at the end, always.
    Raises ``ValueError`` for a bad slice selection or batch size.

    Memory: the heap the batches freed goes back to the OS (:func:`trim_heap`) after a batch at
    most every ``TRIM_INTERVAL_S`` and at the end, so the activations are not held beside the
    volume for the rest of the run and after it (a trim per 1-slice batch cost ~3-10 % of the
    time of the MSA²Net demo on ONNX Runtime).
    """
    if batch_size < 1:
        raise ValueError("batch size must be >= 1")
    zs = parse_slices(slices, volume.shape[0], current)
    labels = np.zeros(volume.shape, dtype=np.uint8)
    probs = None
    extras: dict[str, Any] = {}
    done: list[int] = []
    t0 = time.perf_counter()
    spacing_yx = volume.spacing[1:]
    cancelled = False
    trimmed = t0
    try:
        for start in range(0, len(zs), batch_size):
            if cancel is not None and cancel():
                cancelled = True
                break
            batch = zs[start : start + batch_size]
            predictor.set_image(volume.data[batch], spacing_yx)
            out = predictor.predict()
            labels[batch] = out["labels"]
            if "probs" in out:
                if probs is None:
                    probs = np.zeros((volume.shape[0], out["probs"].shape[1], *volume.shape[1:]), np.float16)
                probs[batch] = out["probs"]
            for k, v in out.items():
                if k not in ("labels", "probs"):
                    extras.setdefault(k, {}).update(dict(zip(batch, v)))
            done.extend(batch)
            if time.perf_counter() - trimmed >= TRIM_INTERVAL_S:
                trim_heap()
                trimmed = time.perf_counter()
            yield Progress(len(done), len(zs), batch, out, time.perf_counter() - t0)
    except GeneratorExit:
        cancelled = True
    finally:
        predictor.release()
        trim_heap()
    result = VolumeResult(
        labels=labels, z=done, cancelled=cancelled or len(done) < len(zs),
        elapsed=time.perf_counter() - t0, probs=probs, extras=extras,
        class_names=list(predictor.class_names), backend=getattr(predictor, "backend", "torch"),
    )
    return result


def run_to_end(gen: Generator[Progress, None, VolumeResult], on_progress=None) -> VolumeResult:
    """Drive a run_volume generator to the end and return its result."""
    while True:
        try:
            p = next(gen)
        except StopIteration as stop:
            return stop.value
        if on_progress is not None:
            on_progress(p)
