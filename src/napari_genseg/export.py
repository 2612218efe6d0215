"""Exported models: ONNX files of the deterministic segmentation families and their cache (no napari,
no Qt).

* :func:`export_onnx`: a model whose ``forward`` maps the normalised input (n, in_chans, S, S) to
  logits (n, K, S, S) -> an ONNX file (opset 17, input ``image``, output ``logits``, dynamic batch
  axis ``batch``), written atomically; checked against torch with ONNX Runtime when it is
  installed.
* :func:`export_checkpoint`: ``genseg export``: NAME.onnx plus NAME.json (classes, input
  contract, config, the checkpoint's SHA-256, opset) in a folder.
* :func:`cached_onnx`: the ONNX file of a loaded checkpoint in the user cache folder, keyed by
  the checkpoint's SHA-256 (exported on first use, atomically, so concurrent runs are safe).

Exported families: ``EXPORTABLE_FAMILIES`` (MSA²Net, MARSeg). AR-Seg (an image encoder, a mask
decoder and an autoregressive segmentor step with a KV cache) is not exported yet.

Exporter: torch's TorchScript-based ``torch.onnx.export(dynamo=False)``, which needs neither
``onnx`` nor ``onnxscript``; running the file needs ``onnxruntime`` (extra ``napari-genseg[onnx]``).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import warnings
from pathlib import Path

import numpy as np

from .errors import InputError

__all__ = [
    "ONNX_OPSET",
    "EXPORT_FORMATS",
    "EXPORTABLE_FAMILIES",
    "ExportError",
    "onnxruntime_available",
    "exportable",
    "export_onnx",
    "export_checkpoint",
    "checkpoint_sha256",
    "cache_dir",
    "cached_onnx",
    "onnx_vs_torch",
]

ONNX_OPSET = 17
EXPORT_FORMATS = ("onnx",)
#: model families whose forward (image -> logits) exports; AR-Seg is not exported yet
EXPORTABLE_FAMILIES = ("msa2net", "marseg")
#: bumped when the export recipe changes, so cached files of an older recipe are not reused
EXPORT_RECIPE = 1
#: largest max |onnx - torch| / std(torch) accepted when an export is checked (the tests ask 1e-4
#: of the tiny configs; big configs accumulate more float32 reordering)
CHECK_TOLERANCE = 1e-3


class ExportError(InputError, ValueError):
    """A model that cannot be exported as asked (family without an exporter, unknown format) or
    an export whose outputs do not match torch's."""


def onnxruntime_available() -> bool:
    """True when ``onnxruntime`` can be imported (the ``napari-genseg[onnx]`` extra)."""
    return importlib.util.find_spec("onnxruntime") is not None


def exportable(family: str) -> bool:
    """True when models of ``family`` export to ONNX (``EXPORTABLE_FAMILIES``)."""
    return family in EXPORTABLE_FAMILIES


def _cpu_fp32(model):
    """The model itself when it is an fp32 CPU module in eval mode, else an fp32 CPU copy."""
    import torch

    params = list(model.parameters()) + list(model.buffers())
    if all(p.device.type == "cpu" and (not p.is_floating_point() or p.dtype == torch.float32) for p in params):
        return model.eval()
    return copy.deepcopy(model).to("cpu", torch.float32).eval()


def onnx_vs_torch(model, onnx_path: str | os.PathLike, x: np.ndarray, threads: int = 1) -> float:
    """max |ONNX Runtime - torch| / std(torch) of the logits for the input ``x`` (n, C, S, S)
    float32. Needs ``onnxruntime``."""
    import onnxruntime as ort
    import torch

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = max(1, threads), 1
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"image": x})[0]
    with torch.inference_mode():
        ref = _cpu_fp32(model)(torch.from_numpy(x)).float().numpy()
    return float(np.abs(got - ref).max() / max(float(ref.std()), 1e-12))


def export_onnx(model, path: str | os.PathLike, in_chans: int, img_size: int, *, opset: int = ONNX_OPSET,
                check: bool = True) -> Path:
    """Export ``model`` (image (n, in_chans, img_size, img_size) -> logits (n, K, img_size,
    img_size)) to the ONNX file ``path``: opset ``opset``, dynamic batch, float32, written
    atomically. With ``check`` and ONNX Runtime installed, the file's logits for a batch of 2
    random images are compared with torch's; raises :class:`ExportError` when
    max |diff| / std > ``CHECK_TOLERANCE`` (the file is then not written)."""
    import torch

    from .io.atomic import atomic_path

    model = _cpu_fp32(model)
    x = torch.randn(2, in_chans, img_size, img_size, generator=torch.Generator().manual_seed(0))
    path = Path(path)
    with atomic_path(path) as tmp:
        with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer notes
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), str(tmp), dynamo=False, opset_version=opset,
                              input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                              do_constant_folding=True)
        if check and onnxruntime_available():
            err = onnx_vs_torch(model, tmp, x.numpy(), threads=torch.get_num_threads())
            if not err <= CHECK_TOLERANCE:
                raise ExportError(f"the ONNX export of {type(model).__name__} differs from torch "
                                  f"(max |diff| = {err:.2e} of the output std)")
    return path


