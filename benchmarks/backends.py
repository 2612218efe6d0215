"""torch fp32 vs ONNX Runtime (fp32, int8) vs OpenVINO on this machine: seconds per slice at batch 1
and 8, label agreement with torch and Dice against reference labels.

    PYTHONPATH=src .venv/bin/python benchmarks/backends.py [--model msa2net] [--threads 1]
        [--batch-sizes 1,8] [--slices 11:19] [--rounds 3] [--label-map 5:1,1:2] [--no-openvino]

Rows: ``torch`` (eager fp32), ``onnxruntime`` (the cached fp32 export, ``export.cached_onnx``),
``onnxruntime-int8`` (its MatMul/Gemm weights dynamically quantised, ``export.quantize_int8``; the
families of ``predictors.ort.INT8_FAMILIES``, needs ``onnx``) through the engine (``run_volume``
with ``make_predictor(backend=...)``: the shared preprocessing and the return to the slice grid
are in these numbers), and a second table of the model forward alone on the prepared model input,
with ``openvino`` (``predictors.ov``: the same ONNX file compiled by OpenVINO for one slice per call,
``--backend openvino``; ``openvino`` installed) in f32 and, where the CPU computes bf16 natively,
``openvino-bf16`` (``--precision bf16``) in both tables.
Rounds alternate the runtimes call by call (the machine may be shared: the load average is
printed before and after); the median round is reported, the best one alongside.

Labels: the fraction of voxels equal to torch's, and the per-class Dice against the reference
labels (``--labels``, ids mapped by ``--label-map``) over the slices run: the 0.005-Dice rule for
int8 (issue #12) is read off the last column. AR-Seg (``--model arseg``): ONNX Runtime runs its
image encoder and mask decoder, the sampling stays in torch; no forward-only table. Asserts nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from precision import cpu_name  # noqa: E402


def _dice(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Dice of class ``k`` between two label arrays (``metrics.dice``; NaN when both lack it)."""
    from napari_genseg.metrics import dice

    return dice(a == k, b == k, empty_value=float("nan"))


