"""OpenVINO: the opt-in ``"openvino"`` backend (extra ``napari-genseg[openvino]``).

The exported model of ``export.cached_onnx`` (the same ONNX file ONNX Runtime runs), compiled by
OpenVINO for its CPU plugin with a static input of one slice, (1, C, S, S): the engine's batch runs
one slice per call (as ``predictors.ort``), which lets the plugin fold every shape. MSA²Net and
MARSeg (``OPENVINO_FAMILIES``); CPU only.

Precision (the rule of ``napari_genseg.device``): ``auto`` and ``fp32`` compile with the inference
precision hint f32 (OpenVINO's own default on CPUs with AMX or AVX512_BF16 would be bf16);
``--precision bf16`` compiles with the bf16 hint only where the CPU computes bf16 natively
(``device.cpu_native_bf16``) and OpenVINO's CPU plugin lists BF16 among its capabilities;
elsewhere it warns once and runs f32 (``openvino_precision``). ``fp16`` on the CPU runs f32 with
one warning. ``auto`` never picks this backend: in f32 it was not faster than ONNX Runtime on the
CPUs measured; its bf16 is the fastest runtime measured on a CPU with native bf16
(``benchmarks/backends.md``), with masks close to, not equal to, fp32.

Compiled models are cached by OpenVINO (``CACHE_DIR``) in ``export.cache_dir()/openvino``: the
first compile of a model takes seconds, later runs load the blob. Threads: ``threads`` (default
torch's count, which ``threads.configure_threads`` set) inference threads, one stream, latency
hint, no pinning of threads to cores (the machine may be shared; README "Threads").
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch

from ..device import resolve_precision, warn_once
from .base import PredictorOptionError, input_contract
from .segmentation import SegmentationPredictor

__all__ = ["OPENVINO_FAMILIES", "openvino_available", "openvino_version", "openvino_precision",
           "compile_openvino", "OpenVinoSegmentationPredictor", "OPENVINO_PREDICTORS"]

#: families with an OpenVINO path (the whole model exported: image -> logits)
OPENVINO_FAMILIES = ("msa2net", "marseg")
#: OpenVINO's inference precision hint of each precision this backend runs
_HINTS = {"fp32": "f32", "bf16": "bf16"}


def openvino_available() -> bool:
    """True when ``openvino`` can be imported (the ``napari-genseg[openvino]`` extra)."""
    return importlib.util.find_spec("openvino") is not None


def openvino_version() -> str:
    """The installed OpenVINO's version string (``openvino.__version__``)."""
    import openvino

    return str(getattr(openvino, "__version__", "unknown"))


def _plugin_bf16() -> bool:
    """True when OpenVINO's CPU plugin lists BF16 among its optimisation capabilities."""
    import openvino as ov

    try:
        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # a plugin that cannot answer: do not ask it for bf16
        return False


def openvino_precision(precision: str, warn: bool = True) -> str:
    """The precision ("fp32" or "bf16") the openvino backend runs for the requested one: the CPU
    rule of ``device.resolve_precision`` (bf16 only with native bf16, else fp32 with one warning;
    fp16 -> fp32 with one warning), and bf16 also needs OpenVINO's CPU plugin to offer it (else
    fp32 with one warning). ``warn=False`` only asks. Raises ``DeviceError`` for an unknown name."""
    prec = resolve_precision(precision, torch.device("cpu"), warn=warn)
    if prec == "bf16" and not _plugin_bf16():
        if warn:
            warn_once("bf16 was asked with the openvino backend, but OpenVINO's CPU plugin offers no BF16 "
                      "on this CPU: running fp32")
        return "fp32"
    return prec if prec in _HINTS else "fp32"


