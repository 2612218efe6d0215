"""How fine must a model's logit grid be? The best Dice a model can reach when its class logits
live on a g x g grid over the model's input and are bilinearly resized to the slice (what MARSeg's
FPN head does: logits at the MAR token grid, paper Sec. 2.3 / official ``models/marseg.py``).

For every organ slice: the reference labels go onto the model's input grid exactly as an image
would (``preprocessing.SliceGrid.to_model``: resampled to the checkpoint's pixel spacing, centre
padded / cropped), each class's one-hot map is area-averaged to g x g (the "oracle logits"),
resized back like the model's logits (bilinear to the input size, then ``SliceGrid.from_model``),
arg-maxed and scored against the reference (Dice pooled over the slices). No model runs: this is
an upper bound set by the grid alone. Cases: the held-out real slices 11..18 of the labelled
CT and the unseen phantoms 1000, 1001 and 2 (the demo cards' evaluation sets).

    PYTHONPATH=src .venv/bin/python benchmarks/logit_grid_cap.py [--spacing-mm 1.5] [--size 256]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from napari_genseg.preprocessing import SliceGrid

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real" / "ct-abdomen"


def _cases():
    from napari_genseg.io import load_volume
    from napari_genseg.phantom import PHANTOM_CLASSES, make_phantom

    img = SHARED / "ct_abdomen_small.nii.gz"
    if img.is_file():
        lab = load_volume(SHARED / "ct_abdomen_small_labels.nii.gz")
        raw = np.asarray(lab.data)[11:19]
        labels = np.zeros_like(raw, dtype=np.uint8)
        labels[raw == 5], labels[raw == 1] = 1, 2  # TotalSegmentator liver 5, spleen 1
        yield "real 11..18", labels, tuple(lab.spacing[1:])
    names = list(PHANTOM_CLASSES)
    for seed in (1000, 1001, 2):
        ph = make_phantom(seed=seed, spacing=(3.0, 2.2, 2.2))
        labels = np.zeros(ph.labels.shape, np.uint8)
        labels[ph.labels == names.index("liver")] = 1
        labels[ph.labels == names.index("spleen")] = 2
        yield f"phantom {seed}", labels, tuple(ph.spacing[1:])


def oracle_labels(labels: np.ndarray, spacing, grid: SliceGrid, g: int, k: int = 3) -> np.ndarray:
    """(Z, H, W) labels -> the arg-max of their area-averaged one-hot on a g x g logit grid,
    resized back to (Z, H, W) the way a model's logits are."""
    onehot = F.one_hot(torch.from_numpy(labels.astype(np.int64)), k).permute(0, 3, 1, 2).float()
    x = grid.to_model(onehot, spacing, pad_value=0.0)
    x[:, 0] += (x.sum(1) == 0).float()  # padding is background
    coarse = F.adaptive_avg_pool2d(x, g)
    up = F.interpolate(coarse, size=(grid.size, grid.size), mode="bilinear", align_corners=False)
    back = grid.from_model(up, labels.shape[-2:], spacing)
    return back.argmax(1).numpy().astype(np.uint8)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return float(2 * (a & b).sum() / s) if s else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spacing-mm", type=float, default=1.5, help="the model's input pixel spacing")
    ap.add_argument("--size", type=int, default=256, help="the model's input side (pixels)")
    ap.add_argument("--grids", default="8,16,32,64,128,256")
    args = ap.parse_args(argv)
    grid = SliceGrid.create(args.size, "spacing", args.spacing_mm)
    gs = [int(v) for v in args.grids.split(",")]
    print(f"input {args.size}² at {args.spacing_mm} mm ({args.size * args.spacing_mm:.0f} mm field of view); "
          f"oracle Dice per logit grid g (cell = {args.size * args.spacing_mm:.0f}/g mm)")
    print(f"{'case':<16}{'organ':<8}" + "".join(f"{f'g={g}':>9}" for g in gs))
    for name, labels, spacing in _cases():
        outs = {g: oracle_labels(labels, spacing, grid, g) for g in gs}
        for c, organ in ((1, "liver"), (2, "spleen")):
            ref = labels == c
            print(f"{name:<16}{organ:<8}" + "".join(f"{dice(outs[g] == c, ref):9.3f}" for g in gs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
