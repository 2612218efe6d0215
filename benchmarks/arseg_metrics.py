#!/usr/bin/env python
"""Evaluate an AR-Seg checkpoint on held-out phantoms (never trained on: seeds 1000+).

* liver, spleen: Dice of the N = 16 consensus (mean of the sample masks > 0.5) against the phantom
  labels (liver includes its lesions), per case over every slice (3-D Dice), through the engine's
  ``ArSegPredictor`` (same normalisation / grid as in the viewer);
* liver_lesion: GED² (N = 1, 4, 8, 16), HM-IoU and Soft-Dice against the phantom's 4 simulated
  annotators (``metrics.dataset_multiannotator_metrics``) over ALL held-out slices where at least one
  annotator marks a lesion, on the original slice pixels; plus the consensus Dice against the
  annotators' majority (>= 2 of 4) and, for reference, the same metrics for an "oracle" sampler that
  returns the annotators themselves (samples i = annotator i mod 4: the best a sampler can do).

Usage::

    .venv/bin/python benchmarks/arseg_metrics.py models/arseg_demo.safetensors --seeds 1000:1006 \
        --json benchmarks/arseg_metrics.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch


def _predict(pred, slices_hu, spacing_yx) -> dict:
    """One batch through the predictor protocol (embed once, then the N samples)."""
    pred.set_image(slices_hu, spacing_yx)
    return pred.predict()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--seeds", default="1000:1006", help="held-out phantom seeds a:b")
    ap.add_argument("--shape", default="40,160,160")
    ap.add_argument("--spacing", default="3.0,2.2,2.2")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--organ-slices", default="all", choices=["all", "target"],
                    help="organ Dice over every slice (all) or only slices containing the organ")
    ap.add_argument("--what", default="all", choices=["all", "organs", "lesion"],
                    help="evaluate only the organs or only the lesion class (to run both in parallel)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    from napari_genseg.predictors import make_predictor
    from napari_genseg.metrics import dataset_multiannotator_metrics, dice
    from napari_genseg.models.checkpoints import load_checkpoint
    from napari_genseg.phantom import make_phantom

    t0 = time.time()
    ck = load_checkpoint(a.checkpoint)
    names = list(ck.class_names)
    s0, s1 = (int(v) for v in a.seeds.split(":"))
    shape = tuple(int(v) for v in a.shape.split(","))
    spacing = tuple(float(v) for v in a.spacing.split(","))
    organ = {n: [] for n in ("liver", "spleen") if n in names and a.what != "lesion"}
    lesion_items, oracle_items, cons_dice, var_frac = [], [], [], []
    for seed in range(s0, s1):
        p = make_phantom(seed=seed, shape=shape, spacing=spacing)
        for n in organ:
            cid = names.index(n)
            ref = p.labels == (1 if n == "liver" else 2)
            if n == "liver":
                ref |= p.labels == 6
            zs = list(range(shape[0])) if a.organ_slices == "all" else [int(z) for z in np.where(ref.any((1, 2)))[0]]
            pred = make_predictor(ck, device="cpu", n_samples=a.n, target_class=cid, seed=seed)
            out = np.concatenate([_predict(pred, p.image[zs[i:i + a.batch_size]], spacing[1:])["labels"]
                                  for i in range(0, len(zs), a.batch_size)])
            organ[n].append(dice(out > 0, ref[zs]))
            print(f"seed {seed} {n}: Dice {organ[n][-1]:.3f}", file=sys.stderr, flush=True)
        if "liver_lesion" in names and a.what != "organs":
            cid = names.index("liver_lesion")
            ann = p.lesion_annotations  # (A, z, y, x)
            zs = [int(z) for z in np.where(ann.any((0, 2, 3)))[0]]
            pred = make_predictor(ck, device="cpu", n_samples=a.n, target_class=cid, seed=seed)
            hw = shape[1:]
            for i in range(0, len(zs), a.batch_size):
                zb = zs[i:i + a.batch_size]
                out = _predict(pred, p.image[zb], spacing[1:])
                probs = pred.sample_probabilities(out["tokens"], hw, spacing[1:])
                for j, z in enumerate(zb):
                    annz = ann[:, z]
                    lesion_items.append((annz, probs[j]))
                    oracle_items.append((annz, np.stack([annz[k % annz.shape[0]] for k in range(a.n)]).astype(np.float32)))
                    cons = out["labels"][j] > 0
                    cons_dice.append(dice(cons, annz.sum(0) >= 2))
                    v = out["votes"][j].astype(np.int32)
                    var_frac.append(float(((v > 0) & (v < a.n)).mean()))
            print(f"seed {seed} lesion: {len(zs)} slices", file=sys.stderr, flush=True)
    res = {"checkpoint": a.checkpoint, "seeds": [s0, s1], "shape": list(shape), "spacing": list(spacing),
           "n_samples": a.n, "organ_slices": a.organ_slices,
           "organ_dice": {n: {"mean": float(np.mean(v)), "per_case": [round(float(x), 4) for x in v]}
                          for n, v in organ.items()}}
    if lesion_items:
        ns = tuple(n for n in (1, 4, 8, 16) if n <= a.n)
        m = dataset_multiannotator_metrics(lesion_items, ns)
        o = dataset_multiannotator_metrics(oracle_items, ns)
        res["lesion"] = {"n_slices": len(lesion_items), "metrics": {str(k): v for k, v in m.items()},
                         "oracle_annotators": {str(k): v for k, v in o.items()},
                         "consensus_dice_vs_majority": float(np.mean(cons_dice)),
                         "pixel_fraction_nonzero_variability": float(np.mean(var_frac))}
    res["wall_seconds"] = round(time.time() - t0, 1)
    print(json.dumps(res, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