def isa() -> str:
    """The vector extensions that matter for these kernels (``/proc/cpuinfo`` flags)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(ln for ln in f if ln.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return "unknown"
    keep = ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx_vnni"]
    return " ".join(k for k in keep if k in flags) or "no AVX2"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="msa2net", help="family (its shipped demo checkpoint) or config name")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--input", default="../shared/data/real/ct-abdomen/ct_abdomen_small.nii.gz")
    ap.add_argument("--labels", default="../shared/data/real/ct-abdomen/ct_abdomen_small_labels.nii.gz")
    ap.add_argument("--label-map", default="5:1,1:2", help="reference id -> model class (the demo's training map)")
    ap.add_argument("--slices", default="11:19", help="'a:b' slices of the CT (b exclusive); 11:19 = held out")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-openvino", dest="openvino", action="store_false")
    a = ap.parse_args()

    import onnxruntime as ort
    import torch

    from napari_genseg.engine import parse_slices, run_to_end, run_volume
    from napari_genseg.export import cached_onnx, onnx_pieces
    from napari_genseg.io import load_volume
    from napari_genseg.training.data import apply_label_map, parse_label_map
    from napari_genseg.models.checkpoints import resolve_model
    from napari_genseg.predictors import make_predictor
    from napari_genseg.predictors.ort import INT8_FAMILIES
    from napari_genseg.predictors.ov import OPENVINO_FAMILIES, openvino_available, openvino_precision, openvino_version
    from napari_genseg.threads import passive_wait

    torch.set_num_threads(a.threads)
    vol = load_volume(a.input)
    ckpt = resolve_model(a.model, a.checkpoint)
    zs = parse_slices(a.slices, vol.shape[0])
    ref = None
    if a.labels and Path(a.labels).is_file():
        ref = apply_label_map(load_volume(a.labels).data, parse_label_map(a.label_map), len(ckpt.class_names))[zs]
    t = time.perf_counter()
    path = [cached_onnx(ckpt, piece) for piece in onnx_pieces(ckpt.family)][-1]
    backends = ["torch", "onnxruntime"]
    if ckpt.family in INT8_FAMILIES and importlib.util.find_spec("onnx") is not None:
        cached_onnx(ckpt, quantization="int8")
        backends.append("onnxruntime-int8")
    # row name -> (backend, precision) of make_predictor
    how = {b: (b, "fp32") for b in backends}
    if a.openvino and openvino_available() and ckpt.family in OPENVINO_FAMILIES:
        how["openvino"] = ("openvino", "fp32")
        if openvino_precision("bf16", warn=False) == "bf16":  # native bf16 only (the precision rule)
            how["openvino-bf16"] = ("openvino", "bf16")
        backends = list(how)
    print(f"cpu: {cpu_name()}; ISA: {isa()}; load average before: {os.getloadavg()[0]:.1f}")
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, threads {torch.get_num_threads()} "
          f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, ORT spinning "
          f"{'off' if passive_wait() else 'on'}), model {ckpt.config_name}, {len(zs)} slices "
          f"{zs[0]}..{zs[-1]} of {vol.shape} (z, y, x)")
    print(f"ONNX file {path} ({path.stat().st_size / 1e6:.1f} MB; export, quantisation or cache lookup "
          f"{time.perf_counter() - t:.1f} s)")

    sizes = [int(b) for b in a.batch_sizes.split(",")]
    if "openvino" in how:
        print(f"openvino {openvino_version()}")
    preds = {}
    for b in backends:
        t = time.perf_counter()
        preds[b] = make_predictor(ckpt, device="cpu", precision=how[b][1], backend=how[b][0])
        print(f"predictor {b} ({preds[b].backend}, {preds[b].precision}): {time.perf_counter() - t:.1f} s to make")
    fwd_runs = {}
    if hasattr(preds["torch"], "forward"):  # segmentation models: the forward alone
        for b in backends:
            fwd_runs[b] = (lambda x, p=preds[b]: p.forward(torch.from_numpy(x)).float().numpy())
    engine: dict[tuple, list[float]] = {(b, n): [] for n in sizes for b in backends}
    fwd: dict[tuple, list[float]] = {(b, n): [] for n in sizes for b in fwd_runs}
    labels: dict[tuple, np.ndarray] = {}
    fwd_labels: dict[tuple, np.ndarray] = {}
    x_all = None
    if fwd_runs:
        preds["torch"].set_image(vol.data[zs], vol.spacing[1:])
        x_all = preds["torch"]._x.contiguous().numpy().copy()
        preds["torch"].release()
    for r in range(a.rounds + 1):  # round 0 warms up
        for n in sizes:
            for b in backends:
                t = time.perf_counter()
                res = run_to_end(run_volume(preds[b], vol, slices=zs, batch_size=n))
                dt = (time.perf_counter() - t) / len(zs)
                if r:
                    engine[(b, n)].append(dt)
                    labels[(b, n)] = res.labels[zs]
            for name, f in fwd_runs.items():
                x = np.ascontiguousarray(x_all[:n])
                with torch.inference_mode():
                    t = time.perf_counter()
                    out = f(x)
                    df = (time.perf_counter() - t) / n
                if r:
                    fwd[(name, n)].append(df)
                    fwd_labels[(name, n)] = out.argmax(1)
    print(f"load average after: {os.getloadavg()[0]:.1f}")

    def table(title, times, names):
        print(f"\n{title}\n| backend | batch | s/slice (median) | s/slice (best) | speed-up vs torch |")
        print("|---|---|---|---|---|")
        for n in sizes:
            base = statistics.median(times[("torch", n)])
            for b in names:
                med = statistics.median(times[(b, n)])
                print(f"| {b} | {n} | {med:.3f} | {min(times[(b, n)]):.3f} | {base / med:.2f}× |")

    table("engine (read slices from memory, preprocess, infer, back to the slice grid, arg-max):", engine, backends)
    if fwd_runs:
        table("model forward only (prepared input):", fwd, list(fwd_runs))
    print("\nlabels (engine) against torch's and against the reference:")
    print("| backend | batch | voxels equal to torch | Dice vs reference (per class) |")
    print("|---|---|---|---|")
    for n in sizes:
        y = labels[("torch", n)]
        for b in backends:
            x = labels[(b, n)]
            d = ", ".join(f"{c} {_dice(x, ref, k):.4f}" for k, c in enumerate(ckpt.class_names) if k) if ref is not None else "-"
            print(f"| {b} | {n} | {(x == y).mean() * 100:.3f} % | {d} |")
    if fwd_runs:
        print("\nforward-only arg-max on the model grid against torch's:")
        for n in sizes:
            y = fwd_labels[("torch", n)]
            print(f"  batch {n}: " + ", ".join(f"{b} {(fwd_labels[(b, n)] == y).mean() * 100:.3f} %"
                                                 for b in fwd_runs if b != "torch"))


if __name__ == "__main__":
    main()
