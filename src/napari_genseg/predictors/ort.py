"""ONNX Runtime: the runtime choice (``resolve_backend``) and the predictors that run exported
models (``OrtSegmentationPredictor``; ``OrtArSegPredictor``).

Backends: ``"torch"`` (eager PyTorch, every family, every device and precision), ``"onnxruntime"``
(the exported model of ``export.cached_onnx`` on ONNX Runtime's CPU provider in fp32; MSA²Net and
MARSeg whole, AR-Seg's image encoder and mask decoder with its token sampling in torch; extra
``napari-genseg[onnx]``), ``"openvino"`` (opt-in: the same file compiled by OpenVINO, f32 or, with
``--precision bf16`` where the CPU computes it natively, bf16; ``predictors.ov``, extra
``napari-genseg[openvino]``), ``"onnxruntime-int8"`` (an opt-in speed choice for MSA²Net and MARSeg:
the same file with its MatMul/Gemm weights dynamically quantised to int8,
``export.quantize_int8``; masks within 0.005 Dice of fp32 on real CT, not equal) and ``"auto"``: ONNX Runtime when it is installed, the
family exports (``export.EXPORTABLE_FAMILIES``), the device is the CPU and the precision resolves
to fp32 (``device.resolve_precision``); torch otherwise. The two agree within
``export.CHECK_TOLERANCE`` of the logits' std (checked when a model is exported), so ``auto``
gives the same masks up to arg-max ties.

The ORT predictors are the torch predictors with the model steps replaced by ONNX sessions
(``forward``; AR-Seg ``embed`` and ``decode``): preprocessing (``base.model_input``), the return
to the slice grid, the arg-max, sampling and consensus are the same code.
"""

from __future__ import annotations

import numpy as np
import torch

from ..device import resolve_device, resolve_precision, warn_once
from .arseg import ArSegPredictor
from .base import PredictorOptionError, input_contract
from .segmentation import SegmentationPredictor

__all__ = ["BACKENDS", "INT8_FAMILIES", "resolve_backend", "ort_session", "OrtSegmentationPredictor",
           "OrtInt8SegmentationPredictor", "OrtArSegPredictor", "ORT_PREDICTORS", "ORT_INT8_PREDICTORS"]

#: runtime choices of the CLI (``--backend``) and the Segment dock (``"openvino"``: ``predictors.ov``)
BACKENDS = ("auto", "torch", "onnxruntime", "onnxruntime-int8", "openvino")
#: families whose exported model runs int8-quantised (``export.quantize_int8``) with
#: ``"onnxruntime-int8"``: masks within 0.005 Dice of fp32 on real CT (``benchmarks/backends.md``)
INT8_FAMILIES = ("msa2net", "marseg")


def resolve_backend(backend: str, family: str, device="auto", precision: str = "auto") -> str:
    """The runtime ("torch", "onnxruntime", "onnxruntime-int8" or "openvino") that serves a model
    of ``family`` for the requested ``backend`` (see the module docstring; ``"openvino"`` is only
    ever the answer when asked for: ``predictors.ov``).

    Raises :class:`PredictorOptionError` (an InputError) for a name outside ``BACKENDS`` and for
    a backend other than torch asked where it cannot run: its runtime not installed, a family
    that does not export (or has no such path), a device other than the CPU.
    """
    from ..export import EXPORTABLE_FAMILIES, exportable, onnxruntime_available

    if backend not in BACKENDS:
        raise PredictorOptionError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "openvino":  # opt-in, never chosen by "auto" (predictors.ov)
        from .ov import _check_runs

        _check_runs(family, device)
        return "openvino"
    dev = resolve_device(device)
    if backend == "onnxruntime-int8":
        if family not in INT8_FAMILIES:
            raise PredictorOptionError(f"{family} models have no int8 ONNX Runtime path "
                                       f"(int8: {', '.join(INT8_FAMILIES)}); use --backend onnxruntime")
        import importlib.util

        if onnxruntime_available() and importlib.util.find_spec("onnx") is None:
            raise PredictorOptionError("the onnxruntime-int8 backend quantises with the onnx package: "
                                       "pip install 'napari-genseg[onnx]'")
        resolve_backend("onnxruntime", family, device, precision)  # the same needs as fp32 ORT
        return "onnxruntime-int8"
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
            and resolve_precision(precision, dev, warn=False) == "fp32":
        return "onnxruntime"
    return "torch"


