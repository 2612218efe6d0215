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
its mask decoder ("mask_decoder": token ids (n, L) int64 -> full-scale mask logits (n, 1, M, M))
and one step of its autoregressive segmentor with the KV cache as inputs and outputs
("segmentor_step", :func:`export_arseg_step`: the tokens of one scale -> their logits and the
grown cache). The SVD adapter and the prefix pass (conditioning + start token, which fills the
cache) stay in torch (``torch.linalg.eigh`` has no ONNX operator), and so does the token sampling
(``models.arseg.sampling``); the ONNX Runtime predictor does not use the step file yet.

Exporter: torch's TorchScript-based ``torch.onnx.export(dynamo=False)``, which needs neither
``onnx`` nor ``onnxscript``; running the file needs ``onnxruntime`` (extra ``napari-genseg[onnx]``).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np

from .errors import InputError, one_line

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
    "export_arseg_step",
    "ArSegStep",
    "export_checkpoint",
    "checkpoint_sha256",
    "cache_dir",
    "cached_onnx",
    "cached_onnx_path",
    "export_cache_budget",
    "prune_export_cache",
    "load_cached",
    "export_cache_key",
    "quantize_int8",
    "QUANTIZATIONS",
    "onnx_vs_torch",
]

ONNX_OPSET = 17
EXPORT_FORMATS = ("onnx",)
#: the pieces of each family that export (see the module docstring)
PIECES = {"msa2net": ("model",), "marseg": ("model",),
          "arseg": ("image_encoder", "mask_decoder", "segmentor_step")}
#: model families with an ONNX Runtime path (AR-Seg: encoder and decoder; sampling stays in torch)
EXPORTABLE_FAMILIES = tuple(PIECES)
#: bumped when the export recipe changes, so cached files of an older recipe are not reused
EXPORT_RECIPE = 1
#: largest max |onnx - torch| / std(torch) accepted when an export is checked (the tests ask 1e-4
#: of the tiny configs; big configs accumulate more float32 reordering)
CHECK_TOLERANCE = 1e-3
#: quantised variants of an exported model (``cached_onnx(..., quantization=)``)
QUANTIZATIONS = ("int8",)
#: the node types whose weights ``quantize_int8`` stores as int8
INT8_OPS = ("MatMul", "Gemm")


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


class _ConcatCache:
    """The KV-cache object ``NextScaleSegmentor.run`` writes through (``append(layer, k, v)`` ->
    the keys/values of every position so far; ``advance``) over given past tensors: the new
    positions are concatenated to ``past_k[layer]`` (a graph ONNX can hold, unlike the in-place
    writes of ``nn.attention.KVCache``) and the results collected in ``present_k`` / ``present_v``."""

    def __init__(self, past_k, past_v):
        self.past_k, self.past_v = past_k, past_v
        self.present_k: list = []
        self.present_v: list = []

    def append(self, layer: int, k, v):
        import torch

        k = torch.cat([self.past_k[layer], k], dim=2)
        v = torch.cat([self.past_v[layer], v], dim=2)
        self.present_k.append(k)
        self.present_v.append(v)
        return k, v

    def advance(self, t: int) -> None:  # the length is the tensors' own
        pass


def _arseg_step_module():
    import torch

    class ArSegStep(torch.nn.Module):
        """One cached step of AR-Seg's next-scale segmentor (``NextScaleSegmentor``), the module
        :func:`export_arseg_step` exports: the tokens of one scale run through the transformer
        with the keys/values of every earlier position given, as in ``models.arseg.sampling``.

        forward(inputs, class_ids, past_keys, past_values) -> (logits, present_keys, present_values):

        * ``inputs`` (B, T, code_dim) float32: the scale's inputs (``quantizer.next_input`` of the
          cumulative f_hat), T = pn_k² tokens of scale k >= 2;
        * ``class_ids`` (B,) int64: the target class of each row;
        * ``past_keys`` / ``past_values`` (depth, B, heads, P, head_dim) float32: the cache of the
          P earlier positions (P = T_c + 1 after the prefix pass; the scale's first sequence
          position is P, so the position embedding is read from there);
        * ``logits`` (B, T, vocab_size); ``present_*`` (depth, B, heads, P + T, head_dim).

        Uses the segmentor's public pieces only (``class_emb``, ``scale_tokens``, ``run``,
        ``logits``), so it follows their definition. Needs P >= T_c + 1 (a scale step, which sees
        every earlier position: no attention mask; the prefix pass is masked and stays in torch).
        """

        def __init__(self, segmentor):
            super().__init__()
            self.seg = segmentor

        def forward(self, inputs, class_ids, past_keys, past_values):
            seg = self.seg
            past = past_keys.shape[3]  # traced: the position embedding slice follows the cache
            cls = seg.class_emb(class_ids)
            x = seg.scale_tokens(inputs, past - seg.num_cond)
            cache = _ConcatCache(past_keys.unbind(0), past_values.unbind(0))
            # ``start`` (the scale's first position) only selects the attention mask: a scale's
            # tokens see every earlier position and each other, so there is none to trace
            h = seg.run(x, cls, past, cache)
            return (seg.logits(h, cls), torch.stack(cache.present_k, 0), torch.stack(cache.present_v, 0))

    return ArSegStep


