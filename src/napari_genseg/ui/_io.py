"""npe2 reader, writer and sample-data contributions."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..io import discover, looks_like_case, write_mask
from .layers import image_layer_data, volume_from_layer

__all__ = ["get_reader", "write_labels", "write_dicom_seg_labels", "phantom_sample", "real_ct_sample"]


def get_reader(path):
    """npe2 reader: a NIfTI file, a DICOM folder, DICOM file (any name) or DICOMDIR; one case."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(path)
    if p.suffix.lower() == ".txt" or not looks_like_case(p):
        return None
    return _read


def _read(path, name: str | None = None):
    if isinstance(path, list):
        path = path[0]
    case = discover(path).single(Path(path).name)  # a cohort -> VolumeReadError, shown by napari
    vol = case.load()
    layer = image_layer_data(vol, name or case.name)
    for w in vol.meta.get("warnings", []):
        from napari.utils.notifications import show_warning

        show_warning(w)
    return [layer]


def write_labels(path: str, data, meta: dict) -> list[str]:
    """npe2 single-layer writer: Labels -> NIfTI on the source geometry, plus its JSON sidecar
    (the model run recorded in the layer's metadata by the Segment dock, when there was one)."""
    from ..run_record import RUN_KEY

    vol = volume_from_layer(np.asarray(data), meta.get("metadata"), meta.get("scale"), meta.get("translate"))
    like = vol if vol.source_affine is not None else None
    run = dict((meta.get("metadata") or {}).get(RUN_KEY) or {})
    run["written_by"] = ("napari writer: the model's result as it is in the layer now (edits made in napari "
                         "included)" if run else "napari writer: no model run is recorded for this layer")
    out = write_mask(path, vol.data, like=like, spacing=vol.spacing, origin=vol.origin, record=run)
    return [os.fspath(out)]


def _layer_class_names(meta: dict, data) -> list[str]:
    """Label id -> name: the layer's ``class`` feature, else the recorded run's classes, else "label N"."""
    from ..run_record import RUN_KEY

    names: list[str] = []
    feats = meta.get("features")
    try:
        if feats is not None and "class" in feats:
            names = [str(v) for v in list(feats["class"])]
    except TypeError:
        names = []
    if not names:
        run = (meta.get("metadata") or {}).get(RUN_KEY) or {}
        names = [str(v) for v in ((run.get("model") or {}).get("class_names") or [])]
    names = names or ["background"]
    return names + [f"label {i}" for i in range(len(names), int(np.max(data, initial=0)) + 1)]


def write_dicom_seg_labels(path: str, data, meta: dict) -> list[str]:
    """npe2 single-layer writer "DICOM SEG": a Labels layer on an image read from a DICOM series ->
    a DICOM Segmentation of that series (``io.dicom_seg.write_dicom_seg``: one segment per class,
    frames on the source slices), plus its JSON sidecar. Classes come from the layer's ``class``
    feature (or the recorded run); all are AUTOMATIC here (the Review dock's Save knows edits).
    Raises InputError ("DICOM SEG needs a DICOM source") for a layer without DICOM geometry."""
    from ..errors import InputError
    from ..io.dicom_seg import write_dicom_seg
    from ..run_record import RUN_KEY

    data = np.asarray(data)
    vol = volume_from_layer(data, meta.get("metadata"), meta.get("scale"), meta.get("translate"))
    if vol.source_affine is None or vol.meta.get("format") != "dicom":
        raise InputError("DICOM SEG needs a DICOM source")
    run = dict((meta.get("metadata") or {}).get(RUN_KEY) or {})
    model = run.get("model") or {}
    alg = {"name": " ".join(str(model[k]) for k in ("family", "config_name") if model.get(k)) or None,
           "checkpoint_sha256": model.get("checkpoint_sha256")}
    run["written_by"] = "napari writer (DICOM SEG): the layer as it is now"
    out = write_dicom_seg(path, vol.data, vol, _layer_class_names(meta, data), algorithm=alg, record=run)
    return [os.fspath(out)]


def phantom_sample():
    """Sample data: the synthetic abdomen phantom with its reference labels."""
    from ..phantom import make_phantom
    from .layers import class_colormap, class_features, geometry_metadata

    ph = make_phantom(seed=0)
    vol = ph.to_volume()
    img = image_layer_data(vol, "phantom CT")
    from napari.utils.colormaps import DirectLabelColormap

    lab_kwargs = {
        "name": "phantom reference",
        "metadata": geometry_metadata(vol),
        "features": class_features(list(ph.class_names)),
        "colormap": DirectLabelColormap(color_dict=class_colormap(len(ph.class_names))),
        "opacity": 0.4,
        "visible": False,
        **vol.layer_kwargs(),
    }
    return [img, (ph.labels, lab_kwargs, "labels")]


def real_ct_sample():
    """Sample data "Abdominal CT (real)": the shipped 112-slice abdomen CT (TotalSegmentator test
    data, Apache-2.0; hips to upper abdomen; slices 82..111 are the labelled ``ct_abdomen_small``).

    Read by the plugin's own reader, so the layer (HU, (z, y, x), scale 3 mm, translate = LPS origin)
    carries the same ``genseg_geometry`` metadata as File > Open of that file, plus the description
    under ``metadata["description"]``. No labels: the phantom is the sample with reference labels.
    """
    from ..data import SAMPLE_CT_DESCRIPTION, SAMPLE_CT_NAME, sample_ct_path

    [(data, kwargs, kind)] = _read(sample_ct_path(), name=SAMPLE_CT_NAME)
    kwargs["metadata"]["description"] = SAMPLE_CT_DESCRIPTION
    return [(data, kwargs, kind)]
