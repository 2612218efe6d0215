"""fp32 vs bf16 on this machine's CPU: seconds per slice and how far the labels agree.

    PYTHONPATH=src .venv/bin/python benchmarks/precision.py [--model msa2net] [--slices 11:19]
        [--batch-size 1] [--threads 1] [--rounds 3]

Runs the engine (``run_volume`` with the family's predictor, so preprocessing and the return to
the slice grid are included) over a few slices of the real abdomen CT (``ct_abdomen_small``, with
reference labels) with the shipped demo checkpoint, once in fp32 and once under bf16 autocast.
bf16 is measured even on a CPU without native bf16 (where ``--precision bf16`` itself runs fp32
with a warning): the predictor's resolved precision is overridden, so the table shows what
emulated bf16 would cost. Rounds alternate fp32 / bf16 (the machine may be shared); the median
round is reported, the best one alongside.

Printed: the CPU's bf16 support (``device.cpu_bf16_support``), torch's kernel level and thread
count; per precision s/slice (median, best) and Dice against the reference labels per class; the
voxel agreement of the bf16 labels with the fp32 ones and the per-class Dice between them.
Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np


def cpu_name() -> str:
    """The CPU's model name (``device.cpu_model_name``) and the load average."""
    from napari_genseg.device import cpu_model_name

    name = cpu_model_name()
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"{name}, {os.cpu_count()} CPUs{load}"


def _dice(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Dice of class ``k`` between two label arrays (``metrics.dice``; NaN when both lack it)."""
    from napari_genseg.metrics import dice

    return dice(a == k, b == k, empty_value=float("nan"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="msa2net", help="family (its shipped demo checkpoint)")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--input", default="../shared/data/real/ct-abdomen/ct_abdomen_small.nii.gz")
    ap.add_argument("--labels", default="../shared/data/real/ct-abdomen/ct_abdomen_small_labels.nii.gz")
    ap.add_argument("--label-map", default="5:1,1:2", help="reference id -> model class (the demo's training map)")
    ap.add_argument("--slices", default="11:19", help="'a:b' slices of the CT (b exclusive)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()

    import torch

    from napari_genseg.device import cpu_bf16_support
    from napari_genseg.engine import parse_slices, run_to_end, run_volume
    from napari_genseg.io import load_volume
    from napari_genseg.io.labels import labels_for_image
    from napari_genseg.models.checkpoints import resolve_model
    from napari_genseg.predictors import make_predictor

    torch.set_num_threads(a.threads)
    native, why = cpu_bf16_support()
    vol = load_volume(a.input)
    ref = None
    if a.labels and os.path.exists(a.labels):
        raw = labels_for_image(vol, a.labels)[0]
        ref = np.zeros_like(raw, dtype=np.uint8)
        for pair in filter(None, a.label_map.split(",")):
            src, dst = (int(v) for v in pair.split(":"))
            ref[raw == src] = dst
    ckpt = resolve_model(a.model, a.checkpoint)
    zs = parse_slices(a.slices, vol.shape[0])
    print(f"cpu: {cpu_name()}; native bf16: {'yes' if native else 'NO'} ({why})")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, model {ckpt.config_name}, "
          f"slices {zs[0]}..{zs[-1]} of {vol.shape} (z, y, x) at {tuple(round(s, 2) for s in vol.spacing)} mm, "
          f"batch {a.batch_size}")

    def run(precision: str):
        pred = make_predictor(ckpt, device="cpu", precision="fp32")
        pred.precision = precision  # measure emulated bf16 too (see the module docstring)
        t = time.perf_counter()
        res = run_to_end(run_volume(pred, vol, slices=zs, batch_size=a.batch_size))
        return (time.perf_counter() - t) / len(zs), res.labels[zs]

    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    labels: dict[str, np.ndarray] = {}
    for p in times:  # warm-up (oneDNN primitive creation, allocator)
        run(p)
    for _ in range(a.rounds):
        for p in times:
            dt, labels[p] = run(p)
            times[p].append(dt)

    names = ckpt.class_names
    print(f"\n| precision | s/slice (median) | s/slice (best) | vs fp32 | "
          + " | ".join(f"Dice {n} vs reference" for n in names[1:]) + " |")
    print("|---|---|---|---|" + "---|" * (len(names) - 1))
    base = statistics.median(times["fp32"])
    for p, ts in times.items():
        med = statistics.median(ts)
        dice = [f"{_dice(labels[p], ref[zs], k):.4f}" if ref is not None else "-" for k in range(1, len(names))]
        print(f"| {p}{'' if p == 'fp32' or native else ' (emulated)'} | {med:.3f} | {min(ts):.3f} | "
              f"{base / med:.2f}× | " + " | ".join(dice) + " |")
    agree = float((labels["fp32"] == labels["bf16"]).mean())
    between = ", ".join(f"{n} {_dice(labels['fp32'], labels['bf16'], k):.4f}" for k, n in enumerate(names) if k)
    print(f"\nbf16 vs fp32 labels: {agree * 100:.3f} % of voxels equal; Dice between them: {between}")


if __name__ == "__main__":
    main()