def ArSegStep(segmentor):  # noqa: N802 (a class factory: torch is imported lazily)
    """The exported AR-Seg segmentor step around ``segmentor`` (see ``_arseg_step_module``'s class
    docstring for its inputs and outputs)."""
    return _arseg_step_module()(segmentor).eval()


def _arseg_step_example(model, batch: int = 2, scale: int = 2, seed: int = 0):
    """Inputs of one real cached step of ``model`` (an ``ArSeg``): the prefix pass of a random
    embedding fills a torch ``KVCache`` (``scale`` >= 2: the scales before it run too, with random
    tokens), and the inputs of scale ``scale`` (1-based). Returns (inputs, class_ids, past_keys,
    past_values) as tensors."""
    import torch

    from .nn.attention import KVCache

    g = torch.Generator().manual_seed(seed)
    seg, q, cfg = model.segmentor, model.vq.quantizer, model.cfg
    if not 2 <= scale <= len(q.patch_nums):
        raise ExportError(f"scale {scale} has no cached step (2..{len(q.patch_nums)})")
    emb = torch.randn(batch, cfg.embed_dim, cfg.embed_grid, cfg.embed_grid, generator=g)
    cls_ids = torch.randint(0, cfg.num_classes, (batch,), generator=g)
    with torch.inference_mode():
        cond, cls = seg.condition(emb, cls_ids)
        cache = KVCache(seg.depth, seg.seq_len)
        seg.run(seg.prefix_tokens(cond, cls), cls, 0, cache)
        f_hat = emb.new_zeros(batch, q.dim, q.latent_size, q.latent_size)
        for si in range(scale - 1):
            pn = q.patch_nums[si]
            idx = torch.randint(0, cfg.vocab_size, (batch, pn * pn), generator=g)
            f_hat = f_hat + q.scale_vectors(si, idx)
            inputs = q.next_input(si, f_hat)
            if si + 1 < scale - 1:  # the scales before ``scale`` go into the cache
                seg.run(seg.scale_tokens(inputs, q.offsets[si + 1]), cls, seg.num_cond + q.offsets[si + 1], cache)
        n = cache.length
        past_k = torch.stack([k[:, :, :n] for k in cache.k], 0).contiguous()
        past_v = torch.stack([v[:, :, :n] for v in cache.v], 0).contiguous()
    return inputs.clone(), cls_ids, past_k, past_v


def export_arseg_step(model, path: str | os.PathLike, *, opset: int = ONNX_OPSET, check: bool = True) -> Path:
    """Export one cached step of an AR-Seg model's segmentor (:func:`ArSegStep`) to the ONNX file
    ``path``: inputs ``inputs``, ``class_ids``, ``past_keys``, ``past_values``; outputs
    ``logits``, ``present_keys``, ``present_values``; dynamic axes: the batch, the scale's tokens
    and the cache length (so one file serves every scale and any number of samples). Written
    atomically. With ``check`` and ONNX Runtime installed, the file is compared with torch on a
    real step of another scale and batch than the traced one; raises :class:`ExportError` when
    max |diff| / std of the logits or the cache > ``CHECK_TOLERANCE`` (nothing is written then)."""
    import torch

    from .io.atomic import atomic_path

    model = _cpu_fp32(model)
    step = ArSegStep(model.segmentor)
    example = _arseg_step_example(model, batch=2, scale=2)
    names_in = ["inputs", "class_ids", "past_keys", "past_values"]
    names_out = ["logits", "present_keys", "present_values"]
    dyn = {"inputs": {0: "batch", 1: "tokens"}, "class_ids": {0: "batch"},
           "past_keys": {1: "batch", 3: "past"}, "past_values": {1: "batch", 3: "past"},
           "logits": {0: "batch", 1: "tokens"}, "present_keys": {1: "batch", 3: "total"},
           "present_values": {1: "batch", 3: "total"}}
    path = Path(path)
    with atomic_path(path) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(step, example, str(tmp), dynamo=False, opset_version=opset,
                              input_names=names_in, output_names=names_out, dynamic_axes=dyn,
                              do_constant_folding=True)
        if check and onnxruntime_available():
            scale = min(3, len(model.vq.quantizer.patch_nums))
            err = arseg_step_vs_torch(model, tmp, batch=3, scale=scale, threads=torch.get_num_threads())
            if not err <= CHECK_TOLERANCE:
                raise ExportError(f"the ONNX export of the AR-Seg segmentor step differs from torch "
                                  f"(max |diff| = {err:.2e} of the output std)")
    return path


