#!/usr/bin/env python
"""Re-create the shipped AR-Seg demo weights ``models/arseg_demo.safetensors`` (+ .json, model card .md).

Config ``arseg_ct`` (light conv+ViT image encoder at 128², mask VQ 128² -> 8×8 latent, 4×192
transformer; classes background, liver, spleen), slices resampled to 3 mm pixels (384 mm field of
view, grid ``spacing``), HU window [-125, 275] -> [0, 1]. Three runs of the one training loop:

0. **stage 0** (not in the paper): the image encoder + a head on its embedding trained as a slice
   segmentation network (Dice + CE). The paper freezes MedSAM, a segmentation-trained encoder; none
   can be downloaded here, so this CT-trained encoder stands in for it and stays frozen in stage 2;
1. **stage 1**: the mask autoencoder (Dice + BCE + VQ) on the liver and spleen masks (spleen items
   ×2), continuing the VQ of ``--vq-init`` when given (the shipped run: the previous demo's
   ``arseg_light`` VQ, same shapes: ``git show 5c6a4cc:models/arseg_demo.safetensors``);
2. **stage 2**: the next-scale segmentor (adapter + AdaLN transformer), VQ and encoder frozen, token
   cross-entropy; saved as fp16.

Stages 0 and 1 are independent and run in parallel (two processes) unless ``--sequential``.

Data (every stage, the same split): abdomen phantoms, pelvis/thorax phantoms (negatives: no liver or
spleen), the labelled real CT ``ct_abdomen_small`` (TotalSegmentator ids 5 liver -> 1, 1 spleen -> 2)
without its held-out block of 8 slices and a 2-slice gap on each side (``holdout_slices="auto"``, the
same block as the MSA²Net and MARSeg demos: validation 11..18, never trained on 9..20), oversampled.

Then evaluates N = 1 and N = 16 consensus Dice / HD95 per organ on the held-out real slices and on
unseen phantoms beside the HU baselines and the shipped MSA²Net demo, counts liver/spleen on unseen
pelvis/thorax phantoms and in the unlabelled CT's pelvis (slices 0-40) after the default 3-D clean-up,
and writes the model card.

Usage (from the repository root; one torch thread per process on the shared 2-core machine)::

    .venv/bin/python models/train_arseg_demo.py --stage0-minutes 20 --stage1-minutes 20 \\
        --stage2-minutes 28 --threads 1 --work /work/train_runs/arseg_ct

``--skip-stage0/1/2`` reuse the stage checkpoints in ``--work``; ``--only-stage S`` runs one stage and
exits (what the parallel mode starts). The real CTs are read from ``--real-dir`` at training time only.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
CONFIG = "arseg_ct"
CLASSES = ["background", "liver", "spleen"]
LABEL_MAP = "5:1,1:2"
SPACING_MM = 3.0
AUGMENT = {"p_intensity": 0.8, "hu_scale": 0.1, "hu_shift": 25.0, "noise_hu": 20.0, "gamma": 0.3,
           "p_spatial": 0.8, "scale": 0.2, "rotate_deg": 12.0, "translate": 0.05, "p_elastic": 0.3}


def _paths(args) -> dict:
    real = Path(args.real_dir)
    img, lbl = real / "ct_abdomen_small.nii.gz", real / "ct_abdomen_small_labels.nii.gz"
    return {"real_spec": f"pairs:{img},{lbl}", "unlabelled": real / "ct_thorax_abdomen_unlabeled.nii.gz",
            "phantom_spec": f"phantom:{args.phantoms}@0",
            "negative_specs": ([f"phantom:{args.pelvis}@200/pelvis"] if args.pelvis else [])
            + ([f"phantom:{args.thorax}@300/thorax"] if args.thorax else [])}


def stage_config(args, stage: int, work: Path):
    """The ``ArSegTrainConfig`` of one stage."""
    from napari_genseg.training.tasks import ArSegTrainConfig

    p = _paths(args)
    data = [p["phantom_spec"], *p["negative_specs"], p["real_spec"]]
    kw = dict(model=args.config, classes=CLASSES, label_map=LABEL_MAP, data=data, stage=stage,
              repeat={p["real_spec"]: args.repeat_real}, batch_size=args.batch_size, val_fraction=0.15,
              holdout_slices="auto", holdout_gap=2, holdout_size=8, grid="spacing", spacing_mm=SPACING_MM,
              normalization={"kind": "hu_window", "low": -125.0, "high": 275.0},
              device="cpu", precision="fp32", seed=args.seed, workers=0, threads=args.threads, augment=AUGMENT,
              recipe="adamw", empty_fraction=args.empty_fraction, out=str(work / f"arseg_stage{stage}.safetensors"))
    minutes = {0: args.stage0_minutes, 1: args.stage1_minutes, 2: args.stage2_minutes}[stage]
    kw.update(time_budget_minutes=minutes, max_minutes=minutes * 1.4 + 3)
    if stage == 0:
        kw.update(lr=args.lr0, warmup_steps=20, grad_clip=1.0)
    elif stage == 1:
        kw.update(lr=args.lr1, warmup_steps=20, class_repeat={"spleen": 2}, init=args.vq_init)
    else:
        kw.update(lr=args.lr2, warmup_steps=40, grad_clip=1.0, init=str(work / "arseg_stage1.safetensors"),
                  encoder_init=str(work / "arseg_stage0.safetensors"), half=False,
                  segmentor_init=args.segmentor_init)
        if args.stage2_resume_minutes:
            # continue WORK/arseg_stage2 exactly (its .train.pt) up to a longer total budget; the
            # cosine lr follows the elapsed fraction of the new total
            del kw["init"], kw["encoder_init"], kw["segmentor_init"]
            kw["resume"] = str(work / "arseg_stage2.safetensors")
            minutes = args.stage2_resume_minutes
            kw.update(time_budget_minutes=minutes, max_minutes=minutes * 1.4 + 3)
    return ArSegTrainConfig.from_dict(kw)


def run_stage(args, stage: int, work: Path) -> dict:
    from napari_genseg.training.loop import train

    if args.threads:
        torch.set_num_threads(args.threads)
    summary = train(stage_config(args, stage, work))
    print(json.dumps(summary, indent=2, default=str), file=sys.stderr, flush=True)
    return summary


# ----------------------------------------------------------------------------- evaluation
def _organ_ids(ck) -> list[int]:
    """Label ids of liver and spleen in ``ck.class_names`` (another checkpoint may have more classes)."""
    return [i for i, n in enumerate(ck.class_names) if n in CLASSES[1:]]


def segment(ck, volume, n: int, slices=None, seed: int = 0, batch_size: int = 8) -> dict:
    """{N: (z, y, x) uint8 labels} for N = n and N = 1: each organ's consensus of the N samples
    (mean of the N sample masks > 0.5; liver 1, spleen 2, spleen where both) and, from the same run,
    the first sample alone (what an N = 1 run draws: one sample of the same distribution)."""
    from napari_genseg.engine import parse_slices, run_to_end, run_volume
    from napari_genseg.predictors import make_predictor

    zs = parse_slices(slices, volume.shape[0])
    out = {n: np.zeros(volume.shape, np.uint8), 1: np.zeros(volume.shape, np.uint8)}
    hw, sp = volume.shape[1:], volume.spacing[1:]
    for cid in _organ_ids(ck):
        pred = make_predictor(ck, device="cpu", precision="fp32", n_samples=n, target_class=cid, seed=seed)
        res = run_to_end(run_volume(pred, volume, slices=zs, batch_size=batch_size))
        out[n][res.labels == cid] = cid
        if n != 1:
            for z, tok in res.extras["tokens"].items():
                first = pred.decode_samples(np.asarray(tok)[:1], hw, sp)[0]
                out[1][z][first] = cid
    return out


def organ_metrics(ck, cases, n: int, slices=None) -> dict:
    """{N: per-case and mean Dice / IoU / HD95 per organ of the raw consensus} for N = n and 1."""
    from napari_genseg.engine import parse_slices
    from napari_genseg.metrics import evaluate_labels

    classes = {i: ck.class_names[i] for i in _organ_ids(ck)}
    per = {n: {}, 1: {}}
    for c in cases:
        zs = parse_slices(slices, c.n_slices)
        labs = segment(ck, c.volume, n, slices=zs)
        for k in per:
            per[k][c.name] = evaluate_labels(labs[k][zs], c.labels[zs], c.spacing, classes)
    return {k: {"per_case": v, "mean": {name: {m: float(np.mean([v[c][name][m] for c in v]))
                                               for m in ("dice", "iou", "hd95_mm")} for name in classes.values()}}
            for k, v in per.items()}


def cleaned_counts(ck, volume, n: int, zrange=None) -> dict:
    """Liver/spleen voxels and mL of the N-sample consensus after the checkpoint's default 3-D
    clean-up (``postprocessing``: largest component, holes filled, side of the body), over the whole
    volume or slices ``zrange`` (a, b) of it; plus the raw counts."""
    from napari_genseg.postprocessing import postprocess

    lab = segment(ck, volume, n)[n]
    clean, _ = postprocess(lab, ck.class_names, ck.postprocess, volume)
    sl = slice(None) if zrange is None else slice(*zrange)
    ml = float(np.prod(volume.spacing)) / 1000.0
    out = {}
    for i, name in enumerate(ck.class_names):
        if i in _organ_ids(ck):
            out[name] = {"raw_voxels": int((lab[sl] == i).sum()), "voxels": int((clean[sl] == i).sum()),
                         "ml": round(float((clean[sl] == i).sum()) * ml, 1)}
    return out


def vq_recon_dice(ck, cases, slices=None) -> dict:
    """Stage-1 check: per organ, reconstruction Dice of the mask VQ (encode -> all scales' tokens -> decode,
    logits > 0) on every slice of ``cases`` that holds the organ, on the model's mask grid; pooled over
    the slices (sum 2|A∩B| / sum |A|+|B|) and the mean of the per-slice Dice. ``slices``: the same
    slice list for every case (default: all)."""
    from napari_genseg.preprocessing import Normalization, SliceGrid
    from napari_genseg.training.tasks.arseg import ArSegItems

    grid = SliceGrid.from_meta(ck.input, ck.config.img_size).with_size(ck.config.mask_size)
    norm = Normalization.from_dict(ck.input["normalization"])
    items = [(i, list(slices) if slices is not None else list(range(c.n_slices))) for i, c in enumerate(cases)]
    ds = ArSegItems(cases, items, list(ck.class_names), grid, norm, ck.config.mask_size, empty_fraction=0.0)
    vq = ck.model.vq.float().eval()
    res = {}
    for cid in _organ_ids(ck):
        name = ck.class_names[cid]
        m = torch.stack([ds[i][1] for i in range(len(ds)) if ds.items[i][1] == cid])
        with torch.no_grad():
            p = torch.cat([(vq.decode_tokens(vq.encode_tokens(m[s:s + 32])) > 0).float() for s in range(0, len(m), 32)])
        inter, den = (p * m).flatten(1).sum(1), p.flatten(1).sum(1) + m.flatten(1).sum(1)
        res[name] = {"slices": len(m), "pooled": round(float(2 * inter.sum() / den.sum()), 4),
                     "per_slice_mean": round(float((2 * inter / den.clamp_min(1)).mean()), 4)}
    return res


def evaluate_all(args, out: Path, work: Path, part: str = "all") -> dict:
    """``part``: "organs" (VQ reconstruction, N-sample Dice on the real held-out slices and unseen
    phantoms beside the HU baselines and the MSA²Net demo), "negatives" (unseen pelvis/thorax
    phantoms), "unlabelled" (the unlabelled CT's pelvis) or "all"."""
    from napari_genseg.io import load_volume
    from napari_genseg.models.checkpoints import load_checkpoint
    from napari_genseg.training import data as D
    from napari_genseg.training.evaluate import evaluate

    p = _paths(args)
    ck = load_checkpoint(out)
    prov = (ck if part == "vq" else load_checkpoint(work / "arseg_stage2.safetensors")).provenance
    real_val = [s for s in prov["split"]["strategy"] if s.get("kind") == "slice-block"][0]["val"]
    a, b = (int(v) for v in real_val.split("-"))
    real_slices = f"{a}:{b + 1}"
    val_phantoms = [c for s in prov["split"]["strategy"] if s.get("kind") == "by-case" for c in s["val_cases"]
                    if c.split("_")[-2] == "phantom"]
    ph_specs = [f"phantom:{args.eval_phantoms}@1000"] + ([f"phantom:1@{int(v.split('_')[-1])}" for v in val_phantoms]
                                                        if args.eval_val_phantoms else [])
    if part == "vq":  # the mask VQ alone (e.g. of a stage-1 checkpoint): unseen phantoms + the real block
        real_cases = [c for s in D.load_sources([p["real_spec"]], LABEL_MAP, CLASSES) for c in s]
        ph_cases = [c for s in D.load_sources(ph_specs, None, CLASSES, phantom_spacing=(3.0, 2.2, 2.2)) for c in s]
        return {"vq_recon": {"unseen_phantoms": vq_recon_dice(ck, ph_cases),
                             "real_heldout_block": vq_recon_dice(ck, real_cases, range(a, b + 1))}}
    ph_specs_self = ph_specs  # the phantoms this process segments (the "phantoms" part takes the 2nd+)
    if part == "organs" and args.eval_phantoms > 1:
        ph_specs_self = ["phantom:1@1000"]
    elif part == "phantoms":
        ph_specs_self = [f"phantom:{args.eval_phantoms - 1}@1001"]
    spacing = (3.0, 2.2, 2.2)
    real_cases = [c for s in D.load_sources([p["real_spec"]], LABEL_MAP, CLASSES) for c in s]
    ph_cases = [c for s in D.load_sources(ph_specs_self, None, CLASSES, phantom_spacing=spacing) for c in s]
    res = {"real_slices": real_slices, "phantoms": [c.name for c in ph_cases], "timing_s": {}}
    n = args.eval_n
    if part == "phantoms":
        t0 = time.time()
        for k, v in organ_metrics(ck, ph_cases, n).items():
            res[f"phantom_N{k}"] = v
        res["timing_s"]["phantoms"] = round(time.time() - t0, 1)
        return res
    if part in ("negatives", "all"):
        t0, neg = time.time(), {}
        specs = [f"phantom:{args.eval_negatives}@1200/pelvis"] + (
            [f"phantom:{args.eval_negatives}@1300/thorax"] if args.eval_thorax else [])
        for spec in specs:
            for c in D.load_sources([spec], None, CLASSES, phantom_spacing=spacing)[0]:
                neg[c.name] = cleaned_counts(ck, c.volume, n)
        res[f"negatives_N{n}"] = neg
        res["timing_s"]["negatives"] = round(time.time() - t0, 1)
    if part in ("unlabelled", "all") and p["unlabelled"].is_file():
        t0 = time.time()
        res[f"unlabelled_pelvis_0_40_N{n}"] = cleaned_counts(ck, load_volume(p["unlabelled"]), n, zrange=(0, 41))
        res["timing_s"]["unlabelled"] = round(time.time() - t0, 1)
    if part not in ("organs", "all"):
        return res
    res["vq_recon"] = {"unseen_phantoms": vq_recon_dice(ck, ph_cases),
                       "real_heldout_block": vq_recon_dice(ck, real_cases, range(a, b + 1))}
    print(f"VQ reconstruction: {res['vq_recon']}", file=sys.stderr, flush=True)
    for name, cs, sl in (("real", real_cases, real_slices), ("phantom", ph_cases, None)):
        t0 = time.time()
        r = organ_metrics(ck, cs, n, slices=sl)
        res["timing_s"][name] = round(time.time() - t0, 1)
        for k, v in r.items():
            res[f"{name}_N{k}"] = v
            print(f"{name} N={k}: {v['mean']}", file=sys.stderr, flush=True)
    # the HU baselines (whole volume) and the shipped MSA²Net demo on the same slices / cases
    msa = Path(args.msa2net)
    res["reference_real"] = evaluate(msa, [p["real_spec"]], label_map=LABEL_MAP, baseline="both",
                                     slices=real_slices)["mean"]
    res["reference_phantom"] = evaluate(msa, ph_specs, baseline="both", phantom_spacing=spacing)["mean"]
    return res


def merge_eval(results: list[dict], parts) -> dict:
    """One evaluation dict from the parts' JSONs: the phantom per-case rows of the "organs" and
    "phantoms" parts together, their means recomputed over all cases."""
    ev: dict = {"timing_s": {}}
    for part, r in zip(parts, results):
        r = dict(r)
        ev["timing_s"].update(r.pop("timing_s", {}))
        ev[f"wall_s_{part}"] = r.pop("wall_s", None)
        for k, v in r.items():
            if k.startswith("phantom_N") and k in ev:
                per = {**ev[k]["per_case"], **v["per_case"]}
                organs = next(iter(per.values())).keys()
                ev[k] = {"per_case": per, "mean": {o: {m: float(np.mean([per[c][o][m] for c in per]))
                                                      for m in ("dice", "iou", "hd95_mm")} for o in organs}}
            elif k == "phantoms" and k in ev:
                ev[k] = ev[k] + v
            else:
                ev[k] = v
    return ev


def _loss_summary(prov: dict) -> dict:
    hist = [h for h in prov.get("history", []) if h.get("loss") is not None]
    vals = [h for h in prov.get("history", []) if h.get("val_score") is not None or h.get("val_loss") is not None]
    return {"steps": prov.get("hyperparameters", {}).get("step"),
            "loss_first": hist[0]["loss"] if hist else None, "loss_last": hist[-1]["loss"] if hist else None,
            "validation": {k: v for k, v in (prov.get("validation") or {}).items() if isinstance(v, (int, float))},
            "val_history": vals[:1] + vals[-1:], "wall_min": round(prov.get("wall_seconds", 0.0) / 60.0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real-dir", default="/work/shared/data/real/ct-abdomen")
    ap.add_argument("--work", default="/work/train_runs/arseg_ct", help="stage checkpoints + train state (not shipped)")
    ap.add_argument("--out", default=str(HERE / "arseg_demo.safetensors"))
    ap.add_argument("--config", default=CONFIG, choices=[CONFIG, "arseg_ct16"],
                    help="model configuration (arseg_ct16: a 16x16 mask latent, 9 scales)")
    ap.add_argument("--stage0-minutes", type=float, default=20.0)
    ap.add_argument("--stage1-minutes", type=float, default=20.0)
    ap.add_argument("--stage2-minutes", type=float, default=28.0)
    ap.add_argument("--lr0", type=float, default=1e-3)
    ap.add_argument("--lr1", type=float, default=1e-3)
    ap.add_argument("--lr2", type=float, default=8e-4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--vq-init", default=None, help="stage 1 continues the mask VQ of this AR-Seg checkpoint")
    ap.add_argument("--segmentor-init", default=None,
                    help="stage 2 warm-starts the adapter + transformer from this AR-Seg checkpoint (tensors "
                         "whose names and shapes match, e.g. the 8x8 demo's for arseg_ct16)")
    ap.add_argument("--phantoms", type=int, default=12)
    ap.add_argument("--pelvis", type=int, default=3, help="pelvis phantoms (negatives: no liver/spleen)")
    ap.add_argument("--thorax", type=int, default=2, help="thorax phantoms (negatives: no liver/spleen)")
    ap.add_argument("--repeat-real", type=int, default=6, help="oversampling of the real CT's training items")
    ap.add_argument("--empty-fraction", type=float, default=0.3,
                    help="per class: slices without the organ, as a fraction of the slices with it")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sequential", action="store_true", help="run stages 0 and 1 one after the other")
    ap.add_argument("--only-stage", type=int, default=None, choices=[0, 1, 2])
    ap.add_argument("--skip-stage0", action="store_true")
    ap.add_argument("--skip-stage1", action="store_true")
    ap.add_argument("--skip-stage2", action="store_true")
    ap.add_argument("--stage2-resume-minutes", type=float, default=None,
                    help="resume stage 2 from WORK/arseg_stage2 (its .train.pt) up to this total wall-time budget")
    ap.add_argument("--eval-n", type=int, default=16, help="samples of the consensus (N = 1 is read from the same run)")
    ap.add_argument("--eval-phantoms", type=int, default=2, help="unseen abdomen phantoms (seeds 1000+), besides the val ones")
    ap.add_argument("--eval-negatives", type=int, default=1, help="unseen pelvis and thorax phantoms each")
    ap.add_argument("--eval-val-phantoms", action="store_true", help="also the phantoms held out for validation")
    ap.add_argument("--eval-thorax", action="store_true", help="also unseen thorax phantoms as negatives")
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--eval-part", default=None, choices=["organs", "phantoms", "negatives", "unlabelled", "vq"],
                    help="evaluate this part of the shipped file only, into WORK/eval_PART.json, and exit")
    ap.add_argument("--msa2net", default=str(HERE / "msa2net_demo.safetensors"))
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.only_stage is not None:
        run_stage(args, args.only_stage, work)
        return 0
    if args.eval_part is not None:
        torch.set_num_threads(args.threads)
        t0 = time.time()
        r = evaluate_all(args, Path(args.out), work, args.eval_part)
        r["wall_s"] = round(time.time() - t0, 1)
        (work / f"eval_{args.eval_part}.json").write_text(json.dumps(r, indent=2, default=str))
        return 0
    raw = list(argv if argv is not None else sys.argv[1:])
    command = "python models/train_arseg_demo.py " + " ".join(shlex.quote(a) for a in raw)
    t0 = time.time()
    # stages 0 and 1 do not depend on each other
    todo = [s for s in (0, 1) if not getattr(args, f"skip_stage{s}")]
    if len(todo) == 2 and not args.sequential:
        base = [sys.executable, __file__, *raw]
        procs = [subprocess.Popen(base + ["--only-stage", str(s)]) for s in todo]
        if any(pr.wait() != 0 for pr in procs):
            raise SystemExit("a stage failed")
    else:
        for s in todo:
            run_stage(args, s, work)
    if not args.skip_stage2:
        run_stage(args, 2, work)
    train_wall = time.time() - t0

    # ---- the shipped fp16 file, with every stage's summary
    from napari_genseg.models.checkpoints import load_checkpoint, save_checkpoint

    provs = {s: load_checkpoint(work / f"arseg_stage{s}.safetensors").provenance for s in (0, 1, 2)}
    ck = load_checkpoint(work / "arseg_stage2.safetensors")
    prov = dict(ck.provenance)
    stages = {f"stage{s}": _loss_summary(provs[s]) for s in (0, 1, 2)}
    prov.update(script="models/train_arseg_demo.py", command=command, weights_dtype="float16", stages=stages)
    out = Path(args.out)
    save_checkpoint(out, ck.model, ck.family, ck.config_name, ck.config, ck.class_names, ck.input, prov, half=True)
    size_mb = out.stat().st_size / 1e6

    if args.skip_eval:
        return 0
    # three evaluation parts in parallel processes (one thread each)
    t1 = time.time()
    base = [sys.executable, __file__, *[a for a in raw if not a.startswith("--skip-stage")]]
    parts = ("organs", "phantoms", "negatives", "unlabelled") if args.eval_phantoms > 1 else (
        "organs", "negatives", "unlabelled")
    procs = [subprocess.Popen(base + ["--eval-part", part]) for part in parts]
    if any(pr.wait() != 0 for pr in procs):
        raise SystemExit("an evaluation part failed")
    ev = merge_eval([json.loads((work / f"eval_{part}.json").read_text()) for part in parts], parts)
    ev["eval_wall_s"] = round(time.time() - t1, 1)
    ev.update(stages=stages, train_wall_s=round(train_wall, 1), size_mb=round(size_mb, 2), command=command,
              total_wall_s=round(time.time() - t0, 1))
    (work / "arseg_demo_eval.json").write_text(json.dumps(ev, indent=2, default=str))
    print(json.dumps(ev, indent=2, default=str), file=sys.stderr)
    print(f"wrote {out} ({size_mb:.1f} MB); evaluation in {work / 'arseg_demo_eval.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
