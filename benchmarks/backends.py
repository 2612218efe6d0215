"""torch fp32 vs ONNX Runtime on this machine: seconds per slice at batch 1 and 8, label agreement.

    PYTHONPATH=src .venv/bin/python benchmarks/backends.py [--model msa2net] [--threads 1]
        [--batch-sizes 1,8] [--slices 7:23] [--rounds 3]

AR-Seg (``--model arseg``): ONNX Runtime runs its image encoder and mask decoder, the sampling
stays in torch; no forward-only table. Both backends run through the engine (``run_volume`` with ``make_predictor(backend=...)``), so the
shared preprocessing and the return to the slice grid are in both numbers; a second table times
the model forward alone on the prepared model input (what the backends differ in). The ONNX file
is the cached export of the checkpoint (``export.cached_onnx``; exported before timing). Rounds
alternate torch / ONNX Runtime (the machine may be shared); the median round is reported, the
best one alongside. Labels: the fraction of voxels where ONNX Runtime's labels equal torch's and
the per-class Dice between them. Needs the onnx extra. Asserts nothing.
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="msa2net", help="family (its shipped demo checkpoint) or config name")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--input", default="../shared/data/real/ct-abdomen/ct_abdomen_small.nii.gz")
    ap.add_argument("--slices", default="7:23", help="'a:b' slices of the CT (b exclusive)")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()

    import onnxruntime as ort
    import torch

    from napari_genseg.engine import parse_slices, run_to_end, run_volume
    from napari_genseg.export import cached_onnx, onnx_pieces
    from napari_genseg.io import load_volume
    from napari_genseg.models.checkpoints import resolve_model
    from napari_genseg.predictors import make_predictor
    from napari_genseg.threads import passive_wait

    torch.set_num_threads(a.threads)
    vol = load_volume(a.input)
    ckpt = resolve_model(a.model, a.checkpoint)
    zs = parse_slices(a.slices, vol.shape[0])
    t = time.perf_counter()
    path = [cached_onnx(ckpt, piece) for piece in onnx_pieces(ckpt.family)][-1]
    print(f"cpu: {cpu_name()}")
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, threads {torch.get_num_threads()} "
          f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, ORT spinning "
          f"{'off' if passive_wait() else 'on'}), model {ckpt.config_name}, {len(zs)} slices "
          f"{zs[0]}..{zs[-1]} of {vol.shape} (z, y, x)")
    print(f"ONNX file {path} ({path.stat().st_size / 1e6:.1f} MB; export or cache lookup {time.perf_counter() - t:.1f} s)")

    backends = ("torch", "onnxruntime")
    sizes = [int(b) for b in a.batch_sizes.split(",")]
    engine: dict[tuple, list[float]] = {(b, n): [] for n in sizes for b in backends}
    fwd: dict[tuple, list[float]] = {(b, n): [] for n in sizes for b in backends}
    labels: dict[tuple, np.ndarray] = {}
    preds = {b: make_predictor(ckpt, device="cpu", precision="fp32", backend=b) for b in backends}
    for r in range(a.rounds + 1):  # round 0 warms up
        for n in sizes:
            for b in backends:
                pred = preds[b]
                t = time.perf_counter()
                res = run_to_end(run_volume(pred, vol, slices=zs, batch_size=n))
                dt = (time.perf_counter() - t) / len(zs)
                df = float("nan")
                if hasattr(pred, "forward"):  # segmentation models: the forward alone
                    pred.set_image(vol.data[zs[:n]], vol.spacing[1:])
                    x = pred._x
                    t = time.perf_counter()
                    with torch.inference_mode():
                        pred.forward(x)
                    df = (time.perf_counter() - t) / n
                    pred.release()
                if r:
                    engine[(b, n)].append(dt)
                    fwd[(b, n)].append(df)
                    labels[(b, n)] = res.labels[zs]

    def table(title, times):
        print(f"\n{title}\n| backend | batch | s/slice (median) | s/slice (best) | speed-up vs torch |")
        print("|---|---|---|---|---|")
        for n in sizes:
            base = statistics.median(times[("torch", n)])
            for b in backends:
                med = statistics.median(times[(b, n)])
                print(f"| {b} | {n} | {med:.3f} | {min(times[(b, n)]):.3f} | {base / med:.2f}× |")

    table("engine (read slices from memory, preprocess, infer, back to the slice grid, arg-max):", engine)
    if all(v == v for ts in fwd.values() for v in ts):
        table("model forward only (prepared input):", fwd)
    print("\nlabels, ONNX Runtime vs torch (same batch size):")
    for n in sizes:
        x, y = labels[("onnxruntime", n)], labels[("torch", n)]
        dice = ", ".join(f"{c} {_dice(x, y, k):.5f}" for k, c in enumerate(ckpt.class_names) if k)
        print(f"  batch {n}: {(x == y).mean() * 100:.4f} % of voxels equal; Dice {dice}")


if __name__ == "__main__":
    main()