def arseg_step_vs_torch(model, onnx_path, batch: int = 3, scale: int = 3, threads: int = 1, seed: int = 1) -> float:
    """Largest max |ONNX Runtime - torch| / std(torch) over the step's three outputs, on a real
    cached step of ``model`` (scale ``scale`` >= 2, ``batch`` rows; see
    :func:`_arseg_step_example`). Needs ``onnxruntime``."""
    import onnxruntime as ort
    import torch

    x = _arseg_step_example(model, batch=batch, scale=scale, seed=seed)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = max(1, threads), 1
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    got = sess.run(None, dict(zip(["inputs", "class_ids", "past_keys", "past_values"], (t.numpy() for t in x))))
    with torch.inference_mode():
        ref = [t.float().numpy() for t in ArSegStep(_cpu_fp32(model).segmentor)(*x)]
    errs = []
    for a, b in zip(got, ref):
        if a.shape != b.shape:
            raise ExportError(f"the ONNX segmentor step gives shape {a.shape}, torch {b.shape}")
        errs.append(float(np.abs(a - b).max() / max(float(b.std()), 1e-12)))
    return max(errs)


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


def export_cache_key(ckpt) -> str:
    """The key of a checkpoint's cached exports (hex SHA-256): of its weights file's SHA-256
    (:func:`checkpoint_sha256`) and its model config as canonical JSON. The config is part of it
    because settings that leave every weight's shape alone (e.g. attention heads, window sizes)
    change what the same weights compute: an export made under another config is never reused.
    """
    from .models.registry import config_to_dict

    h = hashlib.sha256(checkpoint_sha256(ckpt).encode())
    h.update(json.dumps({"family": ckpt.family, "config": config_to_dict(ckpt.config)},
                        sort_keys=True, default=str).encode())
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
    if piece == "segmentor_step":
        return export_arseg_step(ckpt.model, path)
    module, example, i, o = _piece(ckpt, piece)
    return export_module(module, path, example, i, o)


