"""ONNX Runtime: the runtime choice (``resolve_backend``) and the predictor that runs an exported
segmentation model (``OrtSegmentationPredictor``).

Backends: ``"torch"`` (eager PyTorch, every family, every device and precision), ``"onnxruntime"``
(the exported model of ``export.cached_onnx`` on ONNX Runtime's CPU provider in fp32; MSA²Net and
MARSeg; extra ``napari-genseg[onnx]``) and ``"auto"``: ONNX Runtime when it is installed, the
family exports (``export.EXPORTABLE_FAMILIES``), the device is the CPU and the precision resolves
to fp32 (``device.resolve_precision``); torch otherwise. The two agree within
``export.CHECK_TOLERANCE`` of the logits' std (checked when a model is exported), so ``auto``
gives the same masks up to arg-max ties.

The ORT predictor is a :class:`~.segmentation.SegmentationPredictor` whose ``forward`` runs the
ONNX session: preprocessing (``base.model_input``), the return to the slice grid and the arg-max
are the same code.
"""

from __future__ import annotations

import numpy as np
import torch

from ..device import resolve_device, resolve_precision, warn_once
from .base import PredictorOptionError, input_contract
from .segmentation import SegmentationPredictor

__all__ = ["BACKENDS", "resolve_backend", "OrtSegmentationPredictor"]

#: runtime choices of the CLI (``--backend``) and the Segment dock
BACKENDS = ("auto", "torch", "onnxruntime")


def resolve_backend(backend: str, family: str, device="auto", precision: str = "auto") -> str:
    """The runtime ("torch" or "onnxruntime") that serves a model of ``family`` for the requested
    ``backend`` (see the module docstring).

    Raises :class:`PredictorOptionError` (an InputError) for a name outside ``BACKENDS`` and for
    ``"onnxruntime"`` asked where it cannot run: onnxruntime not installed, a family that does not
    export, a device other than the CPU.
    """
    from ..export import EXPORTABLE_FAMILIES, exportable, onnxruntime_available

    if backend not in BACKENDS:
        raise PredictorOptionError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend == "torch":
        return "torch"
    dev = resolve_device(device)
    if backend == "onnxruntime":
        if not onnxruntime_available():
            raise PredictorOptionError("the onnxruntime backend needs ONNX Runtime: "
                                       "pip install 'napari-genseg[onnx]' (or use --backend torch)")
        if not exportable(family):
            raise PredictorOptionError(f"{family} models are not exported to ONNX yet "
                                       f"(exported: {', '.join(EXPORTABLE_FAMILIES)}); use --backend torch")
        if dev.type != "cpu":
            raise PredictorOptionError(f"the onnxruntime backend runs on the CPU, not {dev}; "
                                       "use --device cpu or --backend torch")
        return "onnxruntime"
    if onnxruntime_available() and exportable(family) and dev.type == "cpu" \
            and resolve_precision(precision, dev) == "fp32":
        return "onnxruntime"
    return "torch"


class OrtSegmentationPredictor(SegmentationPredictor):
    """A segmentation model exported to ONNX, run by ONNX Runtime on the CPU in fp32.

    Same protocol and outputs as :class:`SegmentationPredictor` (``set_image``: (n, H, W) HU +
    spacing (sy, sx) mm; ``predict`` -> ``{"labels": (n, H, W) uint8}``, ``"probs"`` (n, K, H, W)
    float16 with ``return_probs``). ``onnx_path``: a file of ``export.export_onnx`` (input
    ``image``, output ``logits``). ``threads``: ONNX Runtime's intra-op threads (default: torch's
    current count, which ``threads.configure_threads`` set); its workers do not spin while they
    wait when ``OMP_WAIT_POLICY=PASSIVE`` (README "Threads").
    """

    backend = "onnxruntime"

    def __init__(self, onnx_path, class_names, normalization, grid, return_probs: bool = False,
                 in_chans: int = 1, threads: int | None = None):
        import onnxruntime as ort

        from ..threads import passive_wait

        self.device = torch.device("cpu")
        self.precision = "fp32"
        self.model = None
        self.onnx_path = str(onnx_path)
        self.class_names = list(class_names)
        self.norm = normalization
        self.grid = grid
        self.return_probs = return_probs
        self.in_chans = in_chans
        self._x = None
        self._hw = None
        self._spacing = (1.0, 1.0)
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads or torch.get_num_threads())
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if passive_wait():
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(self.onnx_path, so, providers=["CPUExecutionProvider"])
        self.threads = so.intra_op_num_threads

    @classmethod
    def from_checkpoint(cls, ckpt, *, device="auto", precision: str = "auto", grid_mode: str | None = None,
                        return_probs: bool = False) -> "OrtSegmentationPredictor":
        """The ORT predictor of a loaded checkpoint: its ONNX file from the cache
        (``export.cached_onnx``, exported on first use). Raises PredictorOptionError where the
        onnxruntime backend cannot run (``resolve_backend``); a precision other than fp32 runs
        fp32 with one warning."""
        from ..export import cached_onnx

        resolve_backend("onnxruntime", ckpt.family, device, "fp32")
        if precision not in ("auto", "fp32"):
            warn_once(f"the onnxruntime backend runs fp32: --precision {precision} is not used "
                      "(choose --backend torch for it)")
        norm, grid = input_contract(ckpt, grid_mode)
        return cls(cached_onnx(ckpt), ckpt.class_names, norm, grid, return_probs,
                   in_chans=getattr(ckpt.config, "in_chans", 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (n, K, size, size) of the ONNX model for the normalised input (n, C, size, size)."""
        image = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(self.session.run(["logits"], {"image": image})[0])

    def release(self) -> None:
        self._x = None
