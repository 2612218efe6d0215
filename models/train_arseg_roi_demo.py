#!/usr/bin/env python
"""Re-create the shipped AR-Seg region-of-interest demo ``models/arseg_roi_demo.safetensors`` (+ .json).

AR-Seg's paper trains on 128² crops around LIDC nodules; this checkpoint is trained the same way on
the phantom's liver lesions: two ``genseg train`` runs of a slimmed ``arseg_light`` (light conv+ViT
image encoder at 128², transformer width 128 x 4 layers, mask autoencoder at 64² -> 8×8 latent,
2.86 M params, fp16 5.75 MB) in ROI mode (``--roi-fov-mm 48``: crops of 48 mm centred on each
lesion component of a slice, jitter ±8 mm per axis, 25 % negative crops of lesion-free soft tissue;
``training/tasks/arseg_roi.py``). Targets: background, liver_lesion. Stage 1 trains the mask
autoencoder on every annotator's mask; stage 2 draws ONE of the phantom's 4 simulated annotators
per item (AR-Seg on LIDC). Phantoms: seeds 0..NTRAIN-1, shape (40, 224, 224), spacing
(3, 1.5, 1.5) mm (10 % of the cases are the trainer's validation split); evaluation uses unseen
seeds 1000+ (``benchmarks/arseg_roi_metrics.py``). Window -50..250 HU (liver lesions ~70 HU in a
~105 HU liver).

Usage (from the repository root; one torch thread)::

    .venv/bin/python models/train_arseg_roi_demo.py --stage1-minutes 7 --stage2-minutes 14 \
        --stage2-total-minutes 23 --work /work/train_runs/arseg_roi

Prints the exact ``genseg train`` commands it runs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLASSES = "background,liver_lesion"
#: the slimmed arseg_light (registered config + these overrides, recorded in full in the JSON)
MODEL_OVERRIDES = {"mask_size": 64, "vq_ch_mult": [1, 2, 2, 4], "width": 128, "depth": 4, "heads": 4}
CONFIG = {
    "model_overrides": MODEL_OVERRIDES,
    "normalization": {"kind": "hu_window", "low": -50.0, "high": 250.0},
    "phantom_shape": [40, 224, 224],
    "phantom_spacing": [3.0, 1.5, 1.5],
}


def run(cmd: list[str]) -> float:
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    t = time.time()
    subprocess.run(cmd, check=True)
    return time.time() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--ntrain", type=int, default=40, help="training phantoms (seeds 0..N-1)")
    ap.add_argument("--fov-mm", type=float, default=48.0)
    ap.add_argument("--jitter-mm", type=float, default=8.0)
    ap.add_argument("--stage1-minutes", type=float, default=7.0)
    ap.add_argument("--stage2-minutes", type=float, default=14.0)
    ap.add_argument("--stage2-total-minutes", type=float, default=23.0,
                    help="then resume stage 2 up to this total budget (the shipped run: 14 + 9 min)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="/work/train_runs/arseg_roi")
    ap.add_argument("--out", default=str(HERE / "arseg_roi_demo.safetensors"))
    ap.add_argument("--skip-stage1", action="store_true", help="reuse WORK/roi_stage1.safetensors")
    a = ap.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg_file = work / "roi_config.json"
    cfg_file.write_text(json.dumps(CONFIG, indent=2))
    s1, s2 = work / "roi_stage1.safetensors", work / "roi_stage2.safetensors"
    base = [sys.executable, "-m", "napari_genseg.cli", "train", "--config", str(cfg_file), "--model", "arseg_light",
            "--data", f"phantom:{a.ntrain}", "--classes", CLASSES, "--grid", "resize",
            "--roi-fov-mm", str(a.fov_mm), "--roi-jitter-mm", str(a.jitter_mm), "--empty-fraction", "0.25",
            "--batch-size", str(a.batch_size), "--threads", str(a.threads), "--device", "cpu",
            "--val-fraction", "0.1", "--seed", "0"]
    walls = {}
    if not a.skip_stage1:
        walls["stage1"] = run(base + ["--stage", "1", "--lr", "2e-3", "--warmup-steps", "20",
                                      "--time-budget-minutes", str(a.stage1_minutes), "--out", str(s1)])
    walls["stage2"] = run(base + ["--stage", "2", "--init", str(s1), "--lr", "1e-3", "--warmup-steps", "40",
                                  "--grad-clip", "1.0", "--time-budget-minutes", str(a.stage2_minutes),
                                  "--out", str(s2), "--half"])
    if a.stage2_total_minutes > a.stage2_minutes:
        walls["stage2_resume"] = run(base + ["--stage", "2", "--init", str(s1), "--lr", "1e-3", "--warmup-steps", "40",
                                             "--grad-clip", "1.0", "--time-budget-minutes", str(a.stage2_total_minutes),
                                             "--resume", str(s2), "--out", str(s2), "--half"])
    out = Path(a.out)
    shutil.copyfile(s2, out)
    shutil.copyfile(s2.with_suffix(".json"), out.with_suffix(".json"))
    print(f"wall seconds: {walls}; wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
