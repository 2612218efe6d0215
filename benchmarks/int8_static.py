"""Static (calibrated) QDQ int8 against the ``onnxruntime-int8`` backend's dynamic int8 on this
machine: per slice in the engine at batch 1 and 8, labels against torch fp32 and Dice on the
held-out real slices. An experiment for issue #12; the backend itself is not changed by it.

    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/int8_static.py --model msa2net
    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/int8_static.py --model marseg
    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/int8_static.py --paper marseg_paper

``--paper CONFIG``: a registered configuration with random weights (speed only; ~10 min and ~8 GB
of memory for MARSeg's 245 M parameters): the model forward at batch 1, torch fp32 vs ONNX Runtime
fp32, dynamic and static int8 (calibrated on 6 of the demo checkpoint's calibration slices, every
5th), 3 interleaved rounds after a warm-up.

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


def paper(name: str, demo: str, vol, rounds: int = 3) -> None:
    """Forward-only speed of the random-weight configuration ``name`` at batch 1 (see the module
    docstring); the calibration slices come from the demo checkpoint ``demo``'s input contract."""
    import onnxruntime as ort
    import torch

    from napari_genseg.export import export_onnx, quantize_int8
    from napari_genseg.models import registry
    from napari_genseg.models.checkpoints import resolve_model

    torch.manual_seed(0)
    model = registry.create_model(name).eval()
    c = model.config
    calib = calibration_inputs(resolve_model(demo, None), vol)[0][::5]
    assert calib.shape[1:] == (c.in_chans, c.img_size, c.img_size), "the demo's input contract does not fit"
    work = Path(tempfile.mkdtemp(prefix="genseg-int8s-"))
    t = time.perf_counter()
    export_onnx(model, work / "fp32.onnx", c.in_chans, c.img_size, check=False)
    print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters; export "
          f"{time.perf_counter() - t:.0f} s", flush=True)
    t = time.perf_counter()
    quantize_int8(work / "fp32.onnx", work / "dyn.onnx")
    print(f"dynamic int8 {time.perf_counter() - t:.0f} s", flush=True)
    t = time.perf_counter()
    quantize_static_qdq(work / "fp32.onnx", work / "static.onnx", calib)
    print(f"static int8 {time.perf_counter() - t:.0f} s ({len(calib)} calibration slices)", flush=True)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.enable_cpu_mem_arena = 1, 1, False
    x = calib[:1]
    runs = {"torch fp32": lambda: model(torch.from_numpy(x)).numpy()}
    for k, f in (("onnxruntime fp32", "fp32"), ("int8 dynamic", "dyn"), ("int8 static", "static")):
        sess = ort.InferenceSession(str(work / f"{f}.onnx"), so, providers=["CPUExecutionProvider"])
        runs[k] = lambda sess=sess: sess.run(None, {"image": x})[0]
    times, out = {k: [] for k in runs}, {}
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    with torch.inference_mode():
        for r in range(rounds + 1):
            for k, f in runs.items():
                t = time.perf_counter()
                out[k] = f()
                if r:
                    times[k].append(time.perf_counter() - t)
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    ref, base = out["torch fp32"], statistics.median(times["torch fp32"])
    print("| runtime | forward s/slice (median) | best | vs torch | max abs diff / std | arg-max equal to torch |")
    print("|---|---|---|---|---|---|")
    for k in runs:
        med = statistics.median(times[k])
        print(f"| {k} | {med:.3f} | {min(times[k]):.3f} | {base / med:.2f}× | "
              f"{np.abs(out[k] - ref).max() / ref.std():.3f} | {(out[k].argmax(1) == ref.argmax(1)).mean() * 100:.2f} % |")
    for f in work.iterdir():
        f.unlink()
    work.rmdir()


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
    ap.add_argument("--paper", default=None, help="a random-weight config (forward only, batch 1)")
    a = ap.parse_args()

    import onnxruntime as ort
    import torch

    from napari_genseg.engine import parse_slices, run_to_end, run_volume
    from napari_genseg.export import cached_onnx
    from napari_genseg.io import load_volume
    from napari_genseg.training.data import apply_label_map, parse_label_map
    from napari_genseg.models.checkpoints import resolve_model
    from napari_genseg.predictors import make_predictor
    from napari_genseg.predictors.base import input_contract
    from napari_genseg.predictors.ort import OrtSegmentationPredictor

    torch.set_num_threads(1)
    vol = load_volume(a.input)
    if a.paper:
        return paper(a.paper, a.paper.split("_")[0], vol, a.rounds)  # the family's shipped demo
    ckpt = resolve_model(a.model, None)
    zs = parse_slices(a.slices, vol.shape[0])
    assert not set(zs) - set(HELD_OUT_WITH_GAP), "the held-out slices lie inside 9..20"
    ref = apply_label_map(load_volume(a.labels).data, parse_label_map(a.label_map), len(ckpt.class_names))[zs]

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
    del preds
    out.unlink()
    out.parent.rmdir()


if __name__ == "__main__":
    main()
