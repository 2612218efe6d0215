#!/usr/bin/env python
"""AR-Seg in region-of-interest mode on the phantom's liver lesions, against its 4 simulated annotators.

For every unseen phantom (seeds 1000+, never trained on) and every slice, each 8-connected
component of the union of the 4 annotators' lesion masks gets a box: the component's bounding box
plus ``--margin-mm`` on each side (clipped to the slice), i.e. what a reader would draw around the
lesion. The box goes through ``predictors.arseg_roi.ArSegRoiPredictor`` (crop of the checkpoint's
field of view around the box centre, N samples, mapped back into the box) and everything is scored
on the box's own voxels (one "image" per box, as LIDC crops in the paper):

* GED² (N = 1, 4, 8, 16), HM-IoU and Soft-Dice of the N samples against the 4 annotators
  (``metrics.dataset_multiannotator_metrics``; the value at N uses the first N samples);
* the annotators' own values, leave-one-out (``metrics.interrater_metrics``: each annotator as one
  sample against the other 3), beside the model's values computed the same way (the model's N
  samples against the other 3, averaged over the left-out annotator);
* Dice of the consensus (mean of the sample masks > 0.5) at N = 1 (the first sample alone) and
  N = 16 against the phantom's lesion label (annotators' mean > 0.5), and the annotators' own Dice
  against the majority of the other three (mean > 0.5: at least 2 of 3), for reference;
* a plain baseline: Otsu threshold of the box's soft-tissue voxels (0..200 HU, Gaussian-smoothed,
  darker class = lesion, largest component touching the box centre region), scored like the
  consensus.

Usage::

    .venv/bin/python benchmarks/arseg_roi_metrics.py models/arseg_roi_demo.safetensors \
        --seeds 1000:1006 --json benchmarks/arseg_roi_metrics_demo.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
from scipy import ndimage as ndi


def otsu_lesion(box_hu: np.ndarray) -> np.ndarray:
    """(h, w) HU -> bool: the darker Otsu class of the soft-tissue voxels (0..200 HU) after a
    Gaussian (sigma 1 px), restricted to the components that touch the central half of the box."""
    sm = ndi.gaussian_filter(box_hu.astype(np.float32), 1.0)
    v = sm[(sm > 0) & (sm < 200)]
    if v.size < 4:
        return np.zeros(box_hu.shape, bool)
    hist, edges = np.histogram(v, bins=64)
    mids = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * mids) / np.maximum(w0, 1)
    m1 = (np.sum(hist * mids) - np.cumsum(hist * mids)) / np.maximum(w1, 1)
    t = mids[int(np.argmax(w0 * w1 * (m0 - m1) ** 2))]
    low = (sm > 0) & (sm < t)
    lab, n = ndi.label(low)
    h, w = box_hu.shape
    centre = lab[h // 4: h - h // 4 or None, w // 4: w - w // 4 or None]
    keep = [i for i in np.unique(centre) if i]
    return np.isin(lab, keep)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("checkpoint")
    ap.add_argument("--seeds", default="1000:1006", help="held-out phantom seeds a:b")
    ap.add_argument("--shape", default="40,224,224")
    ap.add_argument("--spacing", default="3.0,1.5,1.5")
    ap.add_argument("--margin-mm", type=float, default=6.0)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    from napari_genseg.metrics import dataset_multiannotator_metrics, dice, interrater_metrics
    from napari_genseg.models.checkpoints import load_checkpoint
    from napari_genseg.phantom import make_phantom
    from napari_genseg.predictors.arseg_roi import ArSegRoiPredictor
    from napari_genseg.roi import RoiBox

    t0 = time.time()
    ck = load_checkpoint(a.checkpoint)
    cid = list(ck.class_names).index("liver_lesion")
    pred = ArSegRoiPredictor.from_checkpoint(ck, device="cpu", n_samples=a.n, target_class=cid, seed=a.seed)
    s0, s1 = (int(v) for v in a.seeds.split(":"))
    shape = tuple(int(v) for v in a.shape.split(","))
    spacing = tuple(float(v) for v in a.spacing.split(","))
    items, rater, model_loo = [], [], []
    d1, d16, d_rater, d_otsu, d16_each = [], [], [], [], []
    var_in_box, t_box = [], []
    for seed in range(s0, s1):
        p = make_phantom(seed=seed, shape=shape, spacing=spacing)
        ann = p.lesion_annotations  # (4, Z, H, W)
        union = ann.any(0)
        nb = 0
        for z in np.where(union.any((1, 2)))[0]:
            lab, n = ndi.label(union[z], structure=np.ones((3, 3), bool))
            for sl in ndi.find_objects(lab):
                my, mx = (int(np.ceil(a.margin_mm / s)) for s in spacing[1:])
                box = RoiBox(int(z), int(z) + 1, max(sl[0].start - my, 0), min(sl[0].stop + my, shape[1]),
                             max(sl[1].start - mx, 0), min(sl[1].stop + mx, shape[2]))
                res = pred.run(p.image, spacing, box)
                t_box.append(res.elapsed)
                probs = pred.sample_probabilities(res.tokens[0], res.crop, box)  # (N, h, w)
                y = ann[(slice(None), *box.slices)][:, 0]  # (4, h, w)
                items.append((y, probs))
                rater.append(interrater_metrics(y))
                model_loo.append({k: float(np.mean(v)) for k, v in _model_loo(y, probs).items()})
                ref = y.mean(0) > 0.5
                d16.append(dice(res.votes[0] / a.n > 0.5, ref))
                d1.append(dice(probs[0] > 0.5, ref))
                d16_each.append(np.mean([dice(res.votes[0] / a.n > 0.5, y[k]) for k in range(len(y))]))
                d_rater.append(np.mean([dice(y[k], np.delete(y, k, 0).mean(0) > 0.5) for k in range(len(y))]))
                d_otsu.append(dice(otsu_lesion(p.image[box.slices][0]), ref))
                var_in_box.append(float(res.variability()[0][(res.votes[0] > 0)].mean()) if res.votes.any() else 0.0)
                nb += 1
        print(f"seed {seed}: {nb} lesion boxes", file=sys.stderr, flush=True)
    ns = tuple(n for n in (1, 4, 8, 16) if n <= a.n)
    m = dataset_multiannotator_metrics(items, ns)
    mean = lambda rows, k: float(np.mean([r[k] for r in rows]))  # noqa: E731
    res = {
        "checkpoint": a.checkpoint, "roi": ck.input.get("roi"), "seeds": [s0, s1], "shape": list(shape),
        "spacing": list(spacing), "margin_mm": a.margin_mm, "n_samples": a.n, "threads": a.threads,
        "n_boxes": len(items),
        "model_vs_4_annotators": {str(k): v for k, v in m.items()},
        "leave_one_out": {
            "annotators": {k: mean(rater, k) for k in ("ged", "hm_iou", "soft_dice", "pairwise_iou", "pairwise_dice")},
            "model_vs_other_3": {k: mean(model_loo, k) for k in ("ged", "hm_iou", "soft_dice")},
        },
        "dice_vs_phantom_label": {"model_n1": float(np.mean(d1)), f"model_n{a.n}": float(np.mean(d16)),
                                  "otsu_baseline": float(np.mean(d_otsu)),
                                  "annotator_vs_majority_of_others": float(np.mean(d_rater))},
        "dice_nN_vs_each_annotator": float(np.mean(d16_each)),
        "mean_variability_pct_where_any_sample_marks": float(np.mean(var_in_box)),
        "seconds_per_box": float(np.mean(t_box)),
        "wall_seconds": round(time.time() - t0, 1),
    }
    print(json.dumps(res, indent=2))
    _table(res)
    if a.json:
        from pathlib import Path

        from napari_genseg.io.atomic import atomic_path

        with atomic_path(Path(a.json)) as tmp:
            tmp.write_text(json.dumps(res, indent=2))
    return 0


def _model_loo(y: np.ndarray, probs: np.ndarray) -> dict:
    from napari_genseg.metrics import generalized_energy_distance, hm_iou, soft_dice

    out = {"ged": [], "hm_iou": [], "soft_dice": []}
    for k in range(len(y)):
        others = np.delete(y, k, 0)
        out["ged"].append(generalized_energy_distance(others, probs))
        out["hm_iou"].append(hm_iou(others, probs))
        out["soft_dice"].append(soft_dice(others, probs))
    return out


def _table(r: dict) -> None:
    m = r["model_vs_4_annotators"]
    print(f"\n{r['n_boxes']} lesion boxes, seeds {r['seeds'][0]}..{r['seeds'][1] - 1}, N = {r['n_samples']}", file=sys.stderr)
    print("model vs 4 annotators   " + "  ".join(f"N={k}: GED² {v['ged']:.3f} HM-IoU {v['hm_iou']:.3f} "
                                                 f"Soft-Dice {v['soft_dice']:.3f}" for k, v in m.items()), file=sys.stderr)
    lo = r["leave_one_out"]
    print(f"leave-one-out  annotators: GED² {lo['annotators']['ged']:.3f} HM-IoU {lo['annotators']['hm_iou']:.3f} "
          f"Soft-Dice {lo['annotators']['soft_dice']:.3f} | model N={r['n_samples']}: GED² {lo['model_vs_other_3']['ged']:.3f} "
          f"HM-IoU {lo['model_vs_other_3']['hm_iou']:.3f} Soft-Dice {lo['model_vs_other_3']['soft_dice']:.3f}",
          file=sys.stderr)
    d = r["dice_vs_phantom_label"]
    print(f"Dice vs phantom label: N=1 {d['model_n1']:.3f}  N={r['n_samples']} {d['model_n' + str(r['n_samples'])]:.3f}  Otsu {d['otsu_baseline']:.3f}"
          f"  annotator vs others {d['annotator_vs_majority_of_others']:.3f}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
