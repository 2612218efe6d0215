"""Input checks (checks/): HU distribution and body region on the real CTs of ../shared and on
synthetic volumes; the offset suggestion; the Enhanced CT perfusion map flagged as not HU."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from napari_genseg.checks import (
    apply_hu_offset,
    check_body_region,
    check_hu,
    check_input,
    parse_hu_offset,
    region_for_classes,
)
from napari_genseg.errors import InputError
from napari_genseg.io import load_volume
from napari_genseg.volume import Volume

ROBUST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom-robustness"


def _load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_volume(path)


@pytest.fixture
def head_series(shared_data):
    p = shared_data / "dicom-ct-head"
    if not p.is_dir():
        pytest.skip(f"{p} missing")
    return p


def test_head_series_stored_without_offset_is_flagged_with_the_offset_and_body_region(head_series):
    """The Slicer head series (Rescale Type US, intercept 0: air stored as 0): not HU, offset
    -1024 suggested, and with it the volume looks like head/neck, not the abdomen."""
    vol = _load(head_series)
    rep = check_input(vol, "abdomen")
    assert not rep.hu.ok and rep.suggested_offset == -1024.0
    assert "stored pixel values" in rep.hu.message and "Rescale Type US" in rep.hu.message
    assert rep.region is not None and not rep.region.ok
    assert rep.region.counts["head/neck"] == rep.region.n_checked
    assert len(rep.warnings) == 2 and "does not look like the abdomen" in rep.warnings[1]
    fixed = apply_hu_offset(vol, rep.suggested_offset)
    rep2 = check_input(fixed, "abdomen", applied_offset=rep.suggested_offset)
    assert rep2.hu.ok and rep2.hu.air_peak_hu < -850 and 0 <= rep2.hu.tissue_peak_hu <= 100
    assert len(rep2.warnings) == 1 and "head/neck" in rep2.warnings[0]


@pytest.mark.parametrize("rel", ["real/ct-abdomen/ct_abdomen_small.nii.gz",
                                 "real/ct-abdomen/ct_thorax_abdomen_unlabeled.nii.gz",
                                 "dicom-robustness/ge-ct-3slice-liver"])
def test_abdomen_cts_pass_quietly(shared_data, rel):
    p = shared_data.parent / rel
    if not p.exists():
        pytest.skip(f"{p} missing")
    vol = _load(p)
    rep = check_input(vol, "abdomen")
    assert rep.hu.ok, rep.hu.message
    assert -1100 < rep.hu.air_peak_hu < -900 and -150 <= rep.hu.tissue_peak_hu <= 150
    assert rep.region.ok and rep.region.counts["abdomen"] == rep.region.n_checked
    assert rep.warnings == []


def test_enhanced_ct_perfusion_map_is_flagged_not_hu():
    """eCT_Supplemental.dcm: an rCBF map stored on the CT scale (intercept -1024). Both the
    distribution (no values between air and tissue) and the DICOM facts (Image Type PERFUSION,
    Real World Value Mapping in ml/100ml/s) say it is not HU."""
    import pydicom

    f = ROBUST / "enhanced-ct" / "eCT_Supplemental.dcm"
    if not f.is_file():
        pytest.skip(f"{f} missing (../shared/data/dicom-robustness)")
    ds = pydicom.dcmread(f)
    pvt = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    hu = ds.pixel_array.astype(np.float32) * float(pvt.RescaleSlope) + float(pvt.RescaleIntercept)
    alone = check_hu(hu)
    assert not alone.ok and "no values between air and soft tissue" in alone.message
    assert alone.suggested_offset is None
    vol = Volume(hu, spacing=(10.0, 0.388672, 0.388672), source_path=str(f), meta={"format": "dicom"})
    rep = check_input(vol, "abdomen")
    assert not rep.hu.ok
    assert "PERFUSION/RCBF" in rep.hu.message and "ml/100ml/s" in rep.hu.message
    assert rep.region is None  # not HU and no offset fixes it: the body region is not judged


def test_phantom_passes_and_shifted_phantom_gets_the_offset():
    from napari_genseg.phantom import make_phantom

    ph = make_phantom(seed=0)
    vol = Volume(ph.image, spacing=ph.spacing)
    assert check_input(vol, "abdomen").warnings == []
    stored = vol.with_data(ph.image.astype(np.int32) + 1024)
    rep = check_input(stored, "abdomen")
    assert not rep.hu.ok and rep.suggested_offset == -1024.0
    assert rep.region.ok  # judged with the suggested offset: the phantom is an abdomen


def test_label_map_and_constant_volume_are_not_ct():
    rng = np.random.default_rng(0)
    assert "distinct values" in check_hu(rng.integers(0, 4, (8, 32, 32))).message
    assert not check_hu(np.full((4, 8, 8), 40.0)).ok
    assert not check_hu(np.full((4, 8, 8), np.nan)).ok


def test_tissue_only_crop_passes():
    rng = np.random.default_rng(1)
    crop = rng.normal(45, 25, (6, 40, 40)).astype(np.float32)
    crop[:, :8] = rng.normal(-100, 15, (6, 8, 40))  # fat
    chk = check_hu(crop)
    assert chk.ok and chk.air_peak_hu is None and "no air" in chk.fractions["note"]


def test_body_region_rule_on_synthetic_slices():
    """Head: a 16 cm disc with a 7 mm bone ring; abdomen: a 32x24 cm ellipse of soft tissue;
    thorax: the same ellipse with two lungs. 1 mm pixels, air -1000 HU."""
    yy, xx = np.mgrid[-200:200, -200:200].astype(np.float32)
    head = np.full((400, 400), -1000.0, np.float32)
    r = np.hypot(yy, xx)
    head[r < 80] = 30.0
    head[(r >= 73) & (r < 80)] = 1000.0
    abd = np.full((400, 400), -1000.0, np.float32)
    ell = (xx / 160) ** 2 + (yy / 120) ** 2 < 1
    abd[ell] = 40.0
    tho = abd.copy()
    for cx in (-70, 70):
        tho[((xx - cx) / 50) ** 2 + (yy / 70) ** 2 < 1] = -850.0
    sp = (5.0, 1.0, 1.0)
    assert check_body_region(np.stack([head] * 4), sp, "abdomen").counts["head/neck"] == 4
    assert not check_body_region(np.stack([head] * 4), sp, "abdomen").ok
    assert check_body_region(np.stack([head] * 4), sp, "head").ok
    assert check_body_region(np.stack([abd] * 4), sp, "abdomen").ok
    got = check_body_region(np.stack([tho] * 4), sp, "abdomen")
    assert not got.ok and got.counts["thorax"] == 4
    mixed = np.stack([tho] * 6 + [abd] * 2)
    assert check_body_region(mixed, sp, "abdomen").ok  # 25 % of slices show the abdomen


def test_region_from_class_names_and_checkpoints(tmp_path):
    from napari_genseg.models.checkpoints import load_checkpoint, shipped_checkpoint

    assert region_for_classes(["background", "liver", "spleen"]) == "abdomen"
    assert region_for_classes(["background", "class1"]) is None
    for fam in ("msa2net", "arseg"):
        ck = shipped_checkpoint(fam)
        if ck is None:
            continue
        import json

        assert json.loads(ck.with_suffix(".json").read_text())["body_region"] == "abdomen"
    ck = shipped_checkpoint("msa2net")
    if ck is not None:
        assert load_checkpoint(ck).body_region == "abdomen"


def test_saved_checkpoint_records_body_region(tmp_path):
    import json

    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from _doubles import ThresholdConfig, ThresholdNet, register_double

    from napari_genseg.models.checkpoints import load_checkpoint, save_checkpoint

    register_double()
    cfg = ThresholdConfig()
    inp = {"normalization": {"kind": "hu_window", "low": -200.0, "high": 200.0}, "grid": "resize"}
    p = save_checkpoint(tmp_path / "a.safetensors", ThresholdNet(cfg), "testdouble", "testdouble_small", cfg,
                        ["background", "liver", "spleen"], inp)
    assert json.loads(p.with_suffix(".json").read_text())["body_region"] == "abdomen"
    p = save_checkpoint(tmp_path / "b.safetensors", ThresholdNet(cfg), "testdouble", "testdouble_small", cfg,
                        ["background", "soft", "dense"], inp, body_region="thorax")
    assert load_checkpoint(p).body_region == "thorax"


def test_hu_offset_parsing_and_application():
    assert parse_hu_offset("auto") == "auto" and parse_hu_offset("-1024") == -1024.0 and parse_hu_offset(None) is None
    with pytest.raises(InputError, match="--hu-offset"):
        parse_hu_offset("abc")
    vol = Volume(np.zeros((2, 3, 4), np.int16), spacing=(1, 2, 3), origin=(4, 5, 6))
    out = apply_hu_offset(vol, -1024)
    assert out.data.dtype == np.int16 and out.data.min() == -1024
    assert out.spacing == vol.spacing and out.origin == vol.origin and out.meta["hu_offset"] == -1024
    assert vol.data.max() == 0  # the source array is untouched
    assert apply_hu_offset(vol, 0.5).data.dtype == np.float32