def _require_exportable(ckpt, fmt: str = "onnx") -> None:
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {fmt!r} (known: {', '.join(EXPORT_FORMATS)})")
    if not exportable(ckpt.family):
        raise ExportError(f"{ckpt.family} models are not exported yet (exported: {', '.join(EXPORTABLE_FAMILIES)})")


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Dynamic int8 quantisation of an exported model (``onnxruntime.quantization``: the
    recommended pre-processing, then ``quantize_dynamic``): the weights of its MatMul and Gemm
    nodes are stored as int8 (per tensor), their activations quantised to uint8 per batch at
    run time; every other node (convolutions, norms, attention softmax) stays fp32. Written
    atomically to ``dst``. Needs ``onnxruntime`` and ``onnx`` (extra ``napari-genseg[onnx]``).

    Why only these: on the MSA²Net demo it takes the forward from 180 to 150 ms per slice on an
    AVX-512 CPU with masks within 0.0003 Dice of fp32 on real CT; quantising the convolutions too
    (``ConvInteger``) made it 3x slower (``benchmarks/backends.md``).
    """
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .io.atomic import atomic_path

    dst = Path(dst)
    with tempfile.TemporaryDirectory(prefix="genseg-int8-") as work, atomic_path(dst) as tmp:
        pre = Path(work) / "pre.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant_pre_process(str(src), str(pre))
            quantize_dynamic(str(pre), str(tmp), weight_type=QuantType.QInt8, per_channel=False,
                             reduce_range=False, op_types_to_quantize=list(INT8_OPS))
    return dst


#: default disk budget of ``cache_dir()/onnx`` (MiB); ``$GENSEG_EXPORT_CACHE_MB`` overrides it
EXPORT_CACHE_MB = 4096


def export_cache_budget() -> int:
    """Bytes the exported-model cache (``cache_dir()/onnx``) may hold: ``$GENSEG_EXPORT_CACHE_MB``
    MiB, else :data:`EXPORT_CACHE_MB` (4 GiB: a MARSeg paper export is ~1 GB in fp32). Raises
    :class:`ExportError` for a value that is not a finite number >= 0."""
    env = os.environ.get("GENSEG_EXPORT_CACHE_MB")
    if env is None or not env.strip():
        return EXPORT_CACHE_MB * 2**20
    try:
        mb = float(env)
    except ValueError:
        raise ExportError(f"GENSEG_EXPORT_CACHE_MB must be a number of MiB, not {env!r}") from None
    if not math.isfinite(mb) or mb < 0:
        raise ExportError(f"GENSEG_EXPORT_CACHE_MB must be a finite number >= 0, not {env!r}")
    return int(mb * 2**20)


def prune_export_cache(keep=(), max_bytes: int | None = None) -> list[Path]:
    """Delete the least recently used ``*.onnx`` files of ``cache_dir()/onnx`` (oldest mtime
    first; :func:`cached_onnx` touches a file on every use) until the folder holds at most
    ``max_bytes`` (default :func:`export_cache_budget`). The files in ``keep`` (those of the run
    asking) are never deleted, even when they alone exceed the budget. So exports of older
    weights, configs or recipes, never read again under their old keys, do not pile up.
    Returns the deleted paths; a file another process removed first is skipped."""
    folder = cache_dir() / "onnx"
    budget = export_cache_budget() if max_bytes is None else int(max_bytes)
    keep = {Path(k).resolve() for k in keep}
    entries = []
    for f in folder.glob("*.onnx") if folder.is_dir() else ():
        try:
            st = f.stat()
        except OSError:
            continue
        entries.append((st.st_mtime, st.st_size, f))
    total = sum(size for _, size, _ in entries)
    removed = []
    for _, size, f in sorted(entries, key=lambda e: e[0]):
        if total <= budget:
            break
        if f.resolve() in keep:
            continue
        try:
            f.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            continue
        total -= size
        removed.append(f)
    return removed


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:  # a read-only cache still serves its files
        pass


def cached_onnx_path(ckpt, piece: str = "model", quantization: str | None = None) -> Path:
    """Where :func:`cached_onnx` keeps that file (it may not exist yet)."""
    name = f"{ckpt.family}-{export_cache_key(ckpt)}-{piece}-opset{ONNX_OPSET}-r{EXPORT_RECIPE}.onnx"
    path = cache_dir() / "onnx" / name
    return path if quantization is None else path.with_name(f"{path.stem}-{quantization}.onnx")


def cached_onnx(ckpt, piece: str = "model", quantization: str | None = None) -> Path:
    """The ONNX file of ``ckpt`` (a loaded ``models.checkpoints.Checkpoint``), or of one of its
    pieces (``onnx_pieces``), in the cache folder:
    ``onnx/<family>-<key>-<piece>-opset17-r<recipe>.onnx`` (``key``: :func:`export_cache_key`, the
    weights and the config); exported (and checked against torch) on first use, the only time
    the torch model is needed (a checkpoint loaded with ``lazy=True`` is built then). Every use
    touches the file; after each new export the cache is pruned to its budget, least recently
    used first (:func:`prune_export_cache`).
    ``quantization="int8"``: its :func:`quantize_int8` file beside it (``...-int8.onnx``, made
    from the fp32 one on first use). Raises :class:`ExportError` for a family or piece
    without an exporter, an unknown quantisation or an export that differs from torch."""
    _require_exportable(ckpt)
    if piece not in onnx_pieces(ckpt.family):
        raise ExportError(f"{ckpt.family} has no exported piece {piece!r} "
                          f"(pieces: {', '.join(onnx_pieces(ckpt.family))})")
    if quantization not in (None, *QUANTIZATIONS):
        raise ExportError(f"unknown quantisation {quantization!r} (known: {', '.join(QUANTIZATIONS)})")
    path = cached_onnx_path(ckpt, piece)
    want = path if quantization is None else cached_onnx_path(ckpt, piece, quantization)
    if want.is_file():
        _touch(want)
        return want
    if not path.is_file():
        _export_piece(ckpt, piece, path)
    else:
        _touch(path)
    if quantization is not None:
        quantize_int8(path, want)
    # the other pieces of this checkpoint stay too (a run opens them together)
    mine = [cached_onnx_path(ckpt, p, q) for p in onnx_pieces(ckpt.family) for q in (None, *QUANTIZATIONS)]
    prune_export_cache(keep=[path, want, *mine])
    return want


def load_cached(ckpt, make, pieces=(("model", None),)):
    """``make(*paths)`` on the cached files of ``pieces`` ((piece, quantization) pairs, as
    :func:`cached_onnx` takes them), e.g. a predictor that opens ONNX Runtime sessions or compiles
    with OpenVINO. A cached file that the runtime cannot load (truncated, corrupted on disk) is
    removed, exported again (one warning) and ``make`` retried once; a second failure raises
    :class:`ExportError` naming the files. Errors that are not about reading a file (TypeError,
    AttributeError, MemoryError: bugs or the machine) propagate unchanged."""
    from .device import warn_once

    for attempt in (1, 2):
        paths = [cached_onnx(ckpt, piece, q) for piece, q in pieces]
        try:
            return make(*paths)
        except (TypeError, AttributeError, NameError, MemoryError):
            raise
        except Exception as exc:  # onnxruntime / openvino raise their own types for unreadable files
            first = one_line(exc)[:200]
            if attempt == 2:
                raise ExportError(f"the runtime cannot load the exported model {paths[0]} even after "
                                  f"exporting it again: {first}") from exc
            warn_once(f"the cached export {paths[0].name} could not be loaded ({first}): exporting it again")
            for p in paths:
                p.unlink(missing_ok=True)


def export_checkpoint(ckpt, out_dir: str | os.PathLike, fmt: str = "onnx", name: str | None = None) -> list[Path]:
    """``genseg export``: write ``out_dir/NAME.onnx`` (AR-Seg: ``NAME.image_encoder.onnx``,
    ``NAME.mask_decoder.onnx`` and ``NAME.segmentor_step.onnx``) and ``out_dir/NAME.json`` for a loaded checkpoint (NAME:
    ``name``, else the checkpoint file's stem, else its config name). The JSON holds what a
    runtime needs to feed the files: class names, the input normalisation and grid, the config,
    the checkpoint's SHA-256, opset, each file's input/output names and shapes. Returns the paths
    written. Raises :class:`ExportError` for a family that does not export, an unknown format,
    or an ``out_dir`` where NAME.json is the checkpoint's own config (its folder: nothing is
    written then)."""
    import torch

    from .io.atomic import atomic_path
    from .models.registry import config_to_dict

    _require_exportable(ckpt, fmt)
    out_dir = Path(out_dir)
    name = name or (Path(ckpt.path).name.removesuffix(".safetensors") if getattr(ckpt, "path", None) else ckpt.config_name)
    json_path = out_dir / f"{name}.json"
    if getattr(ckpt, "path", None):
        from .io.atomic import same_file

        if same_file(json_path, Path(ckpt.path).with_suffix(".json")):
            raise ExportError(f"refusing to overwrite the checkpoint's config {json_path}: "
                              "choose another --out folder")
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
        meta["onnx"]["not_exported"] = ("the SVD adapter and the prefix pass that fills the KV cache "
                                        "(torch.linalg.eigh has no ONNX operator) and the token sampling "
                                        "(napari_genseg.models.arseg.sampling) run in torch")
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
    if piece == "segmentor_step":
        seg = ckpt.model.segmentor
        kv = [seg.depth, "batch", cfg.heads, "past", cfg.width // cfg.heads]
        return {"inputs": {"inputs": ["batch", "tokens", cfg.code_dim], "class_ids": ["batch"],
                           "past_keys": kv, "past_values": kv},
                "outputs": {"logits": ["batch", "tokens", cfg.vocab_size], "present_keys": [*kv[:3], "total", kv[4]],
                            "present_values": [*kv[:3], "total", kv[4]]}}
    m = cfg.mask_size
    return {"inputs": {"tokens": ["batch", ckpt.model.num_tokens]}, "outputs": {"logits": ["batch", 1, m, m]}}
