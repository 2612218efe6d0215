"""JSON sidecars: every output (a NIfTI mask, a cohort folder) carries a record of what made it.

``case_mask.nii.gz`` gets ``case_mask.json`` beside it (the BIDS habit: same stem, ``.json``); a
cohort output folder gets ``genseg_run.json`` (``genseg_run.rankN.json`` for torchrun rank N > 0)
listing the run's settings and every case. Files are written atomically (``io/atomic.py``), with
numpy scalars/arrays turned into plain JSON. ``io.write_mask`` writes one beside every mask it
writes (``output_record``: package version, input geometry, and whatever the caller ran: model
and inference from :mod:`napari_genseg.run_record`, input checks, warnings, post-processing).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

import numpy as np

from .atomic import atomic_path

__all__ = [
    "SIDECAR_FORMAT",
    "sidecar_path",
    "cohort_sidecar_path",
    "write_sidecar",
    "read_sidecar",
    "package_version",
    "volume_record",
    "output_record",
    "write_output_sidecar",
    "check_sidecar_free",
]

SIDECAR_FORMAT = "napari-genseg-output"


def sidecar_path(output: str | os.PathLike) -> Path:
    """``x.nii.gz`` / ``x.nii`` -> ``x.json`` beside it; a folder -> ``folder/genseg_run.json``."""
    p = Path(output)
    if p.is_dir():
        return cohort_sidecar_path(p)
    name = p.name
    for suf in (".nii.gz", ".nii", ".dcm"):
        if name.endswith(suf):
            return p.with_name(name[: -len(suf)] + ".json")
    return p.with_name(name + ".json")


def cohort_sidecar_path(folder: str | os.PathLike, rank: int = 0) -> Path:
    """The cohort folder's record: ``genseg_run.json`` (``genseg_run.rankN.json`` for rank N > 0)."""
    return Path(folder) / ("genseg_run.json" if rank == 0 else f"genseg_run.rank{rank}.json")


def _plain(obj):
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def write_sidecar(path: str | os.PathLike, record: dict) -> Path:
    """Write ``record`` (plus ``"format"``) as JSON to ``path`` atomically; returns ``path``.
    Pass ``sidecar_path(mask)`` or ``cohort_sidecar_path(folder)`` as ``path``."""
    path = Path(path)
    data = {"format": SIDECAR_FORMAT, **_plain(record)}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
    return path


def read_sidecar(output: str | os.PathLike) -> dict:
    """The sidecar of an output (mask file or cohort folder), or of a sidecar path itself."""
    p = Path(output)
    side = p if p.suffix == ".json" else sidecar_path(p)
    return json.loads(side.read_text())


def package_version() -> str:
    from .. import __version__

    return __version__


def volume_record(vol) -> dict:
    """Where the input came from and its geometry (display convention, see ``volume.py``)."""
    meta = vol.meta or {}
    rec = {
        "path": vol.source_path,
        "format": meta.get("format"),
        "shape_zyx": list(vol.shape),
        "spacing_mm_zyx": list(vol.spacing),
        "origin_lps_zyx": list(vol.origin),
        "stored_orientation": vol.orientation,
    }
    for k in ("series_uid", "series_description", "modality", "spacing_unknown", "hu_offset"):
        if meta.get(k) not in (None, ""):
            rec[k] = meta[k]
    return rec


def output_record(output, *, volume=None, model: dict | None = None, inference: dict | None = None,
                  input_checks=None, warnings=(), postprocessing: dict | None = None,
                  extra: dict | None = None) -> dict:
    """The sidecar record of one output file.

    ``input_checks``: an ``InputCheckReport`` (or its dict); ``warnings``: every warning of the
    run (reader, checks, engine), one line each; ``postprocessing``: what the post-processing step
    did (per-class volumes, components, flags; None when it did not run); ``extra``: more keys.
    """
    checks = input_checks.to_dict() if hasattr(input_checks, "to_dict") else input_checks
    rec = {
        "output": str(output),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "package": {"name": "napari-genseg", "version": package_version()},
        "input": volume_record(volume) if volume is not None else None,
        "model": model,
        "inference": inference,
        "postprocessing": postprocessing,
        "input_checks": checks,
        "warnings": list(dict.fromkeys(w for w in warnings if w)),
    }
    if extra:
        rec.update(extra)
    return rec


_RECORD_KEYS = ("model", "inference", "input_checks", "warnings", "postprocessing")


def check_sidecar_free(output: str | os.PathLike, protected=()) -> Path:
    """The sidecar path of ``output`` if writing it destroys nothing, else raise
    :class:`~napari_genseg.errors.InputError` (one line): the sidecar must not be one of
    ``protected`` (paths of files that must survive, e.g. the inputs) or their sidecars, and an
    existing file there must be this output's own previous sidecar (a genseg record whose
    ``"output"`` has ``output``'s file name); ``x.nii`` next to ``x.nii.gz`` would otherwise
    overwrite ``x.json``, the provenance of the other file."""
    from ..errors import InputError
    from .atomic import same_file

    out = Path(output)
    side = sidecar_path(out)
    for p in protected:
        if p is None:
            continue
        p = Path(p)
        if same_file(side, p) or (p.suffix != ".json" and not p.is_dir() and same_file(side, sidecar_path(p))):
            raise InputError(f"refusing to write {side}: it is the sidecar of {p.name} (or that file itself); "
                             f"choose another --out name")
    if side.exists():
        try:
            rec = json.loads(side.read_text())
            own = (isinstance(rec, dict) and rec.get("format") == SIDECAR_FORMAT
                   and Path(str(rec.get("output", ""))).name == out.name)
        except (OSError, ValueError):
            own = False
        if not own:
            raise InputError(f"refusing to overwrite {side}: it is not the sidecar of {out.name} (another "
                             f"file's record or not a genseg sidecar); choose another --out name")
    return side


def write_output_sidecar(output: str | os.PathLike, volume=None, record: dict | None = None) -> Path:
    """Write the sidecar of one output file: ``output_record`` with the keys of ``record`` that
    it names (model, inference, input_checks, warnings, postprocessing) and any other key of
    ``record`` added as it is. Returns the sidecar's path. Raises InputError when the sidecar
    would overwrite a file that is not this output's own previous sidecar (``check_sidecar_free``;
    the writers call it before they write the output itself)."""
    check_sidecar_free(output)
    record = dict(record or {})
    known = {k: record.pop(k) for k in _RECORD_KEYS if k in record}
    rec = output_record(output, volume=volume, extra=record, **known)
    return write_sidecar(sidecar_path(output), rec)
