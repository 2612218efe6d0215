"""``genseg redraw``: AR-Seg redraws the finer scales of an edited mask, slice by slice (issue 13).

For batch experiments with :meth:`~napari_genseg.predictors.arseg.ArSegPredictor.redraw`: the
edited labels (a NIfTI on the image's grid, e.g. a ``genseg segment`` mask corrected in any editor)
give, on every chosen slice that holds the target, the mask whose scales 1..k AR-Seg keeps (VQ
tokens, teacher-forced); scales k+1..K are sampled N times on the slice's image embedding and the
N-sample consensus replaces the target's voxels of that slice (inside ``--box`` only, when given):
only background and the target's own voxels change (``predictors.arseg.paste_target``); every
other label and every voxel outside the redrawn region is copied unchanged. The edited labels are
read by the label-file rules of ``genseg evaluate`` (``io.labels.labels_for_image``); the CT gets
``genseg segment``'s input checks and ``--hu-offset`` (``cli._checked``). The output (NIfTI + JSON
sidecar with the model, the inference settings, the input checks, the warnings and the redraw's
options and per-slice times) is written atomically by ``io.write_mask``; neither the image, the
edited labels nor their sidecars are ever overwritten. Backend: torch only (the cache entries of
ONNX Runtime runs are not reused).

With a crop-trained checkpoint (``input.roi`` in its JSON, e.g. ``arseg_roi_demo``) ``--box`` is the
region of interest and ``ArSegRoiPredictor.redraw`` runs in it (ROI mode).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .errors import InputError

__all__ = ["add_redraw_command", "cmd_redraw", "MAX_IDS"]

#: most distinct ids an edited label file may hold (more: an image given as labels)
MAX_IDS = 1000


def _fail(msg: str) -> None:
    raise InputError(msg)


def add_redraw_command(sub, count, hu_offset) -> None:
    """Register ``genseg redraw`` on the ``genseg`` subparsers; ``count(min)`` is the CLI's integer type,
    ``hu_offset`` its ``--hu-offset`` type."""
    p = sub.add_parser("redraw", help="AR-Seg: keep an edited mask's coarse scales 1..k, redraw scales k+1..K")
    p.add_argument("input", help="the CT (NIfTI or DICOM) the edited labels belong to")
    p.add_argument("--model", default="arseg",
                   help="arseg (the shipped demo; with --box and a crop-trained --checkpoint: ROI mode), an AR-Seg "
                        "config name with --checkpoint, or a checkpoint file (.safetensors)")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--edited", required=True, help="edited labels (NIfTI; integer ids >= 0; another grid is resampled onto the image "
                        "with a warning, as genseg evaluate reads label files)")
    p.add_argument("--from-scale", dest="from_scale", type=count(1), required=True,
                   help="k: scales 1..k of the edited mask are kept (1 <= k < K = 8)")
    p.add_argument("--target", default=None,
                   help="class name (or id) of the checkpoint to redraw (default: its first class)")
    p.add_argument("--edited-label", dest="edited_label", type=count(1), default=None,
                   help="label value of the target in the edited file (default: the target's class id)")
    p.add_argument("--n", type=count(1), default=16, help="number of samples N (1..64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threshold", type=float, default=0.5, help="consensus: mean of the N samples > threshold")
    p.add_argument("--slices", default=None, help="all (default), 'a:b' (b exclusive) or 'a-b' (inclusive)")
    p.add_argument("--box", "--box-roi", dest="box", default=None, metavar="z0:z1,y0:y1,x0:x1",
                   help="redraw only inside this box (voxel indices of the displayed (z, y, x) array, ends "
                        "exclusive; the --roi syntax of 'genseg segment'); its z range chooses the slices")
    p.add_argument("--out", required=True, help="output labels .nii.gz (never the input or the edited file)")
    p.add_argument("--series", default=None, help="DICOM SeriesInstanceUID when a folder holds several")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=count(0), default=None, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--hu-offset", type=hu_offset, default=None,
                   help="HU added to every voxel before the checks and the model (e.g. -1024 for stored "
                        "values), or 'auto' = the suggested one; as in genseg segment")
    p.add_argument("--embedding-cache", default=None, metavar="DIR|off",
                   help="folder of cached image embeddings (default: the user cache; 'off' = none)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_redraw)


def _target(ckpt, spec) -> int:
    names = list(ckpt.class_names)
    if spec is None:
        return 1
    if str(spec).isdigit() and 1 <= int(spec) < len(names):
        return int(spec)
    if spec in names[1:]:
        return names.index(spec)
    _fail(f"--target {spec}: not one of the checkpoint's classes {', '.join(names[1:])}")


def _resolve_checkpoint(args):
    from .cli import _resolve

    model, ckpt_path = args.model, args.checkpoint
    if ckpt_path is None and (model.endswith(".safetensors") or Path(model).is_file()):
        model, ckpt_path = "arseg", model
    ckpt = _resolve(model, ckpt_path)
    if ckpt.family != "arseg":
        _fail(f"genseg redraw needs an AR-Seg model, not {ckpt.family}")
    return ckpt


def _edited_labels(vol, path: Path):
    """The edited labels on ``vol``'s voxels through the project's label-file rules
    (``io.labels.labels_for_image``: NaN, negative or non-integer ids refused, another grid resampled
    through both affines with a warning) plus the redraw's own: at most ``MAX_IDS`` distinct ids, all
    <= 65535 (an image given as labels is refused). Returns (ids (z, y, x), warnings)."""
    import warnings

    import numpy as np

    from .io.labels import labels_for_image

    with warnings.catch_warnings(record=True) as caught:  # the reader's (e.g. unknown spacing): one line each
        warnings.simplefilter("always")
        ids, notes = labels_for_image(vol, path, name=f"--edited {path.name}")
    notes = list(dict.fromkeys([*(str(w.message) for w in caught), *notes]))
    n_ids = int(np.unique(ids[:: max(1, ids.shape[0] // 64)]).size)  # every slice counted up to 64 slices
    top = int(ids.max(initial=0))
    if n_ids > MAX_IDS or top > 65535:
        what = f"{n_ids} distinct values" if n_ids > MAX_IDS else f"label id {top}"
        _fail(f"--edited {path.name} is not a label volume ({what}; at most {MAX_IDS} ids, each <= 65535)")
    for w in notes:
        print(f"warning: {w}", file=sys.stderr)
    return ids, notes


def cmd_redraw(args) -> int:
    import warnings

    import numpy as np

    from .cli import _check_device, _check_outputs, _checked, _load, _progress, _slices
    from .io.nifti import is_nifti_path

    src, edited_path, out = Path(args.input), Path(args.edited), Path(args.out)
    for p in (src, edited_path):
        if not p.exists():
            _fail(f"no such file or folder: {p}")
    if not is_nifti_path(out):
        _fail(f"--out {out.name}: the redrawn labels are written as NIfTI (.nii or .nii.gz)")
    _check_outputs([out], [src, edited_path], ["the image", "the edited labels"])
    if not 0.0 < args.threshold < 1.0:
        _fail("--threshold must be between 0 and 1")
    if args.n > 64:
        _fail("--n: the number of samples must be between 1 and 64")
    vol = _load(src, args.series)
    edited, label_notes = _edited_labels(vol, edited_path)
    box = None
    if args.box:
        from .roi import parse_roi

        if args.slices:
            _fail("--box already chooses the slices (z0:z1): drop --slices")
        box = parse_roi(args.box, vol.shape)
        zs = list(range(box.z0, box.z1))
    else:
        zs = _slices(args.slices, vol)
    _check_device(args.device)
    ckpt = _resolve_checkpoint(args)
    from .predictors.arseg_roi import roi_meta

    roi_mode = roi_meta(ckpt) is not None
    if roi_mode and box is None:
        _fail(f"{ckpt.path.name if ckpt.path else ckpt.config_name} was trained on regions of interest: "
              f"pass --box z0:z1,y0:y1,x0:x1")
    target = _target(ckpt, args.target)
    label = args.edited_label if args.edited_label is not None else target
    k_max = int(ckpt.config.num_scales)
    if not 1 <= args.from_scale < k_max:
        _fail(f"--from-scale {args.from_scale}: keep 1..{k_max - 1} scales (the last scale K = {k_max} leaves "
              f"nothing to redraw)")
    todo = [z for z in zs if (edited[z] == label).any()]
    if not todo:
        _fail(f"the edited labels hold no voxel of label {label} on the chosen slices: nothing to redraw")
    vol, report = _checked(vol, ckpt, args)  # HU checks and --hu-offset exactly as genseg segment

    from .threads import configure_threads

    threads = configure_threads(args.threads)
    opts = dict(device=args.device, precision=args.precision, n_samples=args.n, threshold=args.threshold,
                target_class=target, seed=args.seed)
    spacing = tuple(float(s) for s in vol.spacing)
    with warnings.catch_warnings(record=True) as caught:  # e.g. the cuda -> cpu fallback
        warnings.simplefilter("always")
        if roi_mode:
            from .predictors.arseg_roi import ArSegRoiPredictor

            pred = ArSegRoiPredictor.from_checkpoint(ckpt, **opts)
        else:
            from .predictors.arseg import ArSegPredictor

            cache = {} if args.embedding_cache is None else {"embedding_cache": args.embedding_cache}
            pred = ArSegPredictor.from_checkpoint(ckpt, **opts, **cache)
    run_warnings = list(dict.fromkeys(str(w.message) for w in caught))
    if roi_mode:
        run_warnings += pred.zoom_warnings(box, spacing[1:])  # as genseg segment --roi gives it
    for w in run_warnings:
        print(f"warning: {w}", file=sys.stderr)
    from .predictors.arseg import paste_target

    labels = edited.copy()
    per_slice = []
    t_all = time.perf_counter()
    bar = _progress(len(todo), "redraw", args.quiet)
    try:
        for z in todo:
            t0 = time.perf_counter()
            if roi_mode:
                from .roi import RoiBox

                b1 = RoiBox(z, z + 1, box.y0, box.y1, box.x0, box.x1)
                sl = (z, slice(box.y0, box.y1), slice(box.x0, box.x1))
                prev = edited[sl] == label
                res = pred.redraw(vol.data, spacing, b1, prev, args.from_scale, seed=args.seed + z, previous=prev)
            else:
                sl = (z,)
                prev = edited[z] == label
                inplane = None if box is None else (box.y0, box.y1, box.x0, box.x1)
                res = pred.redraw(np.asarray(vol.data[z]), prev, args.from_scale, spacing_yx=spacing[1:],
                                  seed=args.seed + z, box=inplane, previous=prev)
            # only background and the target's own voxels change; other labels are kept
            labels[sl] = paste_target(labels[sl], res.consensus, label)
            per_slice.append({"z": z, "edited_voxels": int(prev.sum()), "redrawn_voxels": int(res.consensus.sum()),
                              "redraw_s": round(res.seconds, 4), "slice_s": round(time.perf_counter() - t0, 4),
                              "embedding_cached": bool(res.embedding_cached)})
            bar.update(1)
    finally:
        bar.close()
    elapsed = time.perf_counter() - t_all
    rec = _record(ckpt, args, todo, elapsed, threads, box, target, label, per_slice, roi_mode)
    rec["input_checks"] = report.to_dict()
    rec["warnings"] = list(dict.fromkeys([*vol.meta.get("warnings", []), *report.warnings, *label_notes,
                                          *run_warnings]))
    from .io import write_mask

    write_mask(out, labels, like=vol, record=rec)
    print(f"wrote {out} ({len(todo)} slices redrawn from scale {args.from_scale}, N = {args.n}, "
          f"{elapsed:.1f} s)", file=sys.stderr)
    return 0


def _record(ckpt, args, zs, elapsed, threads, box, target, label, per_slice, roi_mode) -> dict:
    from .run_record import inference_record, model_record

    return {"model": model_record(ckpt),
            "inference": inference_record(ckpt, args.device, args.precision, None, 1, zs, threads=threads,
                                          elapsed_s=elapsed),
            "redraw": {"edited": str(Path(args.edited).resolve()), "from_scale": args.from_scale,
                       "n_samples": args.n, "seed": args.seed, "seed_rule": "seed + z per slice",
                       "threshold": args.threshold, "target_class": ckpt.class_names[target],
                       "edited_label": label, "box": str(box) if box is not None else None,
                       "roi_mode": roi_mode, "slices": per_slice,
                       "note": "scales 1..k of the edited mask kept (VQ tokens), k+1..K sampled; only background "
                               "and the target's voxels inside the box change, other labels are copied"},
            "warnings": []}
