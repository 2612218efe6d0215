"""Evaluate a checkpoint on labelled volumes: per-case and mean Dice / IoU / HD95 (mm) per class.

The model runs through the inference engine (``predictors.make_predictor`` + ``run_volume``: the same
normalisation, grid and logits mapping the plugin uses). Metrics follow ``metrics.evaluate_labels``
(TransUNet empty-mask conventions). With ``baseline="hu"`` the HU-threshold baseline
(``baselines.hu_baseline``) is scored on the same cases and slices (it always sees the whole volume,
since its connected components are 3-D) and its rows are listed next to the model's.

``slices`` restricts scoring to a slice range of every case (e.g. a held-out block ``"11:19"``).

With ``postprocess=True`` (``genseg evaluate --postprocess``) the model's mask also goes through the
checkpoint's 3-D post-processing (``postprocessing.postprocess``, on the whole volume after all
chosen slices are predicted, as ``genseg segment`` does by default) and is scored as a second method,
``model_postprocessed``, next to the raw ``model`` rows; each case's report is in the result under
``"postprocessing"``.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import numpy as np

from ..errors import InputError
from . import data as D

__all__ = ["evaluate", "format_table", "write_csv", "write_json"]

METRICS = ("dice", "iou", "hd95_mm")


def _model_labels(ckpt, case: D.Case, zs, device, batch_size):
    from ..engine import run_to_end, run_volume
    from ..predictors import make_predictor

    pred = make_predictor(ckpt, device=device, precision="fp32")
    res = run_to_end(run_volume(pred, case.volume, slices=zs, batch_size=batch_size))
    return res.labels


def evaluate(checkpoint, data, label_map=None, baseline: str | None = None, slices=None, device="cpu",
             batch_size: int = 8, both_empty_dice: float = 0.0, phantom_shape=(40, 160, 160),
             phantom_spacing=(3.0, 2.2, 2.2), postprocess: bool = False) -> dict:
    """-> {"checkpoint", "classes", "slices", "rows": [...], "mean": {method: {class: {metric}}}}.

    Data specs, label map and baseline are checked before the checkpoint is loaded; an unusable
    one raises an :class:`~napari_genseg.errors.InputError` (so does a bad checkpoint or a slice
    choice outside a case)."""
    from ..engine import parse_slices
    from ..metrics import evaluate_labels
    from ..models.checkpoints import load_checkpoint

    D.check_data_specs(data, label_map)
    _baselines(baseline)
    ckpt = load_checkpoint(checkpoint, device="cpu") if not hasattr(checkpoint, "model") else checkpoint
    class_names = list(ckpt.class_names)
    classes = {i: n for i, n in enumerate(class_names) if i}
    sources = D.load_sources(data, label_map, class_names, phantom_shape, phantom_spacing)
    cases = [c for src in sources for c in src]
    rows = []
    timing = {}
    post_reports = {}
    for c in cases:
        try:
            zs = parse_slices(slices, c.n_slices)
        except ValueError as exc:  # the --slices option against this case's slice count
            raise InputError(f"{c.name}: slices {slices}: {exc}") from None
        ref = c.labels[zs]
        t0 = time.perf_counter()
        full = _model_labels(ckpt, c, zs, device, batch_size)
        pl = full[zs]
        timing.setdefault("model", 0.0)
        timing["model"] += time.perf_counter() - t0
        methods = {"model": pl}
        if postprocess:
            from ..postprocessing import postprocess as run_post

            t0 = time.perf_counter()
            cleaned, rep = run_post(full, class_names, getattr(ckpt, "postprocess", None), c.volume)
            timing["postprocess"] = timing.get("postprocess", 0.0) + time.perf_counter() - t0
            methods["model_postprocessed"] = cleaned[zs]
            post_reports[c.name] = rep.to_dict()
        for base in _baselines(baseline):
            from ..baselines import BASELINE_CLASSES, hu_baseline

            t0 = time.perf_counter()
            b = np.asarray(hu_baseline(c.image, c.spacing, auto_window=(base == "hu-auto")))
            key = base.replace("-", "_") + "_baseline"
            timing[key] = timing.get(key, 0.0) + time.perf_counter() - t0
            # baseline ids -> this checkpoint's class ids, by name
            lut = np.zeros(int(b.max(initial=0)) + 1, np.uint8)
            for bid, name in BASELINE_CLASSES.items():
                if name in class_names and bid < len(lut):
                    lut[bid] = class_names.index(name)
            methods[key] = lut[b][zs]
        for method, lab in methods.items():
            m = evaluate_labels(lab, ref, c.spacing, classes, both_empty_dice=both_empty_dice)
            for name, vals in m.items():
                rows.append({"case": c.name, "method": method, "class": name,
                             **{k: float(vals[k]) for k in METRICS}})
    mean: dict = {}
    for r in rows:
        mean.setdefault(r["method"], {}).setdefault(r["class"], {k: [] for k in METRICS})
        for k in METRICS:
            mean[r["method"]][r["class"]][k].append(r[k])
    mean = {m: {c: {k: float(np.mean(v)) for k, v in d.items()} for c, d in per.items()} for m, per in mean.items()}
    return {
        "checkpoint": str(getattr(ckpt, "path", checkpoint)),
        "config_name": ckpt.config_name,
        "classes": class_names,
        "data": [data] if isinstance(data, str) else list(data),
        "label_map": label_map,
        "slices": slices,
        "cases": [c.name for c in cases],
        "rows": rows,
        "mean": mean,
        "seconds": {k: round(v, 2) for k, v in timing.items()},
        **({"postprocessing": post_reports} if postprocess else {}),
    }


BASELINES = ("hu", "hu-auto", "both")


def _baselines(baseline: str | None) -> list[str]:
    """hu = fixed 40..150 HU window (contrast-enhanced CT); hu-auto = window centred on the
    scan's soft-tissue mode (fair on non-contrast CT); both = the two side by side."""
    if not baseline:
        return []
    if baseline not in BASELINES:
        raise InputError(f"unknown baseline {baseline!r} ({', '.join(BASELINES)})")
    return ["hu", "hu-auto"] if baseline == "both" else [baseline]


def _fmt(v: float, nd=3) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def format_table(result: dict) -> str:
    mw = max([16, *(len(m) for m in result["mean"])])
    head = f"{'case':<28} {'method':<{mw}} {'class':<10} {'Dice':>7} {'IoU':>7} {'HD95 mm':>9}"
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        lines.append(f"{r['case'][:28]:<28} {r['method']:<{mw}} {r['class']:<10} {_fmt(r['dice']):>7} "
                     f"{_fmt(r['iou']):>7} {_fmt(r['hd95_mm'], 1):>9}")
    lines.append("-" * len(head))
    for method, per in result["mean"].items():
        for cls, m in per.items():
            lines.append(f"{'MEAN':<28} {method:<{mw}} {cls:<10} {_fmt(m['dice']):>7} {_fmt(m['iou']):>7} "
                         f"{_fmt(m['hd95_mm'], 1):>9}")
    return "\n".join(lines)


def write_csv(result: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["case", "method", "class", *METRICS])
        w.writeheader()
        for r in result["rows"]:
            w.writerow(r)
        for method, per in result["mean"].items():
            for cls, m in per.items():
                w.writerow({"case": "MEAN", "method": method, "class": cls, **m})
    return path


def write_json(result: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return path
