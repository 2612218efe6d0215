"""What ran: the model (checkpoint hash, classes, body region) and the inference settings
(precision, backend, grid) of an output, for its JSON sidecar (``io/sidecar.py``).

No napari, no Qt. The CLI passes ``{"model": model_record(...), "inference": inference_record(...),
"input_checks": ..., "warnings": ..., "postprocessing": ...}`` to ``io.write_mask(record=...)``;
the Segment dock stores the same dict in the result layer's metadata under ``RUN_KEY`` and the
napari writer hands it on.
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

__all__ = ["RUN_KEY", "file_sha256", "model_record", "inference_record", "slice_ranges"]

#: key of the run record in a result layer's metadata (napari)
RUN_KEY = "genseg_run"

_HASHES: dict[tuple, str] = {}


def file_sha256(path: str | os.PathLike | None) -> str | None:
    """SHA-256 (hex) of a file, cached per (path, size, mtime); None when there is no file."""
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        return None
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def model_record(ckpt) -> dict:
    """Family, config name, weights file and its SHA-256 (and of the JSON config), classes and the
    body region of a loaded :class:`~napari_genseg.models.checkpoints.Checkpoint`."""
    path = getattr(ckpt, "path", None)
    return {
        "family": ckpt.family,
        "config_name": ckpt.config_name,
        "checkpoint": str(path) if path else None,
        "checkpoint_sha256": file_sha256(path),
        "config_sha256": file_sha256(Path(path).with_suffix(".json")) if path else None,
        "class_names": list(ckpt.class_names),
        "body_region": getattr(ckpt, "body_region", None),
        "input": ckpt.input,
    }


def inference_record(ckpt, device="auto", precision="auto", grid_mode=None, batch_size=None,
                     slices=None, threads=None, elapsed_s=None, backend: str = "torch",
                     backend_requested: str | None = None) -> dict:
    """Device and precision as resolved by ``device.py`` (the rule every predictor uses), the
    runtime (``backend``: "torch", "onnxruntime", "onnxruntime-int8", "openvino", or "auto" resolved by
    ``predictors.resolve_backend``; recorded as ``backend.name``; ``backend_requested``: what
    the user chose, default ``backend``), versions and thread count, the slice grid
    (``preprocessing.SliceGrid``), batch size, slices run, wall time."""
    import torch

    from .device import resolve_device, resolve_precision
    from .predictors.ort import resolve_backend
    from .preprocessing import SliceGrid

    dev = resolve_device(device)
    grid = SliceGrid.from_meta(ckpt.input, ckpt.config.img_size, grid_mode)
    runtime = resolve_backend(backend, ckpt.family, device, precision) if backend == "auto" else backend
    backend_info = {
        "name": runtime,
        "torch": torch.__version__,
        "device": str(dev),
        "threads": int(threads) if threads else torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    if dev.type == "cuda":
        backend_info["cuda"] = torch.version.cuda
        backend_info["device_name"] = torch.cuda.get_device_name(dev)
    if runtime.startswith("onnxruntime"):
        import onnxruntime

        from .export import ONNX_OPSET

        backend_info.update(onnxruntime=onnxruntime.__version__, onnx_opset=ONNX_OPSET)
    if runtime == "openvino":
        from .export import ONNX_OPSET
        from .predictors.ov import openvino_precision, openvino_version

        backend_info.update(openvino=openvino_version(), onnx_opset=ONNX_OPSET)
        run_precision = openvino_precision(precision, warn=False)
    elif runtime.startswith("onnxruntime"):
        run_precision = "int8-dynamic" if runtime == "onnxruntime-int8" else "fp32"
    else:
        run_precision = resolve_precision(precision, dev)
    return {
        "device_requested": str(device),
        "precision": run_precision,
        "precision_requested": precision,
        "backend_requested": backend_requested or backend,
        "backend": backend_info,
        "grid": {"mode": grid.mode, "size": grid.size,
                 "spacing_mm": list(grid.target_spacing) if grid.target_spacing else None},
        "batch_size": batch_size,
        "slices": slice_ranges(slices) if slices is not None else "all",
        "elapsed_s": round(float(elapsed_s), 3) if elapsed_s is not None else None,
    }


def slice_ranges(zs) -> str:
    """Slice indices as compact ranges: ``[0, 1, 2, 5, 6, 9]`` -> ``"0-2,5-6,9"`` ("" when empty).
    The one format of slice lists in run records, sidecars, splits and clean-up reports."""
    zs = sorted(int(z) for z in zs)
    if not zs:
        return ""
    out, a, b = [], zs[0], zs[0]
    for z in zs[1:]:
        if z == b + 1:
            b = z
            continue
        out.append(f"{a}-{b}" if b > a else f"{a}")
        a = b = z
    out.append(f"{a}-{b}" if b > a else f"{a}")
    return ",".join(out)
