"""``genseg`` command line: segment, info, models, import, export, demo, redraw (``redraw_cli``;
train/evaluate in training/).

Errors: a mistake in what the user gave (a missing or unreadable file, an output that would
overwrite the input, an unwritable folder, a bad option, an unusable checkpoint) is raised as
:class:`~napari_genseg.errors.InputError` where the input is checked and ends the command with
"genseg: error: <one line>" and exit status 2. Anything else is a bug and keeps its traceback.
Files and folders are checked before torch is imported or a model is loaded.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from .errors import InputError, one_line

__all__ = ["main"]


def _fail(msg: str) -> None:
    raise InputError(msg)


# ----------------------------------------------------------------------------- helpers
def _load(case, series: str | None = None):
    """Read one case (a Case from discovery, or a path that must hold one case); the reader's
    warnings go to stderr. Raises VolumeReadError (an InputError) for an unreadable input."""
    from .io import load_volume

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vol = case.load(series) if hasattr(case, "load") else load_volume(case, series_uid=series)
    notes = vol.meta.setdefault("warnings", [])
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
        if str(w.message) not in notes:
            notes.append(str(w.message))
    return vol


def _checked(vol, ckpt, args):
    """Input checks before the model runs (HU distribution, body region; ``checks/``): warnings
    on stderr, ``--hu-offset`` applied. Returns (volume the model sees, InputCheckReport)."""
    from .checks import apply_hu_offset, check_input

    report = check_input(vol, ckpt.body_region)
    want = getattr(args, "hu_offset", None)
    offset = (report.suggested_offset or 0.0) if want == "auto" else (want or 0.0)
    if want == "auto":
        print(f"note: --hu-offset auto: {'added %+g HU to every voxel' % offset if offset else 'no offset needed'}",
              file=sys.stderr)
    if offset:
        vol = apply_hu_offset(vol, offset)
        report = check_input(vol, ckpt.body_region, applied_offset=offset)
    for w in report.warnings:
        if report.suggested_offset is not None and w == report.hu.message:
            w += f": rerun with --hu-offset {report.suggested_offset:g} (or --hu-offset auto)"
        print(f"warning: {w}", file=sys.stderr)
    return vol, report


def _record(vol, ckpt, args, res, report, postprocessing=None) -> dict:
    """What goes into a mask's JSON sidecar besides the input geometry (``run_record.py``);
    ``postprocessing`` defaults to what ``segment_volume`` did (its report, or the settings it
    skipped with ``--no-postprocess``), and its plausibility flags join the warnings."""
    from .run_record import inference_record, model_record

    if postprocessing is None:
        postprocessing = _postprocessing_record(ckpt, res)
    flags = [f["message"] for f in (postprocessing or {}).get("flags", [])]
    return {"model": model_record(ckpt),
            "inference": inference_record(ckpt, args.device, args.precision, args.grid, args.batch_size,
                                          res.z, elapsed_s=res.elapsed, backend=res.backend,
                                          backend_requested=getattr(args, "backend", "torch")),
            "input_checks": report.to_dict(), "postprocessing": postprocessing,
            "warnings": [*vol.meta.get("warnings", []), *report.warnings, *flags]}


def _postprocessing_record(ckpt, res) -> dict:
    """The sidecar's ``"postprocessing"``: the report's dict, or what was declared and skipped."""
    from .postprocessing import disabled_record

    rep = getattr(res, "postprocessing", None)
    if rep is not None:
        return rep.to_dict()
    return disabled_record(getattr(ckpt, "postprocess", {}), "switched off (--no-postprocess)")


def _progress(total: int, desc: str, quiet: bool = False):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="slice", disable=quiet, file=sys.stderr, dynamic_ncols=True)


def _resolve(model: str, checkpoint: str | None, lazy: bool = False):
    """Load the model (a family's shipped checkpoint or ``checkpoint``); its warnings (e.g. a
    partial import's untrained modules) go to stderr. ``lazy``: build the torch model only when
    something reads it (``load_checkpoint``): runs on a cached export never do."""
    from .models.checkpoints import resolve_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = resolve_model(model, checkpoint, device="cpu", lazy=lazy)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return ckpt


def _slices(spec, vol) -> list[int]:
    """``--slices`` checked against the volume (InputError for an empty or out-of-range choice)."""
    from .engine import parse_slices

    try:
        return parse_slices(spec, vol.shape[0])
    except ValueError as exc:  # parse_slices only parses and range-checks the option
        raise InputError(f"--slices {spec}: {exc}") from None


def _check_device(name: str) -> None:
    """A malformed ``--device`` fails here, before the model loads (its fallback warning is
    printed later, where the predictor is made)."""
    from .device import resolve_device

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resolve_device(name)


def _lazy(args) -> bool:
    """Load the checkpoint lazily (``load_checkpoint(lazy=True)``) for any backend but torch: an
    exported model whose export is cached then runs without building the torch model."""
    return getattr(args, "backend", "auto") != "torch"


def _check_backend(args, ckpt) -> None:
    """``--backend onnxruntime`` where it cannot run (not installed, a family that does not
    export, a GPU device) fails here, before any case runs (``predictors.resolve_backend``).
    A lazily loaded checkpoint whose run will need the torch model (no cached export of it, or a
    runtime that samples in torch) is built here too, so weights that cannot be read fail once,
    before any case, as one line."""
    from .predictors import resolve_backend

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runtime = resolve_backend(getattr(args, "backend", "auto"), ckpt.family, args.device, args.precision)
    if getattr(ckpt, "built", True):
        return
    from .export import cached_onnx_path

    quantization = "int8" if runtime == "onnxruntime-int8" else None
    if runtime == "torch" or ckpt.family == "arseg" or not cached_onnx_path(ckpt, "model", quantization).is_file():
        ckpt.model  # noqa: B018 -- raises CheckpointError (one line) for weights that do not load


def _embedding_cache_options(args, ckpt) -> dict:
    """``--embedding-cache DIR|off`` as predictor options (AR-Seg only); raises InputError for another
    family or an unwritable folder, before any work."""
    value = getattr(args, "embedding_cache", None)
    if value is None:
        return {}
    from .predictors import predictor_options
    from .predictors.embedding_cache import EmbeddingCache

    if "embedding_cache" not in predictor_options(ckpt.family):
        _fail(f"--embedding-cache applies to AR-Seg models, not {ckpt.family}")
    EmbeddingCache.from_option(value)  # the folder must be writable
    return {"embedding_cache": value}


def _check_inputs_exist(cases: list[Path]) -> None:
    missing = [c for c in cases if not c.exists()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        _fail(f"no such file or folder: {missing[0]}{more}")


def _check_outputs(targets: list[Path], sources: list[Path], kinds: list[str] | None = None) -> None:
    """Every output folder can be written (a file is created and removed there), no output is one of
    the inputs, and no output's JSON sidecar would overwrite an input, an input's sidecar or any
    file that is not that output's own previous sidecar (``io.sidecar.check_sidecar_free``).
    ``kinds``: what each source is, for the message (default "the source image")."""
    from .io.atomic import check_writable_folder, same_file
    from .io.sidecar import check_sidecar_free

    kinds = kinds or ["the source image"] * len(sources)
    for folder in dict.fromkeys(t.parent for t in targets):
        check_writable_folder(folder)
    for t in targets:
        for src, kind in zip(sources, kinds):
            if same_file(t, src):
                _fail(f"refusing to overwrite {kind} {t}: choose another --out")
        if str(t).lower().endswith((".nii", ".nii.gz", ".dcm")):
            check_sidecar_free(t, sources)


def segment_volume(vol, ckpt, args, desc: str):
    """Run ``ckpt`` over ``vol`` with the run options of ``args``; a progress bar on stderr.

    Then, unless ``args.postprocess`` is False (``--no-postprocess``), the 3-D post-processing
    declared in the checkpoint runs on the whole volume (``postprocessing.postprocess``): the
    result's labels are the cleaned ones, ``res.postprocessing`` holds the report, and one line
    per class plus its plausibility flags (as warnings) go to stderr."""
    from .engine import run_volume
    from .predictors import make_predictor

    from .threads import configure_threads

    zs = _slices(args.slices, vol)

    configure_threads(getattr(args, "threads", None))
    pred = make_predictor(ckpt, device=args.device, precision=args.precision, grid_mode=args.grid,
                          backend=getattr(args, "backend", "auto"), **_embedding_cache_options(args, ckpt))
    gen = run_volume(pred, vol, slices=zs, batch_size=args.batch_size)
    bar = _progress(len(zs), desc, args.quiet)
    try:
        while True:
            try:
                p = next(gen)
            except StopIteration as stop:
                res = stop.value
                break
            bar.total = p.total
            bar.update(len(p.z))
    finally:
        bar.close()
    # the predictor (its ONNX Runtime session and arena, or torch's buffers) goes before the
    # whole-volume post-processing allocates: the run's peak memory is one of them, not both
    del gen, pred
    from .engine import trim_heap

    trim_heap()  # the session's weights and the freed activations leave the RSS now
    if getattr(args, "postprocess", True):
        from .postprocessing import postprocess

        res.labels, res.postprocessing = postprocess(res.labels, ckpt.class_names,
                                                         getattr(ckpt, "postprocess", None), vol,
                                                         in_place=True)  # raw labels not kept
        for line in res.postprocessing.lines():
            print(line, file=sys.stderr)
        for w in res.postprocessing.warnings:
            print(f"warning: {w}", file=sys.stderr)
    return res


# ----------------------------------------------------------------------------- commands
def cmd_info(args) -> int:
    import numpy as np

    vol = _load(args.input, args.series)
    d = vol.data
    print(f"file:        {args.input}")
    print(f"format:      {vol.meta.get('format')}")
    print(f"shape:       {vol.shape} (z, y, x); stored {vol.source_shape}")
    print(f"spacing:     {tuple(round(s, 4) for s in vol.spacing)} mm (z, y, x)")
    print(f"orientation: stored {vol.orientation}; shown as LPS (radiological axial view)")
    if vol.meta.get("oblique"):
        print(f"oblique:     yes ({vol.meta['obliquity_deg']} deg; shown on the closest axes)")
    print(f"origin:      {tuple(round(o, 3) for o in vol.origin)} mm (S, P, L of voxel 0)")
    from .checks import check_input, slice_regions

    chk = check_input(vol)
    label = "HU range:   " if chk.hu.ok else "value range:"
    print(f"{label} {float(np.min(d)):.1f} .. {float(np.max(d)):.1f} (dtype {d.dtype})")
    if vol.meta.get("format") == "dicom":
        print(f"series:      {vol.meta.get('series_description')!r} {vol.meta.get('n_slices')} slices")
    if chk.hu.ok:
        air = f"air peak {chk.hu.air_peak_hu:.0f}" if chk.hu.air_peak_hu is not None else "no air"
        print(f"intensity:   CT in HU ({air}, soft tissue peak {chk.hu.tissue_peak_hu:.0f})")
    else:
        print(f"intensity:   NOT HU: {chk.hu.message.split(': ', 1)[1]}")
        if chk.suggested_offset is not None:
            print(f"             suggested: --hu-offset {chk.suggested_offset:g}")
    shift = 0.0 if chk.hu.ok else chk.suggested_offset
    if shift is not None:
        per = list(slice_regions(d, vol.spacing, shift).values())
        counts = {r: per.count(r) for r in ("abdomen", "thorax", "head/neck", "limbs", None) if per.count(r)}
        text = ", ".join(f"{k or 'no body'} {v}" for k, v in counts.items())
        print(f"body region: {text} of {len(per)} slices checked" + (f" (with {shift:+g} HU)" if shift else ""))
    for w in vol.meta.get("warnings", []):
        print(f"warning:     {w}")
    return 0


def _cases(inputs: list[str]):
    """What the inputs hold (io.discovery: NIfTI, DICOM folder/file/DICOMDIR, cohort, .txt list)."""
    from .io import VolumeReadError, discover_inputs

    try:
        found = discover_inputs(inputs)
    except VolumeReadError as exc:
        _fail(str(exc))
    for n in found.notes:
        print(f"warning: {n}", file=sys.stderr)
    return found


def cmd_segment(args) -> int:
    from .threads import configure_threads

    found = _cases(args.input)
    cases = found.cases
    single = (len(cases) == 1 and not Path(args.out).is_dir()
              and str(args.out).lower().endswith((".nii", ".nii.gz", ".dcm")))
    if args.series and len(cases) > 1:
        _fail(f"--series picks a series of one case; the inputs hold {len(cases)} cases")
    out_dir = Path(args.out)
    if not single and out_dir.suffix in (".nii", ".gz"):
        _fail("several cases need --out to be a folder")
    rank, world = _dist_rank_world()
    mine = cases if single else cases[rank::world]
    fmt = getattr(args, "out_format", "auto")
    seg = fmt == "dicom-seg" or (fmt == "auto" and single and str(args.out).lower().endswith(".dcm"))
    if single and seg != str(args.out).lower().endswith(".dcm"):
        _fail(f"--out-format {fmt} does not match --out {Path(args.out).name}: a DICOM SEG ends with .dcm")
    targets = [out_dir] if single else [out_dir / (f"{c.name}_seg.dcm" if seg else f"{c.name}_mask.nii.gz")
                                        for c in mine]
    # files and folders first: no torch import, no model load for a typo
    _check_inputs_exist([c.path for c in mine])
    _check_outputs(targets, [c.path for c in cases])
    if getattr(args, "roi", None) and not single:
        _fail("--roi segments a box of one image: give one input case and --out FILE")
    if single:
        vol = _load(cases[0], args.series)
        if seg and vol.meta.get("format") != "dicom":
            _fail("DICOM SEG needs a DICOM source: use --out NAME.nii.gz for this input")
        _slices(args.slices, vol)
        box = _roi_box(args, vol)
        _check_device(args.device)
        ckpt = _resolve_roi(args) if box is not None else _resolve(args.model, args.checkpoint, _lazy(args))
        _check_backend(args, ckpt)
        _embedding_cache_options(args, ckpt)
        args.threads = configure_threads(args.threads)
        vol, report = _checked(vol, ckpt, args)
        if box is not None:
            res, extra = segment_roi(vol, ckpt, args, box)
            rec = _record(vol, ckpt, args, res, report, extra.pop("postprocessing"))
            rec["roi"] = extra
            rec["warnings"] += extra["warnings"]
            _write_result(args.out, res, vol, ckpt, rec, seg)
            print(f"wrote {args.out} (box {box}, {extra['voxels']} voxels of {extra['target_class']}"
                  f", {res.elapsed:.1f} s)", file=sys.stderr)
            return 0
        _refuse_roi_checkpoint(ckpt)
        res = segment_volume(vol, ckpt, args, cases[0].name)
        _write_result(args.out, res, vol, ckpt, _record(vol, ckpt, args, res, report), seg)
        print(f"wrote {args.out} ({len(res.z)} slices, {res.slices_per_second:.2f} slices/s, "
              f"classes {', '.join(ckpt.class_names)})", file=sys.stderr)
        return 0
    _check_device(args.device)
    ckpt = _resolve(args.model, args.checkpoint, _lazy(args))
    _refuse_roi_checkpoint(ckpt)
    _check_backend(args, ckpt)
    _embedding_cache_options(args, ckpt)
    args.threads = configure_threads(args.threads)  # once per run: every case uses the same count
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = 0
    cohort = _cohort_record(out_dir, ckpt, args, rank, world)
    for case, target in zip(mine, targets):
        entry = {"input": str(case.path), "mask": target.name}
        cohort["cases"].append(entry)
        if target.exists() and not args.overwrite:
            print(f"skip {case.name}: {target.name} exists", file=sys.stderr)
            entry["status"] = "skipped: mask exists"
            continue
        try:
            vol = _load(case, args.series)
            vol, report = _checked(vol, ckpt, args)
            res = segment_volume(vol, ckpt, args, case.name)
            rec = _record(vol, ckpt, args, res, report)
            _write_result(target, res, vol, ckpt, rec, seg)
            entry.update(status="written", warnings=rec["warnings"])
            print(f"wrote {target}", file=sys.stderr)
        except InputError as exc:  # one bad case does not stop a cohort; a bug does
            failed += 1
            entry.update(status="failed", error=str(exc))
            print(f"error: {case.name} ({case.path}): {exc}", file=sys.stderr)
        finally:
            _write_cohort(cohort, out_dir, rank)
    _write_cohort(cohort, out_dir, rank)
    if failed:
        print(f"{failed} of {len(mine)} cases failed", file=sys.stderr)
        return 1
    return 0


def _roi_box(args, vol):
    """``--roi`` checked against the displayed (z, y, x) array (RoiError, an InputError), or None."""
    if not getattr(args, "roi", None):
        return None
    from .roi import parse_roi

    if args.slices:
        _fail("--roi already chooses the slices (z0:z1): drop --slices")
    return parse_roi(args.roi, vol.shape)


def _resolve_roi(args):
    """The checkpoint of ``--roi``: ``--checkpoint``, else the shipped ROI demo for ``--model arseg``."""
    if args.checkpoint is None and args.model == "arseg":
        from .predictors.arseg_roi import ROI_DEMO, shipped_roi_checkpoint

        path = shipped_roi_checkpoint()
        if path is None:
            _fail(f"--roi needs a crop-trained AR-Seg checkpoint ({ROI_DEMO} is not installed): pass --checkpoint")
        return _resolve("arseg", str(path))
    ckpt = _resolve(args.model, args.checkpoint)
    if ckpt.family != "arseg":
        _fail(f"--roi is AR-Seg's region-of-interest mode; {ckpt.family} segments whole slices (drop --roi)")
    return ckpt


def _refuse_roi_checkpoint(ckpt) -> None:
    """A crop-trained checkpoint sees a whole slice as a 5 cm crop: refuse it without --roi."""
    from .predictors.arseg_roi import roi_meta

    meta = roi_meta(ckpt)
    if meta is not None:
        _fail(f"{ckpt.path.name if ckpt.path else ckpt.config_name} was trained on {meta['fov_mm']:g} mm regions "
              f"of interest: pass --roi z0:z1,y0:y1,x0:x1")


def segment_roi(vol, ckpt, args, box):
    """AR-Seg ROI mode on ``box`` (``predictors.arseg_roi``): a full-size label volume, zero outside
    the box, as an ``engine.VolumeResult``, and what the sidecar records of the ROI run (box, field
    of view, zoom, N, seed, warnings; post-processing is not run on a box)."""
    import numpy as np

    from .engine import VolumeResult
    from .postprocessing import disabled_record
    from .predictors.arseg_roi import ArSegRoiPredictor
    from .threads import configure_threads

    configure_threads(getattr(args, "threads", None))
    pred = ArSegRoiPredictor.from_checkpoint(ckpt, device=args.device, precision=args.precision)
    bar = _progress(box.shape[0], "ROI", args.quiet)
    try:
        out = pred.run(vol.data, vol.spacing, box, batch_size=args.batch_size,
                       progress=lambda done, total: bar.update(done - bar.n))
    finally:
        bar.close()
    for w in out.warnings:
        print(f"warning: {w}", file=sys.stderr)
    labels = np.zeros(vol.shape, np.uint8)
    out.paste(labels)
    res = VolumeResult(labels=labels, z=list(range(box.z0, box.z1)), cancelled=False, elapsed=out.elapsed,
                       class_names=list(ckpt.class_names), backend="torch")
    extra = {"box": str(box), "box_axes": "z0:z1,y0:y1,x0:x1 voxel indices of the displayed (z, y, x) array",
             "fov_mm": out.crop.fov_mm, "trained_fov_mm": pred.fov_mm, "zoom": out.crop.zoom,
             "n_samples": pred.n, "seed": pred.base.seed, "target_class": ckpt.class_names[pred.target_class],
             "voxels": int((labels > 0).sum()), "warnings": list(out.warnings),
             "postprocessing": disabled_record(getattr(ckpt, "postprocess", {}), "not run in ROI mode (--roi)")}
    return res, extra


def _write_result(target, res, vol, ckpt, rec: dict, seg: bool) -> None:
    """The model's labels as NIfTI on the source geometry, or (``seg``) as a DICOM SEG of the
    source series (``io.dicom_seg``; InputError for a non-DICOM source); sidecar beside either."""
    from .io import write_mask

    if not seg:
        write_mask(target, res.labels, like=vol, record=rec)
        return
    from .io.dicom_seg import write_dicom_seg

    write_dicom_seg(target, res.labels, vol, ckpt.class_names, record=rec,
                    algorithm={"name": f"{ckpt.family} {ckpt.config_name}",
                               "checkpoint_sha256": rec["model"].get("checkpoint_sha256")})


def _cohort_record(out_dir, ckpt, args, rank, world) -> dict:
    from .io.sidecar import output_record
    from .run_record import inference_record, model_record

    return output_record(out_dir, model=model_record(ckpt),
                         inference=inference_record(ckpt, args.device, args.precision, args.grid,
                                                    args.batch_size, None, backend=args.backend),
                         postprocessing={"enabled": bool(getattr(args, "postprocess", True)),
                                         "declared": dict(getattr(ckpt, "postprocess", {}) or {})},
                         extra={"kind": "cohort", "rank": rank, "world_size": world,
                                "hu_offset": args.hu_offset, "cases": []})


def _write_cohort(record, out_dir, rank) -> None:
    from .io.sidecar import cohort_sidecar_path, write_sidecar

    write_sidecar(cohort_sidecar_path(out_dir, rank), record)


def _dist_rank_world() -> tuple[int, int]:
    """Split cohorts across torchrun ranks (no process group needed)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def cmd_models(args) -> int:
    from .models import registry
    from .models.checkpoints import peek_class_names, shipped_checkpoint

    rows = []
    for fam in registry.list_families():
        ck = shipped_checkpoint(fam.name)
        # the JSON sidecar is enough for the class names; no need to build and load the model
        classes = ", ".join(peek_class_names(fam.name)) if ck is not None else "-"
        rows.append((fam.name, "(family)", "", classes, str(ck) if ck else "no shipped checkpoint"))
        for e in registry.list_configs(fam.name):
            import torch

            with torch.device("meta"):
                n = registry.count_parameters(fam.build(e.config))
            rows.append(("", e.name + (" [paper]" if e.paper else ""), f"{n / 1e6:.2f} M",
                         f"{e.config.num_classes} classes", e.description))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(r[i].ljust(w[i]) for i in range(4)) + "  " + r[4])
    return 0


