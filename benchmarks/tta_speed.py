"""Test-time augmentation cost: per-slice time of K = 1, 4, 8 views next to one plain pass.

Runs the shipped MSA²Net demo checkpoint (or ``--config`` with random weights) through the engine
on a volume (``--ct``: a NIfTI, default the real abdominal CT of ../shared; the phantom without
it), as the Review dock does: ``SegmentationPredictor`` (plain) and ``TTAPredictor`` (K views).
TTA brings each batch onto the model grid once and runs 1 + K forward passes on it, so the
expected ratio is about 1 + K; anything above that is the per-view warp and argmax overhead.

Timing: one warm-up run, then the median of ``--repeats`` runs (the CPU here is shared with other
jobs). Prints a table; asserts nothing.

    PYTHONPATH=src .venv/bin/python benchmarks/tta_speed.py [--threads N] [--slices 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from napari_genseg.engine import run_to_end, run_volume
from napari_genseg.predictors import SegmentationPredictor
from napari_genseg.predictors.tta import TTAPredictor

CT = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "ct-abdomen" / "ct_abdomen_small.nii.gz"


def _volume(path: str | None, n: int):
    from napari_genseg.io import read_nifti

    p = Path(path) if path else CT
    if p.is_file():
        vol = read_nifti(p)
    else:
        from napari_genseg.phantom import make_phantom

        vol = make_phantom(seed=0).to_volume()
    from dataclasses import replace

    return replace(vol, data=vol.data[:n])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ct", default=None)
    ap.add_argument("--model", default="msa2net", help="family (shipped weights) or config name")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--slices", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from napari_genseg.models.checkpoints import resolve_model

    ckpt = resolve_model(a.model, a.checkpoint)
    vol = _volume(a.ct, a.slices)
    plain = SegmentationPredictor.from_checkpoint(ckpt, device=a.device)

    def timed(pred) -> float:
        run_to_end(run_volume(pred, vol, batch_size=a.batch))  # warm-up
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            run_to_end(run_volume(pred, vol, batch_size=a.batch))
            times.append(time.perf_counter() - t0)
        return statistics.median(times) / vol.shape[0]

    base = timed(plain)
    print(f"{ckpt.config_name} on {vol.shape[0]} slices {vol.shape[1]}x{vol.shape[2]}, device {a.device}, "
          f"{a.threads} threads, batch {a.batch}, median of {a.repeats}")
    print(f"{'run':<16}{'ms/slice':>10}{'x plain':>9}")
    print(f"{'plain':<16}{1000 * base:>10.1f}{1.0:>9.2f}")
    for k in (1, 4, 8):
        t = timed(TTAPredictor(plain, k))
        print(f"{f'TTA K={k}':<16}{1000 * t:>10.1f}{t / base:>9.2f}")


if __name__ == "__main__":
    main()
