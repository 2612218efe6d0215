"""Exported models: ONNX files of the deterministic segmentation families and their cache (no napari,
no Qt).

* :func:`export_onnx`: a model whose ``forward`` maps the normalised input (n, in_chans, S, S) to
  logits (n, K, S, S) -> an ONNX file (opset 17, input ``image``, output ``logits``, dynamic batch
  axis ``batch``), written atomically; checked against torch with ONNX Runtime when it is
  installed.
* :func:`export_checkpoint`: ``genseg export``: NAME.onnx (AR-Seg: one file per piece) plus
  NAME.json (classes, input contract, config, the checkpoint's SHA-256, opset) in a folder.
* :func:`cached_onnx`: the ONNX file of a loaded checkpoint (or of one AR-Seg piece) in the user
  cache folder, keyed by the checkpoint's SHA-256 (exported on first use, atomically, so
  concurrent runs are safe).

Exported pieces per family (``onnx_pieces``): MSA²Net and MARSeg the whole model ("model":
image -> logits); AR-Seg its image encoder ("image_encoder": image (n, C, S, S) -> embedding) and
its mask decoder ("mask_decoder": token ids (n, L) int64 -> full-scale mask logits (n, 1, M, M)).
AR-Seg's autoregressive segmentor step (with its KV cache as inputs/outputs) is not exported yet:
its sampling runs in torch.

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
    "onnx_pieces",
    "export_module",
    "export_onnx",
    "export_checkpoint",
    "checkpoint_sha256",
    "cache_dir",
    "cached_onnx",
    "onnx_vs_torch",
]

ONNX_OPSET = 17
EXPORT_FORMATS = ("onnx",)
#: the pieces of each family that export (see the module docstring)
PIECES = {"msa2net": ("model",), "marseg": ("model",), "arseg": ("image_encoder", "mask_decoder")}
#: model families with an ONNX Runtime path (AR-Seg: encoder and decoder; sampling stays in torch)
EXPORTABLE_FAMILIES = tuple(PIECES)
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


def onnx_pieces(family: str) -> tuple[str, ...]:
    """The exported pieces of ``family`` ("model"; AR-Seg "image_encoder", "mask_decoder"); empty
    for a family that does not export."""
    return PIECES.get(family, ())


def _arseg_piece(model, piece: str):
    """An AR-Seg piece as a module of one input: "image_encoder" (``ArSeg.embed``) or
    "mask_decoder" (``vq.decode_tokens`` of all scales)."""
    import torch

    class Embed(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, image):  # (n, in_chans, S, S) -> (n, embed_dim, h, w)
            return self.m.embed(image)

    class Decode(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, tokens):  # (n, L) int64 -> (n, 1, mask_size, mask_size)
            return self.m.vq.decode_tokens(tokens, None)

    return (Embed if piece == "image_encoder" else Decode)(model).eval()


def _piece(ckpt, piece: str):
    """(module, example input, input name, output name) of one exported piece of ``ckpt``."""
    import torch

    cfg, g = ckpt.config, torch.Generator().manual_seed(0)
    if piece == "model":
        c = getattr(cfg, "in_chans", 1)
        return ckpt.model, torch.randn(2, c, cfg.img_size, cfg.img_size, generator=g), "image", "logits"
    model = _cpu_fp32(ckpt.model)
    if piece == "image_encoder":
        x = torch.rand(2, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g)
        return _arseg_piece(model, piece), x, "image", "embedding"
    if piece == "mask_decoder":
        ids = torch.randint(0, cfg.vocab_size, (2, model.num_tokens), generator=g)
        return _arseg_piece(model, piece), ids, "tokens", "logits"
    raise ExportError(f"{ckpt.family} has no exported piece {piece!r} (pieces: {', '.join(onnx_pieces(ckpt.family))})")


def _cpu_fp32(model):
    """The model itself when it is an fp32 CPU module in eval mode, else an fp32 CPU copy."""
    import torch

    params = list(model.parameters()) + list(model.buffers())
    if all(p.device.type == "cpu" and (not p.is_floating_point() or p.dtype == torch.float32) for p in params):
        return model.eval()
    return copy.deepcopy(model).to("cpu", torch.float32).eval()


def onnx_vs_torch(model, onnx_path: str | os.PathLike, x: np.ndarray, threads: int = 1,
                  input_name: str = "image") -> float:
    """max |ONNX Runtime - torch| / std(torch) of the output for the input ``x`` (the file's one
    input, e.g. (n, C, S, S) float32). Needs ``onnxruntime``."""
    import onnxruntime as ort
    import torch

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = max(1, threads), 1
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    got = sess.run(None, {input_name: x})[0]
    with torch.inference_mode():
        ref = _cpu_fp32(model)(torch.from_numpy(x)).float().numpy()
    return float(np.abs(got - ref).max() / max(float(ref.std()), 1e-12))


def export_module(module, path: str | os.PathLike, example, input_name: str = "image",
                  output_name: str = "logits", *, opset: int = ONNX_OPSET, check: bool = True) -> Path:
    """Export ``module`` (one input -> one output, leading batch axis) to the ONNX file ``path``:
    opset ``opset``, the batch axis dynamic ("batch"), written atomically. ``example``: an input
    tensor with batch 2 (float32 images or int64 token ids). With ``check`` and ONNX Runtime
    installed, the file's output for ``example`` is compared with torch's; raises
    :class:`ExportError` when max |diff| / std > ``CHECK_TOLERANCE`` (nothing is written then)."""
    import torch

    module = _cpu_fp32(module)
    path = Path(path)
    from .io.atomic import atomic_path

    with atomic_path(path) as tmp:
        with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer notes
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), str(tmp), dynamo=False, opset_version=opset,
                              input_names=[input_name], output_names=[output_name],
                              dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
                              do_constant_folding=True)
        if check and onnxruntime_available():
            err = onnx_vs_torch(module, tmp, example.numpy(), torch.get_num_threads(), input_name)
            if not err <= CHECK_TOLERANCE:
                raise ExportError(f"the ONNX export of {type(module).__name__} differs from torch "
                                  f"(max |diff| = {err:.2e} of the output std)")
    return path


def export_onnx(model, path: str | os.PathLike, in_chans: int, img_size: int, *, opset: int = ONNX_OPSET,
                check: bool = True) -> Path:
    """Export a segmentation ``model`` (image (n, in_chans, img_size, img_size) -> logits (n, K,
    img_size, img_size)) to the ONNX file ``path`` (input ``image``, output ``logits``; see
    :func:`export_module` for the batch axis, the check and :class:`ExportError`)."""
    import torch

    x = torch.randn(2, in_chans, img_size, img_size, generator=torch.Generator().manual_seed(0))
    return export_module(model, path, x, "image", "logits", opset=opset, check=check)


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


def _export_piece(ckpt, piece: str, path: Path) -> Path:
    if piece == "model":
        return export_onnx(ckpt.model, path, getattr(ckpt.config, "in_chans", 1), ckpt.config.img_size)
    module, example, i, o = _piece(ckpt, piece)
    return export_module(module, path, example, i, o)


def _require_exportable(ckpt, fmt: str = "onnx") -> None:
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {fmt!r} (known: {', '.join(EXPORT_FORMATS)})")
    if not exportable(ckpt.family):
        raise ExportError(f"{ckpt.family} models are not exported yet (exported: {', '.join(EXPORTABLE_FAMILIES)})")


def cached_onnx(ckpt, piece: str = "model") -> Path:
    """The ONNX file of ``ckpt`` (a loaded ``models.checkpoints.Checkpoint``), or of one of its
    pieces (``onnx_pieces``), in the cache folder:
    ``onnx/<family>-<sha256>-<piece>-opset17-r<recipe>.onnx``; exported (and checked) on first
    use. Raises :class:`ExportError` for a family or piece without an exporter or an export that
    differs from torch."""
    _require_exportable(ckpt)
    if piece not in onnx_pieces(ckpt.family):
        raise ExportError(f"{ckpt.family} has no exported piece {piece!r} "
                          f"(pieces: {', '.join(onnx_pieces(ckpt.family))})")
    sha = checkpoint_sha256(ckpt)
    path = cache_dir() / "onnx" / f"{ckpt.family}-{sha}-{piece}-opset{ONNX_OPSET}-r{EXPORT_RECIPE}.onnx"
    if not path.is_file():
        _export_piece(ckpt, piece, path)
    return path


def export_checkpoint(ckpt, out_dir: str | os.PathLike, fmt: str = "onnx", name: str | None = None) -> list[Path]:
    """``genseg export``: write ``out_dir/NAME.onnx`` (AR-Seg: ``NAME.image_encoder.onnx`` and
    ``NAME.mask_decoder.onnx``) and ``out_dir/NAME.json`` for a loaded checkpoint (NAME:
    ``name``, else the checkpoint file's stem, else its config name). The JSON holds what a
    runtime needs to feed the files: class names, the input normalisation and grid, the config,
    the checkpoint's SHA-256, opset, each file's input/output names and shapes. Returns the paths
    written. Raises :class:`ExportError` for a family that does not export or an unknown format."""
    import torch

    from .io.atomic import atomic_path
    from .models.registry import config_to_dict

    _require_exportable(ckpt, fmt)
    out_dir = Path(out_dir)
    name = name or (Path(ckpt.path).name.removesuffix(".safetensors") if getattr(ckpt, "path", None) else ckpt.config_name)
    in_chans, size = getattr(ckpt.config, "in_chans", 1), ckpt.config.img_size
    files, written = {}, []
    for piece in onnx_pieces(ckpt.family):
        path = out_dir / (f"{name}.onnx" if piece == "model" else f"{name}.{piece}.onnx")
        written.append(_export_piece(ckpt, piece, path))
        files[piece] = {"file": path.name, **_piece_shapes(ckpt, piece)}
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
                 "pieces": files},
    }
    if ckpt.family == "arseg":
        meta["onnx"]["not_exported"] = ("the autoregressive segmentor step with its KV cache: token sampling "
                                        "runs in torch (napari_genseg.models.arseg.sampling)")
    json_path = out_dir / f"{name}.json"
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    return [*written, json_path]


def _piece_shapes(ckpt, piece: str) -> dict:
    """Input and output names and shapes ("batch" = the dynamic axis) of one exported piece."""
    cfg = ckpt.config
    c, s = getattr(cfg, "in_chans", 1), cfg.img_size
    if piece == "model":
        return {"inputs": {"image": ["batch", c, s, s]}, "outputs": {"logits": ["batch", len(ckpt.class_names), s, s]}}
    if piece == "image_encoder":
        g = cfg.embed_grid
        return {"inputs": {"image": ["batch", c, s, s]}, "outputs": {"embedding": ["batch", cfg.embed_dim, g, g]}}
    m = cfg.mask_size
    return {"inputs": {"tokens": ["batch", ckpt.model.num_tokens]}, "outputs": {"logits": ["batch", 1, m, m]}}
