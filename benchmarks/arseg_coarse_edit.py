#!/usr/bin/env python
"""Measured benefit of "correct the coarse shape, let AR-Seg redraw the details" (issue 13).

A simulated reader corrects AR-Seg's mask at scale k and lets the model redraw scales k+1..K
(``ArSegPredictor.redraw``: the edited mask's VQ tokens of scales 1..k teacher-forced, N samples of
the rest on the slice's cached image embedding, consensus = mean > 0.5). Data never trained on:
unseen phantoms (seeds 1000, 1001, at the demo's evaluation spacing 3 x 2.2 x 2.2 mm, as
``models/train_arseg_demo.py`` evaluates) and the real CT's held-out slices 11..18
(``ct_abdomen_small``; TotalSegmentator ids 5 liver, 1 spleen), liver and spleen.

Per slice and organ (reference area >= ``--min-px`` pixels):

* **before**: Dice of the uncorrected N-sample consensus (``predict``);
* **pasted**: the reference's own coarse mask at scale k (reference -> ``encode_mask`` -> its tokens ->
  ``scale_mask(k)`` on the slice grid), simply pasted: what the coarse fix alone gives;
* **after**: the reader fixes the scale-k mask to exactly that coarse reference and AR-Seg redraws
  scales k+1..K (the edited mask = the pasted one; ``redraw(from_scale=k)``, which re-quantises it);
* **after (ref tokens)**: an upper bound of the same fix: scales 1..k keep the reference's own token
  ids (``redraw(prefix_tokens=...)``), no re-quantisation of the decoded coarse mask;
* **clicks**: greedy clicks at scale ``--click-scale`` starting from the uncorrected consensus: each
  click is the (cell, sign) whose block, set to foreground / background, removes the most wrong
  pixels (the click lands on the wrong pixel nearest to their centroid in that cell), then a redraw
  from that scale with the current consensus as the edited mask and all clicks so far; the number
  of clicks until Dice >= 0.95 (cap ``--click-cap``; "not reached" beyond; the clicks also stop,
  "not reached", after ``--click-patience`` clicks without a new best Dice or when no click would
  remove more wrong pixels than it adds).

Times: a full run (embedding + N samples + decoding, ``set_image`` + ``predict``, no cache) against a
redraw (``RedrawResult.seconds``: the segmentor steps after k + decoding the N masks; the embedding
comes from the last ``set_image``). Dice: ``napari_genseg.metrics.dice`` on the slice's pixels.

Usage::

    .venv/bin/python benchmarks/arseg_coarse_edit.py [--checkpoint models/arseg_demo.safetensors]
        [--n 16] [--threads 1] [--md benchmarks/arseg_coarse_edit.md]

The last line is ``coarse-edit Dice before=B after=A pasted=P`` for the k where after - max(before,
pasted) (means over all organ slices) is largest; the line before it names that k.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real" / "ct-abdomen"
REAL_IDS = {"liver": 5, "spleen": 1}  # TotalSegmentator label ids in ct_abdomen_small_labels
PHANTOM_SPACING = (3.0, 2.2, 2.2)


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=str(ROOT / "models" / "arseg_demo.safetensors"))
    ap.add_argument("--n", type=int, default=16, help="samples per redraw / run (N)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scales", default="2,3,4", help="k of the coarse fix")
    ap.add_argument("--click-scale", type=int, default=6, help="scale of the simulated clicks")
    ap.add_argument("--click-cap", type=int, default=15)
    ap.add_argument("--click-patience", type=int, default=5,
                    help="stop clicking (not reached) after this many clicks without a new best Dice")
    ap.add_argument("--goal", type=float, default=0.95, help="Dice the clicks aim at")
    ap.add_argument("--phantom-seeds", default="1000,1001")
    ap.add_argument("--phantom-slices", type=int, default=1, help="slices per phantom and organ (evenly spaced)")
    ap.add_argument("--real-slices", default="11:19", help="held-out real slices a:b (b exclusive)")
    ap.add_argument("--real-step", type=int, default=2, help="every n-th real slice")
    ap.add_argument("--min-px", type=int, default=150, help="smallest reference area (pixels) scored")
    ap.add_argument("--paper-timing", action="store_true",
                    help="also time a full run vs a redraw from scale 3 with the paper configuration (MedSAM ViT-B "
                         "1024², random weights: times only)")
    ap.add_argument("--md", default=str(ROOT / "benchmarks" / "arseg_coarse_edit.md"),
                    help="markdown report ('' = none)")
    return ap.parse_args(argv)


def _items(args):
    """(data, case, z, slice HU (H, W), spacing_yx, {organ: reference (H, W) bool})."""
    from napari_genseg.io import load_volume
    from napari_genseg.phantom import PHANTOM_CLASSES, make_phantom

    out = []
    for seed in (int(s) for s in args.phantom_seeds.split(",") if s):
        ph = make_phantom(seed=seed, shape=(40, 160, 160), spacing=PHANTOM_SPACING)
        refs = {o: ph.labels == PHANTOM_CLASSES.index(o) for o in ("liver", "spleen")}
        chosen = set()
        for o, m in refs.items():
            zs = [z for z in range(m.shape[0]) if m[z].sum() >= args.min_px]
            if zs:
                idx = np.linspace(0, len(zs) - 1, min(args.phantom_slices, len(zs)) + 2)[1:-1]
                chosen.update(zs[int(round(i))] for i in idx)
        for z in sorted(chosen):
            ref = {o: m[z] for o, m in refs.items() if m[z].sum() >= args.min_px}
            out.append(("phantom", f"phantom_{seed}", z, ph.image[z].astype(np.float32), PHANTOM_SPACING[1:], ref))
    img_p, lab_p = REAL / "ct_abdomen_small.nii.gz", REAL / "ct_abdomen_small_labels.nii.gz"
    if img_p.is_file() and lab_p.is_file():
        img, lab = load_volume(img_p), load_volume(lab_p)
        a, b = (int(v) for v in args.real_slices.split(":"))
        lab_d = np.asarray(lab.data)
        for z in range(a, b, max(1, args.real_step)):
            ref = {o: lab_d[z] == i for o, i in REAL_IDS.items() if (lab_d[z] == i).sum() >= args.min_px}
            if ref:
                out.append(("real", "ct_abdomen_small", z, np.asarray(img.data[z], np.float32),
                            tuple(float(s) for s in img.spacing[1:]), ref))
    else:
        print(f"warning: {REAL} not found: phantoms only", file=sys.stderr)
    return out


def _greedy_clicks(pred, img, sp, ref, start, cls_id, k, args):
    """Clicks at scale k until Dice >= goal: (clicks used or None when not reached, best Dice, seconds).

    Each click is the (cell, sign) that removes the most wrong pixels from the current mask when its
    block is set (positive: fixes the missed pixels, adds the block's background; negative: removes
    the extra pixels and the block's organ pixels), placed on the wrong pixel of that cell nearest to
    their centroid. Stops (not reached) at the cap, after ``--click-patience`` clicks without a new
    best Dice, or when no click would remove more wrong pixels than it adds."""
    from napari_genseg.metrics import dice

    cells = pred.scale_cells(k, img.shape, sp)
    ok = cells >= 0
    nc = int(cells.max()) + 1
    n_ref = np.bincount(cells[ok & ref], minlength=nc)
    n_bg = np.bincount(cells[ok & ~ref], minlength=nc)
    cons, clicks, secs = start, [], []
    d = dice(cons, ref)
    best, since = d, 0
    while d < args.goal:
        if len(clicks) >= args.click_cap or since >= args.click_patience:
            return None, best, secs
        fn, fp = ref & ~cons & ok, cons & ~ref & ok
        err = np.bincount(cells[fn | fp], minlength=nc)
        gain_pos, gain_neg = err - n_bg, err - n_ref
        positive = gain_pos.max() >= gain_neg.max()
        gain = gain_pos if positive else gain_neg
        if gain.max() <= 0:
            return None, best, secs
        cell = int(np.argmax(gain))
        pts = np.argwhere((fn if positive else fp) & (cells == cell))
        y, x = pts[np.argmin(((pts - pts.mean(0)) ** 2).sum(1))]
        clicks.append((int(y), int(x), bool(positive)))
        r = pred.redraw(img, cons, k, spacing_yx=sp, target_class=cls_id, n_samples=args.n,
                        seed=args.seed + len(clicks), clicks=clicks)
        secs.append(r.seconds)
        cons = r.consensus
        d = dice(cons, ref)
        best, since = (d, 0) if d > best else (best, since + 1)
    return len(clicks), max(best, d), secs


def main(argv=None) -> int:
    args = _args(argv)
    torch.set_num_threads(args.threads)
    from napari_genseg.device import cpu_model_name
    from napari_genseg.metrics import dice
    from napari_genseg.models.checkpoints import load_checkpoint
    from napari_genseg.predictors.arseg import ArSegPredictor

    t_start = time.perf_counter()
    ck = load_checkpoint(args.checkpoint)
    names = list(ck.class_names)
    pred = ArSegPredictor.from_checkpoint(ck, device="cpu", precision="fp32", n_samples=args.n, seed=args.seed,
                                          embedding_cache="off")
    scales = [int(s) for s in args.scales.split(",")]
    items = _items(args)
    rows, full_s, redraw_s, cached, embed_s = [], [], [], [], []
    for data, case, z, img, sp, refs in items:
        t0 = time.perf_counter()
        pred.set_image(img[None], sp)
        embed_s.append(time.perf_counter() - t0)
        first = True
        for organ, ref in refs.items():
            cls_id = names.index(organ)
            pred.target_class = cls_id
            pred.generator.manual_seed(args.seed)
            out = pred.predict()
            if first:
                full_s.append(time.perf_counter() - t0)  # embedding + N samples + decoding
                first = False
            cons = out["labels"][0] > 0
            row = {"data": data, "case": case, "z": z, "organ": organ, "before": dice(cons, ref)}
            tok = pred.encode_mask(ref, sp)
            for k in scales:
                pasted = pred.scale_mask(tok, k, img.shape, sp)
                r = pred.redraw(img, pasted, k, spacing_yx=sp, target_class=cls_id, n_samples=args.n, seed=args.seed)
                redraw_s.append(r.seconds)
                cached.append(r.embedding_cached)
                row[f"pasted{k}"] = dice(pasted, ref)
                row[f"empty{k}"] = not pasted.any()
                row[f"after{k}"] = dice(r.consensus, ref)
                rt = pred.redraw(img, None, k, spacing_yx=sp, target_class=cls_id, n_samples=args.n,
                                 seed=args.seed, prefix_tokens=tok)
                redraw_s.append(rt.seconds)
                row[f"tok{k}"] = dice(rt.consensus, ref)
            n_clicks, d_end, secs = _greedy_clicks(pred, img, sp, ref, cons, cls_id, args.click_scale, args)
            redraw_s += secs
            row["clicks"], row["clicks_dice"] = n_clicks, d_end
            rows.append(row)
            print(f"{data:7s} {case:17s} z={z:2d} {organ:6s} before {row['before']:.3f} "
                  + " ".join(f"k{k} pasted {row[f'pasted{k}']:.3f} after {row[f'after{k}']:.3f} "
                             f"(ref tokens {row[f'tok{k}']:.3f})" for k in scales)
                  + f" clicks {n_clicks if n_clicks is not None else 'not reached'} ({d_end:.3f})", flush=True)
    paper = _paper_timing(args) if args.paper_timing else None
    total = time.perf_counter() - t_start
    lines, best = _report(rows, scales, args, full_s, redraw_s, cached, total, cpu_model_name(), ck, embed_s)
    if paper:
        lines += ["", f"Paper configuration (`arseg_paper`: MedSAM ViT-B at 1024², random weights, so times only; one "
                  f"phantom slice, N = {args.n}, {torch.get_num_threads()} thread(s)): full run (embedding + sampling + "
                  f"decoding) {paper['full']:.1f} s, of which the image encoder {paper['encoder']:.1f} s; redraw from "
                  f"scale 3 on the cached embedding {paper['redraw']:.1f} s ({paper['full'] / paper['redraw']:.1f}x "
                  f"less; encoder calls during the redraw: {paper['encoder_calls']})."]
    text = "\n".join(lines)
    print(text)
    if args.md:
        from napari_genseg.io.atomic import atomic_path

        with atomic_path(Path(args.md)) as tmp:
            Path(tmp).write_text(text + "\n")
    k, b, a, p = best
    print(f"best k = {k} (largest after - max(before, pasted) of the means over all {len(rows)} organ slices)")
    print(f"coarse-edit Dice before={b:.3f} after={a:.3f} pasted={p:.3f}")
    return 0


def _paper_timing(args) -> dict:
    """Full run vs redraw from scale 3 with the paper configuration (random weights, seeded):
    {'full', 'encoder', 'redraw', 'encoder_calls'} in seconds / calls."""
    from napari_genseg.models import registry
    from napari_genseg.phantom import PHANTOM_CLASSES, make_phantom
    from napari_genseg.predictors.arseg import ArSegPredictor
    from napari_genseg.preprocessing import Normalization, SliceGrid

    torch.manual_seed(0)
    model = registry.create_model("arseg_paper").eval()
    pred = ArSegPredictor(model, ["background", "target"], Normalization(kind="minmax"),
                          SliceGrid.create(model.cfg.img_size, "resize"), device="cpu", precision="fp32",
                          n_samples=args.n, seed=args.seed, embedding_cache="off")
    ph = make_phantom(seed=1000, shape=(40, 160, 160), spacing=PHANTOM_SPACING)
    z = ph.image.shape[0] // 2
    img = np.asarray(ph.image[z], np.float32)
    sp = tuple(float(v) for v in ph.spacing[1:])
    calls, embed = [0, 0.0], pred.embed

    def timed(x):
        t0 = time.perf_counter()
        out = embed(x)
        calls[0] += 1
        calls[1] += time.perf_counter() - t0
        return out

    pred.embed = timed
    t0 = time.perf_counter()
    pred.set_image(img[None], sp)
    pred.predict()
    full, enc = time.perf_counter() - t0, calls[1]
    before = calls[0]
    edited = ph.labels[z] == PHANTOM_CLASSES.index("liver")
    r = pred.redraw(img, edited, 3, spacing_yx=sp, target_class=1, n_samples=args.n, seed=args.seed)
    return {"full": full, "encoder": enc, "redraw": r.seconds, "encoder_calls": calls[0] - before}


def _mean(v):
    return float(np.mean(v)) if len(v) else float("nan")


def _report(rows, scales, args, full_s, redraw_s, cached, total, cpu, ck, embed_s):
    groups = [("phantom", "liver"), ("phantom", "spleen"), ("real", "liver"), ("real", "spleen")]
    lines = ["# AR-Seg: correct the coarse shape, redraw the details (benchmarks/arseg_coarse_edit.py)", "",
             f"Checkpoint `{Path(args.checkpoint).name}` ({ck.config_name}); CPU {cpu}; torch threads "
             f"{torch.get_num_threads()}; N = {args.n}; seed {args.seed}; whole benchmark {total:.0f} s.", "",
             f"Slices: unseen phantoms {args.phantom_seeds} ({args.phantom_slices} evenly spaced slices per phantom "
             f"and organ, reference >= {args.min_px} px), real held-out slices {args.real_slices} every "
             f"{args.real_step} (ct_abdomen_small; liver id 5, spleen id 1); {len(rows)} organ slices in all.", "",
             "Dice on the slice's pixels (mean over slices). before = uncorrected consensus; pasted = the "
             "reference's scale-k mask (reference -> VQ tokens -> decoded from scales 1..k) pasted as is; "
             "after = that coarse mask as the edit, AR-Seg redraws scales k+1..K (N samples, consensus > 0.5). "
             f"Clicks: greedy at scale {args.click_scale} (cells of {384 / args.click_scale:.0f} mm on the demo's 384 mm "
             f"field of view; the block that removes the most wrong pixels) from the uncorrected consensus to Dice >= "
             f"{args.goal} (cap {args.click_cap}, stopped after {args.click_patience} clicks without a new best or "
             "when no click helps): clicks used (slices that reached the goal / all; mean clicks of those; mean best "
             "Dice reached). after (ref tokens): "
             "the same fix keeping the reference's own tokens of scales 1..k (no re-quantisation), an upper bound.",
             "",
             "| data | organ | slices | before | " + " | ".join(f"pasted k={k} | after k={k} | after (ref tokens) k={k}"
                                                            for k in scales) + f" | clicks to {args.goal} |",
             "|---|---|---|---|" + "---|---|---|" * len(scales) + "---|"]
    for data, organ in groups + [("all", "all")]:
        sel = [r for r in rows if (data == "all" or r["data"] == data) and (organ == "all" or r["organ"] == organ)]
        if not sel:
            continue
        reached = [r["clicks"] for r in sel if r["clicks"] is not None]
        end = _mean([r["clicks_dice"] for r in sel])  # best Dice the clicks reached
        clicks = (f"{len(reached)}/{len(sel)} reached, mean {np.mean(reached):.1f} (Dice {end:.3f})" if reached
                  else f"not reached (0/{len(sel)}; Dice {end:.3f})")
        cells = " | ".join(f"{_mean([r[f'pasted{k}'] for r in sel]):.3f} | {_mean([r[f'after{k}'] for r in sel]):.3f}"
                           f" | {_mean([r[f'tok{k}'] for r in sel]):.3f}" for k in scales)
        lines.append(f"| {data} | {organ} | {len(sel)} | {_mean([r['before'] for r in sel]):.3f} | {cells} | {clicks} |")
    best, gain = None, -np.inf
    for k in scales:
        b = _mean([r["before"] for r in rows])
        a = _mean([r[f"after{k}"] for r in rows])
        p = _mean([r[f"pasted{k}"] for r in rows])
        if a - max(b, p) > gain:
            best, gain = (k, b, a, p), a - max(b, p)
    empty = ", ".join(f"k={k}: {sum(r[f'empty{k}'] for r in rows)}/{len(rows)}" for k in scales)
    tok_gain = max((_mean([r[f"tok{k}"] for r in rows]) - max(_mean([r["before"] for r in rows]),
                                                             _mean([r[f"pasted{k}"] for r in rows])), k) for k in scales)
    lines += ["", f"Organ slices whose coarse reference (scale-k mask) is empty: {empty}. There the "
              "re-quantised edit says 'no organ' and the redraw follows it. Keeping the reference's own tokens of "
              f"scales 1..k instead (after (ref tokens)) gains {tok_gain[0]:+.3f} Dice over max(before, pasted) at "
              f"k = {tok_gain[1]}: teacher forcing carries the coarse fix; decoding a partial sum f_hat_k to a binary "
              "mask and re-quantising it loses what small organs look like at coarse scales."]
    lines += ["", f"Times (1 slice, N = {args.n}): full run (embedding + sampling + decoding) "
              f"{_mean(full_s):.2f} s (median {statistics.median(full_s):.2f} s); redraw (segmentor steps after k + "
              f"decoding) {_mean(redraw_s):.2f} s (median {statistics.median(redraw_s):.2f} s) over {len(redraw_s)} "
              f"redraws; embedding reused (no encoder run) in {sum(cached)}/{len(cached)} redraws. The embedding "
              f"(set_image) took {_mean(embed_s):.3f} s of the full run: this checkpoint's light encoder at "
              f"{ck.config.img_size}² is cheap, so a redraw saves little here; with the paper's MedSAM ViT-B encoder "
              "(15-40 s per slice on a CPU, README 'AR-Seg embedding cache') the redraw skips exactly that.",
              "",
              f"Best k by after - max(before, pasted) over all organ slices: k = {best[0]} "
              f"(before {best[1]:.3f}, pasted {best[3]:.3f}, after {best[2]:.3f}; gain {gain:+.3f})."]
    return lines, best


if __name__ == "__main__":
    sys.exit(main())
