"""Static (calibrated) QDQ int8 against the ``onnxruntime-int8`` backend's dynamic int8 on this
machine: per slice in the engine at batch 1 and 8, labels against torch fp32 and Dice on the
held-out real slices. An experiment for issue #12; the backend itself is not changed by it.

    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/int8_static.py --model msa2net
    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/int8_static.py --model marseg

Static recipe (``onnxruntime.quantization.quantize_static``, QuantFormat.QDQ, per-channel int8
weights, uint8 activations, MinMax calibration; onnxruntime quantization docs): the Conv nodes
except the grouped (depthwise) ones and the first and last Conv, and the MatMul nodes whose second
input is a weight (an initialiser); the MatMul outputs stay float (``OpTypesToExcludeOutputQuantization``,
which ONNX Runtime fuses to ``MatMulIntegerToFloat``); attention's activation x activation MatMuls,
softmax, norms and everything else stay fp32. ``--recipe full`` quantises every Conv and MatMul
(outputs quantised too) for comparison.

Calibration data (deterministic, never the held-out slices): the training slices of the labelled
CT (all but 9..20: the held-out block 11..18 and its 2-slice gaps) and 12 evenly spaced slices of
the training phantom ``make_phantom(0)``, through the checkpoint's own preprocessing
(``predictors.base.model_input``). Rounds alternate the runtimes call by call (the machine may
be shared: the load average is printed before and after); the median round is reported.
Asserts only that no held-out slice is calibrated on.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backends import _dice, isa  # noqa: E402
from precision import cpu_name  # noqa: E402

#: the slices of the labelled CT the demo models hold out, with their 2-slice gaps (models/*.md)
HELD_OUT_WITH_GAP = range(9, 21)


def calibration_inputs(ckpt, vol, phantom_slices: int = 12) -> tuple[np.ndarray, list[int]]:
    """(n, C, S, S) float32 model inputs for calibration and the CT slice indices used (every
    slice outside ``HELD_OUT_WITH_GAP``), then ``phantom_slices`` slices of ``make_phantom(0)``."""
    import torch

    from napari_genseg.phantom import make_phantom
    from napari_genseg.predictors.base import input_contract, model_input

    norm, grid = input_contract(ckpt)
    zs = [z for z in range(vol.shape[0]) if z not in HELD_OUT_WITH_GAP]
    assert not set(zs) & set(HELD_OUT_WITH_GAP)
    ph = make_phantom(0, spacing=(3.0, 2.2, 2.2))
    pz = np.linspace(2, ph.image.shape[0] - 3, phantom_slices).round().astype(int)
    parts = [model_input(vol.data[zs], vol.spacing[1:], grid, norm, torch.device("cpu")),
             model_input(ph.image[pz], ph.spacing[1:], grid, norm, torch.device("cpu"))]
    x = torch.cat(parts).expand(-1, getattr(ckpt.config, "in_chans", 1), -1, -1)
    return np.ascontiguousarray(x.numpy()), zs


def quantize_static_qdq(src, dst, calib: np.ndarray, recipe: str = "weights") -> dict:
    """Static QDQ int8 of the ONNX file ``src`` into ``dst`` (see the module docstring for the
    recipes), calibrated one slice at a time on ``calib`` (n, C, S, S). Returns counts of what
    was quantised."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.i = 0

        def get_next(self):
            if self.i >= len(calib):
                return None
            self.i += 1
            return {"image": calib[self.i - 1 : self.i]}

        def rewind(self):
            self.i = 0

    with tempfile.TemporaryDirectory(prefix="genseg-int8s-") as work:
        pre = str(Path(work) / "pre.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant_pre_process(str(src), pre)
        graph = onnx.load(pre).graph
        inits = {t.name for t in graph.initializer}
        convs = [n for n in graph.node if n.op_type == "Conv"]
        exclude, extra = [], {}
        if recipe == "weights":
            exclude += [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] not in inits]
            exclude += [n.name for n in convs if any(a.name == "group" and a.i > 1 for a in n.attribute)]
            exclude += [convs[0].name, convs[-1].name]
            extra["OpTypesToExcludeOutputQuantization"] = ["MatMul"]
        quantize_static(pre, str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                        nodes_to_exclude=sorted(set(exclude)), extra_options=extra)
    return {"conv": len(convs), "matmul": sum(n.op_type == "MatMul" for n in graph.node), "excluded": len(set(exclude))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="msa2net")
    ap.add_argument("--input", default="../shared/data/real/ct-abdomen/ct_abdomen_small.nii.gz")
    ap.add_argument("--labels", default="../shared/data/real/ct-abdomen/ct_abdomen_small_labels.nii.gz")
    ap.add_argument("--label-map", default="5:1,1:2")
    ap.add_argument("--slices", default="11:19")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--recipe", default="weights", choices=["weights", "full"])
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()

    import onnxruntime as ort
    import torch

    from napari_genseg.engine import parse_slices, run_to_end, run_volume
    from napari_genseg.export import cached_onnx
    from napari_genseg.io import load_volume
    from napari_genseg.models.checkpoints import resolve_model
    from napari_genseg.predictors import make_predictor
    from napari_genseg.predictors.base import input_contract
    from napari_genseg.predictors.ort import OrtSegmentationPredictor

    torch.set_num_threads(1)
    vol = load_volume(a.input)
    ckpt = resolve_model(a.model, None)
    zs = parse_slices(a.slices, vol.shape[0])
    assert not set(zs) - set(HELD_OUT_WITH_GAP), "the held-out slices lie inside 9..20"
    raw = load_volume(a.labels).data
    ref = np.zeros(raw.shape, np.uint8)
    for pair in a.label_map.split(","):
        s, d = (int(v) for v in pair.split(":"))
        ref[raw == s] = d
    ref = ref[zs]

    fp32 = cached_onnx(ckpt)
    calib, cz = calibration_inputs(ckpt, vol)
    assert not set(cz) & set(zs)
    out = Path(tempfile.mkdtemp(prefix="genseg-int8s-")) / "static.onnx"
    t = time.perf_counter()
    counts = quantize_static_qdq(fp32, out, calib, a.recipe)
    print(f"static int8 ({a.recipe}): {time.perf_counter() - t:.1f} s to calibrate on {len(calib)} slices "
          f"(CT {cz[0]}..{cz[-1]} without 9..20, phantom 0); {counts}")
    norm, grid = input_contract(ckpt)
    preds = {
        "torch": make_predictor(ckpt, device="cpu", precision="fp32", backend="torch"),
        "onnxruntime": make_predictor(ckpt, device="cpu", precision="fp32", backend="onnxruntime"),
        "int8-dynamic": make_predictor(ckpt, device="cpu", precision="fp32", backend="onnxruntime-int8"),
        "int8-static": OrtSegmentationPredictor(out, ckpt.class_names, norm, grid,
                                                in_chans=getattr(ckpt.config, "in_chans", 1), threads=1),
    }
    print(f"cpu: {cpu_name()}; ISA: {isa()}; load average before: {os.getloadavg()[0]:.1f}")
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, threads {torch.get_num_threads()}")
    sizes = [int(b) for b in a.batch_sizes.split(",")]
    times = {(b, n): [] for b in preds for n in sizes}
    labels = {}
    for r in range(a.rounds + 1):  # round 0 warms up
        for n in sizes:
            order = list(preds) if r % 2 else list(preds)[::-1]
            for b in order:
                t = time.perf_counter()
                res = run_to_end(run_volume(preds[b], vol, slices=zs, batch_size=n))
                if r:
                    times[(b, n)].append((time.perf_counter() - t) / len(zs))
                    labels[(b, n)] = res.labels[zs]
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    print("\n| runtime | batch | engine s/slice (median) | best | vs torch | vs int8-dynamic | voxels equal to torch | Dice "
          + ", ".join(ckpt.class_names[1:]) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for n in sizes:
        base, dyn = statistics.median(times[("torch", n)]), statistics.median(times[("int8-dynamic", n)])
        for b in preds:
            med, x = statistics.median(times[(b, n)]), labels[(b, n)]
            d = ", ".join(f"{_dice(x, ref, k):.4f}" for k in range(1, len(ckpt.class_names)))
            print(f"| {b} | {n} | {med:.3f} | {min(times[(b, n)]):.3f} | {base / med:.2f}× | {dyn / med:.2f}× | "
                  f"{(x == labels[('torch', n)]).mean() * 100:.3f} % | {d} |")


if __name__ == "__main__":
    main()