def cmd_import(args) -> int:
    from .io.atomic import check_writable_folder, same_file

    src, out = Path(args.checkpoint), Path(args.out)
    if not src.is_file():
        _fail(f"checkpoint not found: {src}")
    if same_file(out, src) or same_file(out.with_suffix(".json"), src):
        _fail(f"--out {out} would overwrite the official checkpoint")
    check_writable_folder(out.parent)

    from .models.checkpoints import PartialImportError, import_official_checkpoint

    try:
        path, report = import_official_checkpoint(args.family, src, out, class_names=args.classes,
                                                  allow_partial=args.allow_partial)
    except PartialImportError as exc:
        print(exc.report)
        raise
    print(report)
    print(f"wrote {path}")
    if not report.ok:
        untrained = _peek_untrained(path)
        print(f"warning: {path.name} is partial: {', '.join(untrained) or 'no module'} kept random weights "
              f"(recorded in {path.with_suffix('.json').name}; loading it warns)", file=sys.stderr)
    return 0


def _peek_untrained(path: Path) -> list[str]:
    import json

    return list(json.loads(path.with_suffix(".json").read_text()).get("untrained", []))


def cmd_export(args) -> int:
    from .io.atomic import check_writable_folder

    check_writable_folder(args.out)
    ckpt = _resolve(args.model, args.checkpoint)
    from .export import export_checkpoint

    for path in export_checkpoint(ckpt, args.out, args.format):
        print(f"wrote {path}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args)


def _count(minimum: int):
    """argparse type: an integer >= ``minimum`` (argparse reports others with exit status 2)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{v} is below {minimum}")
        return v

    return parse


def _hu_offset_arg(value: str):
    """argparse type of ``--hu-offset``: a number of HU or "auto" (``checks.parse_hu_offset``)."""
    from .checks import parse_hu_offset

    try:
        return parse_hu_offset(value)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="genseg", description="napari-genseg: CT segmentation with MSA²Net, MARSeg, AR-Seg")
    sub = ap.add_subparsers(dest="cmd", required=True)

    def run_opts(p):
        p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
        p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                       help="auto = fp32 on cpu, bf16/fp16 autocast on GPU; bf16 on a cpu runs only where "
                            "it computes bf16 natively (x86 AVX512_BF16/AMX, Arm BF16), else fp32 with a warning")
        p.add_argument("--backend", default="auto",
                       choices=["auto", "torch", "onnxruntime", "onnxruntime-int8", "openvino"],
                       help="auto = ONNX Runtime when napari-genseg[onnx] is installed and the model exports "
                            "(MSA²Net, MARSeg; AR-Seg encoder and decoder; cpu, fp32), else torch; "
                            "onnxruntime-int8 = MSA²Net/MARSeg with int8 MatMul weights (opt-in; masks "
                            "not identical to fp32); openvino = MSA²Net/MARSeg on OpenVINO "
                            "(napari-genseg[openvino]; opt-in; f32, or bf16 with --precision bf16 where the "
                            "cpu computes bf16 natively); speed measured in benchmarks/backends.md")
        p.add_argument("--batch-size", type=_count(1), default=4)
        p.add_argument("--slices", default=None, help="all (default), 'a:b' (b exclusive) or 'a-b' (inclusive)")
        p.add_argument("--grid", default=None, choices=["resize", "spacing"],
                       help="slice to model grid: the checkpoint's choice by default")
        p.add_argument("--threads", type=_count(0), default=None,
                       help="torch CPU threads; default: the CPUs not busy with other work (README "
                            "'Threads'); 0 = torch's own default (all cores)")
        p.add_argument("--hu-offset", type=_hu_offset_arg, default=None,
                       help="HU added to every voxel before the checks and the model (e.g. -1024 for "
                            "stored values without the rescale offset), or 'auto' = the suggested one")
        p.add_argument("--no-postprocess", dest="postprocess", action="store_false",
                       help="keep the raw mask: skip the 3-D clean-up declared in the checkpoint (largest "
                            "component of single organs, holes filled) and its per-class report")
        p.add_argument("--embedding-cache", default=None, metavar="DIR|off",
                       help="AR-Seg: folder of cached image embeddings (a rerun with another seed or N skips "
                            "the encoder); default $GENSEG_CACHE_DIR/embeddings or ~/.cache/napari-genseg/"
                            "embeddings; 'off' = no cache")
        p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("segment", help="segment a CT (NIfTI or DICOM folder), a folder of cases or a list file")
    p.add_argument("input", nargs="+")
    p.add_argument("--model", default="msa2net", help="family (uses its shipped demo weights) or config name")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--out", required=True,
                   help="mask .nii.gz or DICOM SEG .dcm (one case; .dcm needs a DICOM input) or output folder (cohort)")
    p.add_argument("--series", default=None, help="DICOM SeriesInstanceUID when a folder holds several")
    p.add_argument("--out-format", choices=("auto", "nifti", "dicom-seg"), default="auto",
                   help="auto: by --out's suffix (.dcm = DICOM SEG), NIfTI for a cohort; dicom-seg: "
                        "<case>_seg.dcm per case (DICOM inputs only)")
    p.add_argument("--overwrite", action="store_true", help="cohorts: redo cases whose mask exists")
    p.add_argument("--roi", default=None, metavar="z0:z1,y0:y1,x0:x1",
                   help="AR-Seg region of interest: segment only this box (voxel indices of the displayed "
                        "(z, y, x) array, ends exclusive) with a crop-trained checkpoint (default arseg_roi_demo)")
    run_opts(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("info", help="shape, spacing, orientation and HU range of a CT")
    p.add_argument("input")
    p.add_argument("--series", default=None)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("models", help="list models, configs, parameter counts and checkpoints")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("import", help="import an official checkpoint (.pth) into the project format")
    p.add_argument("family", choices=["msa2net", "arseg", "marseg"])
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--classes", nargs="*", default=None, help="class names (default: class0..N)")
    p.add_argument("--allow-partial", action="store_true",
                   help="write the checkpoint even when keys are missing, unexpected or of another shape; "
                        "the modules left untrained are recorded in its JSON and loading it warns")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("export", help="export a model for another runtime (ONNX: MSA²Net, MARSeg; "
                                      "AR-Seg image encoder and mask decoder)")
    p.add_argument("model", help="family (its shipped demo weights) or config name with --checkpoint")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--format", default="onnx", choices=["onnx"])
    p.add_argument("--out", required=True, help="output folder: NAME.onnx (opset 17, dynamic batch; AR-Seg: "
                                                "NAME.image_encoder.onnx, NAME.mask_decoder.onnx, "
                                                "NAME.segmentor_step.onnx) + NAME.json")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="the main job: sample CT + default model, in napari or --headless")
    p.add_argument("--input", default=None,
                   help="default: the shipped real abdomen CT (sample 'Abdominal CT (real)'); 'phantom' = the "
                        "synthetic phantom with reference labels (prints Dice); or a CT path")
    p.add_argument("--model", default="msa2net")
    p.add_argument("--headless", action="store_true",
                   help="print per-class volumes, write the mask (+ JSON sidecar) and an overlay PNG instead of napari")
    p.add_argument("--out", default="genseg-demo", help="output folder for --headless")
    run_opts(p)
    p.set_defaults(func=cmd_demo)

    from .redraw_cli import add_redraw_command

    add_redraw_command(sub, _count, _hu_offset_arg)

    try:
        from .training.cli import add_training_commands
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("napari_genseg.training"):
            raise
    else:
        add_training_commands(sub)
    return ap


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .threads import prefer_passive_wait

    prefer_passive_wait()  # before torch loads its OpenMP runtime (README "Threads")
    ap = build_parser()
    args = ap.parse_args(argv)
    shown = warnings.formatwarning
    warnings.formatwarning = _warning_line  # Python warnings (e.g. the cuda -> cpu fallback) as one line
    try:
        return int(args.func(args) or 0)
    except InputError as exc:
        print(f"genseg: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("genseg: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = shown


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """A Python warning printed by ``genseg`` as the CLI's own warnings are: ``warning: <first line>``
    (no source file, line number or code line)."""
    text = str(message).strip().splitlines()
    return f"warning: {text[0] if text else category.__name__}\n"


if __name__ == "__main__":
    sys.exit(main())