def checkpoint_sha256(ckpt) -> str:
    """SHA-256 (hex) of a loaded checkpoint's weights file; for a checkpoint without a file (built
    in memory), of its config and tensors."""
    from .run_record import file_sha256

    sha = file_sha256(getattr(ckpt, "path", None))
    if sha:
        return sha
    from .models.registry import config_to_dict

    h = hashlib.sha256(json.dumps(config_to_dict(ckpt.config), sort_keys=True, default=str).encode())
    for k, v in sorted(ckpt.model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_dir() -> Path:
    """Where exported models are cached: ``GENSEG_CACHE_DIR``, else the user cache folder
    (``platformdirs.user_cache_dir("napari-genseg")`` when platformdirs is installed, else
    ``~/.cache/napari-genseg``); files go to its ``onnx/`` subfolder."""
    env = os.environ.get("GENSEG_CACHE_DIR")
    if env:
        return Path(env)
    try:
        import platformdirs
    except ImportError:
        return Path.home() / ".cache" / "napari-genseg"
    return Path(platformdirs.user_cache_dir("napari-genseg", appauthor=False))


def _require_exportable(ckpt, fmt: str = "onnx") -> None:
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {fmt!r} (known: {', '.join(EXPORT_FORMATS)})")
    if not exportable(ckpt.family):
        raise ExportError(f"{ckpt.family} models are not exported yet (exported: {', '.join(EXPORTABLE_FAMILIES)})")


def cached_onnx(ckpt) -> Path:
    """The ONNX file of ``ckpt`` (a loaded ``models.checkpoints.Checkpoint``) in the cache folder:
    ``onnx/<family>-<sha256>-opset17-r<recipe>.onnx``; exported (and checked) on first use.
    Raises :class:`ExportError` for a family without an exporter or an export that differs from
    torch."""
    _require_exportable(ckpt)
    sha = checkpoint_sha256(ckpt)
    path = cache_dir() / "onnx" / f"{ckpt.family}-{sha}-opset{ONNX_OPSET}-r{EXPORT_RECIPE}.onnx"
    if not path.is_file():
        export_onnx(ckpt.model, path, getattr(ckpt.config, "in_chans", 1), ckpt.config.img_size)
    return path


def export_checkpoint(ckpt, out_dir: str | os.PathLike, fmt: str = "onnx", name: str | None = None) -> list[Path]:
    """``genseg export``: write ``out_dir/NAME.onnx`` and ``out_dir/NAME.json`` for a loaded
    checkpoint (NAME: ``name``, else the checkpoint file's stem, else its config name). The JSON
    holds what a runtime needs to feed the file: class names, the input normalisation and grid,
    the config, the checkpoint's SHA-256, opset, input/output names and shapes. Raises
    :class:`ExportError` for a family that does not export or an unknown format."""
    import torch

    from .io.atomic import atomic_path
    from .models.registry import config_to_dict

    _require_exportable(ckpt, fmt)
    out_dir = Path(out_dir)
    name = name or (Path(ckpt.path).name.removesuffix(".safetensors") if getattr(ckpt, "path", None) else ckpt.config_name)
    in_chans, size = getattr(ckpt.config, "in_chans", 1), ckpt.config.img_size
    onnx_path = export_onnx(ckpt.model, out_dir / f"{name}.onnx", in_chans, size)
    meta = {
        "format": "napari-genseg-onnx",
        "model": ckpt.family,
        "config_name": ckpt.config_name,
        "config": config_to_dict(ckpt.config),
        "class_names": list(ckpt.class_names),
        "input": ckpt.input,
        "body_region": getattr(ckpt, "body_region", None),
        "checkpoint": str(ckpt.path) if getattr(ckpt, "path", None) else None,
        "checkpoint_sha256": checkpoint_sha256(ckpt),
        "onnx": {"opset": ONNX_OPSET, "recipe": EXPORT_RECIPE, "exporter": f"torch {torch.__version__} (TorchScript)",
                 "inputs": {"image": ["batch", in_chans, size, size]},
                 "outputs": {"logits": ["batch", len(ckpt.class_names), size, size]}},
    }
    json_path = out_dir / f"{name}.json"
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    return [onnx_path, json_path]