def compile_openvino(onnx_path, precision: str = "fp32", threads: int | None = None, batch: int = 1,
                     cache: bool = True):
    """The ONNX file ``onnx_path`` (input ``image`` (n, C, S, S)) compiled by OpenVINO for the CPU:
    input shape fixed to ``batch`` slices, inference precision ``precision`` ("fp32" or "bf16";
    no check of the CPU here: ``openvino_precision`` decides), ``threads`` inference threads
    (default torch's count), one stream, latency hint, threads not pinned. ``cache``: compiled
    blobs kept in ``export.cache_dir()/openvino``. Returns an ``openvino.CompiledModel``."""
    import openvino as ov

    from ..export import cache_dir

    if precision not in _HINTS:
        raise ValueError(f"openvino runs fp32 or bf16, not {precision!r}")
    core = ov.Core()
    if cache:
        folder = cache_dir() / "openvino"
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:  # a read-only cache folder: compile every time
            pass
        else:
            core.set_property({"CACHE_DIR": str(folder)})
    model = core.read_model(str(onnx_path))
    dims = list(model.input(0).get_partial_shape())  # (batch, C, S, S): only the batch is dynamic
    model.reshape({model.input(0).get_any_name(): [int(batch), *(int(d.get_length()) for d in dims[1:])]})
    config = {"INFERENCE_PRECISION_HINT": _HINTS[precision], "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()),
              "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False}
    return core.compile_model(model, "CPU", config)


def _check_runs(family: str, device) -> None:
    """PredictorOptionError where the openvino backend cannot run (``ort.resolve_backend``)."""
    from ..device import resolve_device

    if not openvino_available():
        raise PredictorOptionError("the openvino backend needs OpenVINO: pip install 'napari-genseg[openvino]' "
                                   "(or use --backend onnxruntime / torch)")
    if family not in OPENVINO_FAMILIES:
        raise PredictorOptionError(f"{family} models have no OpenVINO path (openvino: {', '.join(OPENVINO_FAMILIES)}); "
                                   "use --backend onnxruntime or torch")
    dev = resolve_device(device)
    if dev.type != "cpu":
        raise PredictorOptionError(f"the openvino backend runs on the CPU, not {dev}; use --device cpu or --backend torch")


class OpenVinoSegmentationPredictor(SegmentationPredictor):
    """A segmentation model exported to ONNX, compiled by OpenVINO for the CPU (f32, or bf16 where
    native and asked; module docstring).

    Same protocol and outputs as :class:`SegmentationPredictor` (``set_image``: (n, H, W) HU +
    spacing (sy, sx) mm; ``predict`` -> ``{"labels": (n, H, W) uint8}``, ``"probs"`` (n, K, H, W)
    float16 with ``return_probs``). ``onnx_path``: a file of ``export.export_onnx`` (input
    ``image``, output ``logits``); ``precision``: "fp32" or "bf16" as resolved by
    ``openvino_precision``; ``threads``: OpenVINO's inference threads (default torch's count).
    """

    backend = "openvino"

    def __init__(self, onnx_path, class_names, normalization, grid, return_probs: bool = False,
                 in_chans: int = 1, threads: int | None = None, precision: str = "fp32"):
        self._init_state(None, torch.device("cpu"), precision, class_names, normalization, grid, return_probs,
                         in_chans)
        self.onnx_path = str(onnx_path)
        self.compiled = compile_openvino(self.onnx_path, precision, threads, batch=1)
        self.threads = int(self.compiled.get_property("INFERENCE_NUM_THREADS"))
        self._request = self.compiled.create_infer_request()

    @classmethod
    def from_checkpoint(cls, ckpt, *, device="auto", precision: str = "auto", grid_mode: str | None = None,
                        return_probs: bool = False) -> "OpenVinoSegmentationPredictor":
        """The OpenVINO predictor of a loaded checkpoint: its ONNX file from the cache
        (``export.cached_onnx``, exported on first use), compiled in the precision
        ``openvino_precision(precision)`` gives (a bf16 that cannot run warns once, runs fp32).
        Raises PredictorOptionError where the backend cannot run (``ort.resolve_backend``)."""
        from ..export import load_cached

        _check_runs(ckpt.family, device)
        prec = openvino_precision(precision)
        norm, grid = input_contract(ckpt, grid_mode)
        return load_cached(ckpt, lambda path: cls(path, ckpt.class_names, norm, grid, return_probs,
                                                  in_chans=getattr(ckpt.config, "in_chans", 1), precision=prec))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (n, K, size, size) float32 of the compiled model for the normalised input
        (n, C, size, size), one slice per call."""
        image = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        out = None
        for i in range(len(image)):
            self._request.infer({0: image[i : i + 1]})
            logits = self._request.get_output_tensor(0).data  # the request's buffer: copied once, here
            if out is None:
                out = np.empty((len(image), *logits.shape[1:]), np.float32)
            out[i] = logits[0]
        return torch.from_numpy(out)

    def release(self) -> None:
        self._x = None


#: model family -> its OpenVINO predictor (``"openvino"``)
OPENVINO_PREDICTORS: dict[str, type] = {f: OpenVinoSegmentationPredictor for f in OPENVINO_FAMILIES}
