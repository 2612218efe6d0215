"""Review > "Add to training set": Decathlon layout, never duplicated, identifiers stripped, and
``genseg train`` fine-tunes the tiny config on such a folder."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from _tinynet import PHANTOM_SHAPE, PHANTOM_SPACING
from napari_genseg.phantom import make_phantom
from napari_genseg.review.training_export import TrainingExportError, add_training_case
from napari_genseg.training.data import msd_pairs

NAMES = ["background", "liver", "spleen"]


def _case(seed):
    ph = make_phantom(seed=seed, shape=tuple(PHANTOM_SHAPE), spacing=tuple(PHANTOM_SPACING))
    vol = ph.to_volume()
    lab = np.zeros(vol.shape, np.uint8)
    names = list(ph.class_names)
    for cid, n in enumerate(names):
        if n in ("liver", "liver_lesion"):
            lab[ph.labels == cid] = 1
        elif n == "spleen":
            lab[ph.labels == cid] = 2
    return vol, lab


def test_cases_land_in_decathlon_layout_once_and_without_identifiers(tmp_path):
    vol, lab = _case(0)
    vol2, lab2 = _case(1)
    out = tmp_path / "train"
    a = add_training_case(out, vol.data, lab, vol.spacing, vol.origin, NAMES, name="DOE^JOHN 1234")
    b = add_training_case(out, vol2.data, lab2, vol2.spacing, vol2.origin, NAMES)
    assert "DOE" not in a["case"] and a["case"].startswith("genseg_") and not a["replaced"]
    lab_fixed = lab.copy()
    lab_fixed[0] = 0  # the reader corrects the first case again
    again = add_training_case(out, vol.data.copy(), lab_fixed, vol.spacing, vol.origin, NAMES)
    assert again["case"] == a["case"] and again["replaced"]
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["numTraining"] == 2 and len(ds["training"]) == 2
    assert ds["labels"] == {"0": "background", "1": "liver", "2": "spleen"}
    assert ds["genseg_cases"][a["case"]]["dropped"][0] == "patient name"
    pairs = msd_pairs(out)
    assert {p[0].split("/")[-1] for p in pairs} == {f"{a['case']}.nii.gz", f"{b['case']}.nii.gz"}
    img = nib.load(a["image"])
    assert img.header["descrip"].tobytes().strip(b"\x00") == b""
    np.testing.assert_array_equal(np.asarray(nib.load(a["label"]).dataobj).transpose(2, 1, 0), lab_fixed)
    np.testing.assert_allclose(img.header.get_zooms(), PHANTOM_SPACING[::-1])
    # the label and the image share one grid; a marker voxel reads back where it was
    from napari_genseg.io import read_nifti

    back = read_nifti(a["image"])
    assert back.shape == vol.shape and back.data[3, 20, 30] == vol.data[3, 20, 30]
    with pytest.raises(TrainingExportError):
        add_training_case(out, vol.data, lab, vol.spacing, vol.origin, ["background", "kidney"])
    with pytest.raises(TrainingExportError):
        add_training_case(out, vol.data, lab[:-1], vol.spacing, vol.origin, NAMES)


def test_names_are_kept_only_when_asked(tmp_path):
    vol, lab = _case(0)
    r = add_training_case(tmp_path, vol.data, lab, vol.spacing, vol.origin, NAMES, name="case 7",
                          strip_identifiers=False)
    assert r["case"] == "case_7" and "patient name" not in r["dropped"]


def test_genseg_train_fine_tunes_on_an_exported_folder(tiny_cfg, tmp_path):
    from napari_genseg.training.loop import train

    out = tmp_path / "train"
    for seed in (0, 1, 2):
        vol, lab = _case(seed)
        add_training_case(out, vol.data, lab, vol.spacing, vol.origin, NAMES)
    losses = []
    summary = train(tiny_cfg(data=[f"msd:{out}"], steps=4, classes=NAMES), on_step=lambda s, l: losses.append(l))
    assert summary["step"] == 4 and len(losses) == 4 and all(np.isfinite(losses))
    from napari_genseg.models.checkpoints import load_checkpoint

    prov = load_checkpoint(summary["checkpoint"]).provenance
    assert any("msd:" in str(d) for d in prov["data"])