def ort_session(path, threads: int | None = None):
    """An ONNX Runtime CPU session of ``path``: ``threads`` intra-op threads (default: torch's
    current count, which ``threads.configure_threads`` set), one inter-op thread, every graph
    optimisation; workers that do not spin while they wait when ``OMP_WAIT_POLICY=PASSIVE``
    (README "Threads")."""
    import onnxruntime as ort

    from ..threads import passive_wait

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads or torch.get_num_threads())
    so.inter_op_num_threads = 1
    so.enable_cpu_mem_arena = False  # activations go back after each batch (issue #12 memory bound)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if passive_wait():
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _fp32_only(precision: str) -> None:
    """Warn once when a precision other than fp32 would run in torch on this CPU (ORT runs fp32)."""
    if resolve_precision(precision, torch.device("cpu")) != "fp32":
        warn_once(f"the onnxruntime backend runs fp32: --precision {precision} is not used "
                  "(choose --backend torch for it, or --backend openvino for bf16)")


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
        self._init_state(None, torch.device("cpu"), "fp32", class_names, normalization, grid, return_probs,
                         in_chans)
        self.onnx_path = str(onnx_path)
        self.session = ort_session(self.onnx_path, threads)
        self.threads = self.session.get_session_options().intra_op_num_threads

    @classmethod
    def from_checkpoint(cls, ckpt, *, device="auto", precision: str = "auto", grid_mode: str | None = None,
                        return_probs: bool = False) -> "OrtSegmentationPredictor":
        """The ORT predictor of a loaded checkpoint: its ONNX file from the cache
        (``export.cached_onnx``, exported on first use). Raises PredictorOptionError where the
        onnxruntime backend cannot run (``resolve_backend``); a precision other than fp32 runs
        fp32 with one warning."""
        from ..export import load_cached

        resolve_backend("onnxruntime", ckpt.family, device, "fp32")
        _fp32_only(precision)
        norm, grid = input_contract(ckpt, grid_mode)
        return load_cached(ckpt, lambda path: cls(path, ckpt.class_names, norm, grid, return_probs,
                                                  in_chans=getattr(ckpt.config, "in_chans", 1)))

    #: slices per ONNX Runtime call: the engine's batch runs as calls of this many slices. One
    #: slice at a time is the fastest per slice on the CPUs measured (its activations, ~25 MB per
    #: 256² slice for the MSA²Net demo, stay in the caches) and holds a quarter of a batch of 4's
    #: activation memory (issue #12 memory bound); ``benchmarks/backends.md``.
    sub_batch = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (n, K, size, size) of the ONNX model for the normalised input (n, C, size, size),
        computed ``sub_batch`` slices per call."""
        image = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        step = max(1, int(self.sub_batch))
        outs = [self.session.run(["logits"], {"image": image[i : i + step]})[0] for i in range(0, len(image), step)]
        return torch.from_numpy(outs[0] if len(outs) == 1 else np.concatenate(outs, 0))

    def release(self) -> None:
        self._x = None


class OrtInt8SegmentationPredictor(OrtSegmentationPredictor):
    """:class:`OrtSegmentationPredictor` on the int8-quantised file of the model
    (``export.cached_onnx(ckpt, quantization="int8")``: MatMul/Gemm weights int8, activations
    quantised per batch; the rest fp32). The ``"onnxruntime-int8"`` backend; ``precision`` is
    ``"int8-dynamic"``. Same protocol and outputs."""

    backend = "onnxruntime-int8"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.precision = "int8-dynamic"

    @classmethod
    def from_checkpoint(cls, ckpt, *, device="auto", precision: str = "auto", grid_mode: str | None = None,
                        return_probs: bool = False) -> "OrtInt8SegmentationPredictor":
        """The int8 ORT predictor of a loaded checkpoint (quantised from the cached export on
        first use). Raises PredictorOptionError where the backend cannot run
        (``resolve_backend``)."""
        from ..export import load_cached

        resolve_backend("onnxruntime-int8", ckpt.family, device, "fp32")
        _fp32_only(precision)
        norm, grid = input_contract(ckpt, grid_mode)
        return load_cached(ckpt, lambda path: cls(path, ckpt.class_names, norm, grid, return_probs,
                                                  in_chans=getattr(ckpt.config, "in_chans", 1)),
                           pieces=(("model", "int8"),))


class OrtArSegPredictor(ArSegPredictor):
    """AR-Seg with its image encoder and mask decoder on ONNX Runtime (CPU, fp32); the
    autoregressive token sampling stays in torch (its segmentor step is not exported).

    Same options, protocol and outputs as :class:`~.arseg.ArSegPredictor`. The decoder session
    serves full-scale decodes (masks, votes, probabilities); partial decodes (``upto_scale`` < K,
    the explorer's coarse-to-fine views) run in torch.
    """

    backend = "onnxruntime"

    def __init__(self, model, class_names, normalization, grid, encoder_path, decoder_path,
                 threads: int | None = None, **options):
        super().__init__(model, class_names, normalization, grid, device="cpu", precision="fp32", **options)
        self.encoder_path, self.decoder_path = str(encoder_path), str(decoder_path)
        self._encoder = ort_session(self.encoder_path, threads)
        self._decoder = ort_session(self.decoder_path, threads)
        self.threads = self._encoder.get_session_options().intra_op_num_threads

    @classmethod
    def from_checkpoint(cls, ckpt, *, device="auto", precision: str = "auto", grid_mode: str | None = None,
                        **options) -> "OrtArSegPredictor":
        """The ORT predictor of a loaded AR-Seg checkpoint (options as ``ArSegPredictor``'s); its
        encoder and decoder files come from the cache (``export.cached_onnx``). Raises
        PredictorOptionError where the onnxruntime backend cannot run; a precision other than fp32
        runs fp32 with one warning."""
        from ..export import load_cached

        resolve_backend("onnxruntime", ckpt.family, device, "fp32")
        _fp32_only(precision)
        norm, grid = input_contract(ckpt, grid_mode)
        return load_cached(ckpt, lambda enc, dec: cls(ckpt.model, ckpt.class_names, norm, grid, enc, dec, **options),
                           pieces=(("image_encoder", None), ("mask_decoder", None)))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        image = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(self._encoder.run(["embedding"], {"image": image})[0])

    def decode(self, tokens: torch.Tensor, upto_scale: int | None = None) -> torch.Tensor:
        if upto_scale is not None and upto_scale < self.num_scales:
            return super().decode(tokens, upto_scale)
        ids = np.ascontiguousarray(tokens.detach().to("cpu", torch.int64).numpy())
        return torch.from_numpy(self._decoder.run(["logits"], {"tokens": ids})[0])


#: model family -> its ONNX Runtime predictor
ORT_PREDICTORS: dict[str, type] = {
    "msa2net": OrtSegmentationPredictor,
    "marseg": OrtSegmentationPredictor,
    "arseg": OrtArSegPredictor,
}
#: model family -> its int8 ONNX Runtime predictor (``"onnxruntime-int8"``)
ORT_INT8_PREDICTORS: dict[str, type] = {f: OrtInt8SegmentationPredictor for f in INT8_FAMILIES}
