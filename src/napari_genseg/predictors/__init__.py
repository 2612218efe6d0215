"""Predictors: one module per kind of model, all behind the ``Predictor`` protocol (``base``).

* ``segmentation.SegmentationPredictor``: deterministic forward -> logits (MSA²Net; MARSeg through
  ``marseg.MarSegPredictor``, its lean inference build);
* ``arseg.ArSegPredictor``: N autoregressive samples, consensus, votes, decodable tokens;
* ``tta.TTAPredictor``: K named test-time views around a segmentation predictor (its uncertainty);
* ``uncertainty``: the per-voxel disagreement every predictor's uncertainty is reported in;
* ``ort``: the runtime choice (``resolve_backend``: torch or ONNX Runtime) and the predictors
  whose model steps are exported ONNX models (``OrtSegmentationPredictor``, ``OrtArSegPredictor``);
* ``ov``: the opt-in OpenVINO backend (``OpenVinoSegmentationPredictor``: the exported model
  compiled by OpenVINO, f32 or native bf16).

Which predictor serves a model family is this package's table ``PREDICTORS`` (family name ->
class), filled here by explicit imports; the model registry (``models/registry.py``) knows
nothing of predictors and the engine knows only the protocol. A new deterministic family adds one
line (``"marseg": SegmentationPredictor``, or a small subclass when its input differs); a family
registered elsewhere (a plugin, the tests' double) calls :func:`register_predictor`.
"""

from __future__ import annotations

import inspect

from .arseg import ArSegPredictor
from .base import Predictor
from .marseg import MarSegPredictor
from .ort import (BACKENDS, ORT_INT8_PREDICTORS, ORT_PREDICTORS, OrtArSegPredictor, OrtInt8SegmentationPredictor,
                  OrtSegmentationPredictor, resolve_backend)
from .ov import OPENVINO_PREDICTORS, OpenVinoSegmentationPredictor
from .segmentation import SegmentationPredictor
from .tta import TTA_VIEWS, TTAPredictor, View, tta_views

__all__ = [
    "Predictor",
    "SegmentationPredictor",
    "ArSegPredictor",
    "MarSegPredictor",
    "OrtSegmentationPredictor",
    "OrtInt8SegmentationPredictor",
    "OrtArSegPredictor",
    "OpenVinoSegmentationPredictor",
    "BACKENDS",
    "resolve_backend",
    "TTAPredictor",
    "TTA_VIEWS",
    "View",
    "tta_views",
    "PREDICTORS",
    "register_predictor",
    "predictor_class",
    "predictor_options",
    "make_predictor",
]

#: model family -> predictor class
PREDICTORS: dict[str, type] = {
    "msa2net": SegmentationPredictor,
    "marseg": MarSegPredictor,
    "arseg": ArSegPredictor,
}


def register_predictor(family: str, cls: type) -> None:
    """Serve ``family`` with ``cls`` (which must have a ``from_checkpoint`` classmethod).

    Raises ``ValueError`` when the family already has a different predictor."""
    if PREDICTORS.get(family, cls) is not cls:
        raise ValueError(f"model family {family!r} already has the predictor {PREDICTORS[family].__name__}")
    if not callable(getattr(cls, "from_checkpoint", None)):
        raise TypeError(f"{cls.__name__} has no from_checkpoint(ckpt, ...) constructor")
    PREDICTORS[family] = cls


def predictor_class(family: str) -> type:
    """The predictor class of a model family. Raises ``KeyError`` when none is registered."""
    try:
        return PREDICTORS[family]
    except KeyError:
        raise KeyError(f"no predictor for model family {family!r} "
                       f"(known: {', '.join(sorted(PREDICTORS))}); see napari_genseg.predictors") from None


def predictor_options(family: str) -> list[str]:
    """The keyword options ``make_predictor`` accepts for ``family`` besides device/precision/grid_mode."""
    sig = inspect.signature(predictor_class(family).from_checkpoint)
    return [n for n, p in sig.parameters.items()
            if p.kind is p.KEYWORD_ONLY and n not in ("device", "precision", "grid_mode")]


def make_predictor(ckpt, device="auto", precision: str = "auto", grid_mode: str | None = None,
                   backend: str = "torch", **options):
    """The predictor of a loaded checkpoint (``models.checkpoints.Checkpoint``), chosen by its family
    and the runtime ``backend`` ("torch", "onnxruntime", "onnxruntime-int8", "openvino" or "auto";
    ``ort.resolve_backend``). With
    ``"auto"``, a model whose ONNX export fails runs in torch after one warning; an explicit
    ``"onnxruntime"`` raises ``export.ExportError`` then, and ``PredictorOptionError`` where ONNX
    Runtime cannot run.

    ``options`` are the family predictor's own (``predictor_options``): e.g. ``return_probs`` for
    segmentation models; ``n_samples``, ``threshold``, ``target_class``, ``seed``, ``top_k``,
    ``temperatures`` for AR-Seg. Raises ``TypeError`` for an option the predictor does not take
    (never silently dropped), ``KeyError`` for a family without a predictor.
    """
    cls = predictor_class(ckpt.family)
    allowed = predictor_options(ckpt.family)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"{cls.__name__} ({ckpt.family}) takes no option {', '.join(unknown)}; "
                        f"its options: {', '.join(allowed) or '(none)'}")
    runtime = resolve_backend(backend, ckpt.family, device, precision)
    if runtime == "openvino":
        return OPENVINO_PREDICTORS[ckpt.family].from_checkpoint(ckpt, device=device, precision=precision,
                                                                grid_mode=grid_mode, **options)
    if runtime == "onnxruntime-int8":
        return ORT_INT8_PREDICTORS[ckpt.family].from_checkpoint(ckpt, device=device, precision=precision,
                                                                grid_mode=grid_mode, **options)
    if runtime == "onnxruntime":
        from ..device import warn_once
        from ..export import ExportError

        try:
            return ORT_PREDICTORS[ckpt.family].from_checkpoint(ckpt, device=device, precision=precision,
                                                               grid_mode=grid_mode, **options)
        except ExportError as exc:
            if backend != "auto":
                raise
            warn_once(f"{ckpt.family} could not run on ONNX Runtime ({exc}): running torch")
    return cls.from_checkpoint(ckpt, device=device, precision=precision, grid_mode=grid_mode, **options)
