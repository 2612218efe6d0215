"""3-D post-processing (``postprocessing.py``): declared per class, volumes in mL, components,
plausibility flags in the patient frame (marker voxels through NIfTI affines), slice flags, and
the declaration carried through checkpoint save/load."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from napari_genseg.postprocessing import (
    PostprocessSpecError,
    default_postprocess,
    measure,
    parse_postprocess,
    postprocess,
    slice_flags,
)
from napari_genseg.volume import Volume

NAMES = ["background", "liver", "spleen", "lesion"]
SPEC = {"liver": {"single_component": True, "fill_holes": True, "side": "right"},
        "spleen": {"single_component": True, "fill_holes": True, "side": "left"}}
SPACING = (2.5, 0.8, 0.7)  # (z, y, x) mm: 1.4 mm^3 = 0.0014 mL per voxel
ML = 2.5 * 0.8 * 0.7 / 1000.0


def _markers():
    """Liver (1) on the patient's right (display x low) with an enclosed hole, a lesion (3) inside
    it, a vessel tube open at both ends, a stray liver blob; spleen (2) on the left; two separate
    lesions (undeclared class 3)."""
    lab = np.zeros((24, 40, 48), np.uint8)
    lab[2:20, 4:30, 2:20] = 1  # 18 * 26 * 18 = 8424 voxels
    lab[8:12, 10:14, 8:12] = 0  # enclosed hole: 64 voxels
    lab[14:16, 10:12, 8:10] = 3  # a lesion inside the liver: 8 voxels (never overwritten)
    lab[2:20, 20:22, 14:16] = 0  # a vessel through the liver, open at z=1 and z=20: 72 voxels
    lab[5:7, 34:37, 4:8] = 1  # stray liver blob, one voxel away from the liver (y 30..33): 24 voxels
    lab[3:15, 6:26, 32:44] = 2  # spleen: 2880 voxels
    lab[22, 2, 46] = 3  # a second lesion far away: undeclared, stays
    return lab


def test_stray_removed_hole_filled_others_untouched_volumes_exact():
    lab = _markers()
    before = lab.copy()
    new, rep = postprocess(lab, NAMES, SPEC, SPACING)
    np.testing.assert_array_equal(lab, before)  # the input is not modified
    assert new.dtype == lab.dtype and new.shape == lab.shape
    # the stray blob is gone, the enclosed hole is liver, the open vessel stays background
    assert not new[5:7, 34:37, 4:8].any()
    assert (new[8:12, 10:14, 8:12] == 1).all()
    assert not new[2:20, 20:22, 14:16].any()
    # other classes are untouched: the lesion inside the liver, the far lesion, the spleen
    for k in (2, 3):
        np.testing.assert_array_equal(new == k, lab == k)
    liver = rep.by_name("liver")
    assert liver.components_before == 2 and liver.components_after == 1
    assert liver.removed_components == 1 and liver.removed_voxels == 24
    assert liver.filled_voxels == 64
    want = 18 * 26 * 18 - 8 - 72  # the box minus the lesion and the vessel (the hole is filled)
    assert liver.voxels == want == int((new == 1).sum())
    assert liver.volume_ml == pytest.approx(want * ML, rel=1e-9)
    assert liver.removed_ml == pytest.approx(24 * ML, rel=1e-9)
    assert liver.removed_slices == [5, 6]
    assert rep.by_name("spleen").volume_ml == pytest.approx(2880 * ML, rel=1e-9)
    lesion = rep.by_name("lesion")
    assert lesion.rule is None and lesion.components_before == lesion.components_after == 2
    assert liver.line() == (f"liver: {want * ML:.1f} mL, 1 component (removed 1 component, {24 * ML:.1f} mL; "
                            f"filled holes {64 * ML:.1f} mL)")
    assert rep.flags == []  # liver right, spleen left: plausible
    json.dumps(rep.to_dict())  # JSON-ready


def test_components_are_26_connected():
    """A piece touching the organ only at a corner (diagonal across slices) belongs to it; a
    piece one voxel away does not."""
    lab = np.zeros((10, 20, 20), np.uint8)
    lab[2:5, 2:8, 2:8] = 1
    lab[5, 8, 8] = 1  # corner contact with (4, 7, 7)
    lab[5, 10, 10] = 1  # separate
    new, rep = postprocess(lab, NAMES, SPEC, (1.0, 1.0, 1.0))
    assert new[5, 8, 8] == 1 and new[5, 10, 10] == 0
    assert rep.by_name("liver").components_before == 2


def test_undeclared_spec_changes_nothing_but_measures():
    lab = _markers()
    new, rep = postprocess(lab, NAMES, None, SPACING)
    np.testing.assert_array_equal(new, lab)
    assert rep.by_name("liver").components_after == 2 and rep.flags == []
    m = measure(lab, NAMES, SPACING)
    assert m.enabled is False and m.by_name("spleen").voxels == 2880


def test_several_large_components_and_empty_are_flagged():
    lab = np.zeros((30, 20, 40), np.uint8)
    lab[2:12, 2:18, 2:12] = 1  # 1600 voxels
    lab[20:28, 2:12, 2:10] = 1  # 640 voxels: 40 % of the largest
    new, rep = postprocess(lab, NAMES, SPEC, (2.0, 1.0, 1.0))
    kinds = {(f.kind, f.class_name) for f in rep.flags}
    assert ("several_large_components", "liver") in kinds and ("empty", "spleen") in kinds
    flag = next(f for f in rep.flags if f.kind == "several_large_components")
    assert flag.slices == list(range(20, 28)) and "40 %" in flag.message
    assert not new[20:28].any()
    # a small second piece (5 % of the largest) is only removed, not flagged
    lab[20:28] = 0
    lab[20:22, 2:6, 2:12] = 1  # 80 voxels
    _, rep = postprocess(lab, NAMES, SPEC, (2.0, 1.0, 1.0))
    assert "several_large_components" not in {f.kind for f in rep.flags}


def _body_image(shape):
    img = np.full(shape, -1000, np.int16)
    img[:, 2:-2, 4:-4] = 40  # body, centred left-right
    return img


def test_wrong_side_in_display_frame():
    lab = np.zeros((8, 20, 40), np.uint8)
    lab[2:6, 5:15, 26:36] = 1  # display x high = the patient's LEFT
    vol = Volume(_body_image(lab.shape), spacing=(3.0, 1.0, 1.0))
    _, rep = postprocess(lab, NAMES, SPEC, vol)
    [flag] = [f for f in rep.flags if f.kind == "wrong_side"]
    assert flag.class_name == "liver" and "patient's left" in flag.message and "expected right" in flag.message
    assert flag.slices == [2, 3, 4, 5] and rep.midline["source"] == "body"
    lab = lab[:, :, ::-1].copy()  # now on the patient's right
    _, rep = postprocess(lab, NAMES, SPEC, vol)
    assert rep.by_name("liver").side == "right" and not any(f.kind == "wrong_side" for f in rep.flags)


@pytest.mark.parametrize("flip", [False, True])
def test_wrong_side_follows_the_nifti_affine(tmp_path, flip):
    """The same stored arrays: with an x axis pointing to the patient's Right (RAS) the liver at
    low i is on the patient's left (flagged); with the x axis flipped (LAS) it is on the right.
    A marker voxel proves where stored voxel (7, 3, 2) lands on the display grid."""
    from napari_genseg.io.nifti import read_nifti

    shape = (40, 30, 10)  # stored (i, j, k)
    img = np.full(shape, -1000, np.int16)
    img[4:36, 2:28, :] = 40  # body, centred in i
    img[7, 3, 2] = 2000  # marker
    lab = np.zeros(shape, np.uint8)
    lab[6:14, 8:20, 2:8] = 1  # liver at low i
    aff = np.diag([1.5, 1.5, 3.0, 1.0])
    if flip:
        aff[0, 0] = -1.5
        aff[0, 3] = 58.5
    for name, arr in (("ct", img), ("lab", lab)):
        nib.save(nib.Nifti1Image(arr, aff), str(tmp_path / f"{name}.nii.gz"))
    ct = read_nifti(tmp_path / "ct.nii.gz")
    labels = np.rint(read_nifti(tmp_path / "lab.nii.gz").data).astype(np.uint8)
    assert ct.orientation == ("LAS" if flip else "RAS")
    # display: x toward the patient's left, y toward posterior
    x = 7 if flip else 39 - 7
    np.testing.assert_array_equal(np.argwhere(ct.data == 2000), [[2, 29 - 3, x]])
    _, rep = postprocess(labels, NAMES, SPEC, ct)
    liver = rep.by_name("liver")
    assert liver.side == ("right" if flip else "left")
    assert any(f.kind == "wrong_side" for f in rep.flags) is (not flip)


def test_slice_flags_name_removed_and_implausible_slices():
    lab = np.zeros((12, 20, 40), np.uint8)
    lab[2:8, 4:16, 26:36] = 1  # liver on the patient's left (wrong side)
    lab[10, 1, 1] = 1  # a stray voxel on slice 10
    new, rep = postprocess(lab, NAMES, SPEC, (2.0, 1.0, 1.0))
    flags = slice_flags(new, rep)
    assert flags[10] == ["liver: stray component removed"]
    assert set(flags) == {2, 3, 4, 5, 6, 7, 10}
    assert all(flags[z] == ["liver: on the wrong side"] for z in range(2, 8))
    # the report's dict (e.g. read back from a sidecar) works the same; an erased organ drops out
    new[2:4] = 0
    flags = slice_flags(new, rep.to_dict())
    assert 2 not in flags and flags[4] == ["liver: on the wrong side"]


def test_editable_slices_keep_other_slices():
    """A dock run over slices 4..7: components are judged in the whole volume, but voxels on the
    other slices (painted by the user) never change."""
    lab = np.zeros((12, 20, 20), np.uint8)
    lab[3:9, 2:12, 2:12] = 1
    lab[1, 16, 16] = 1  # stray painted outside the run
    lab[5, 16, 16] = 1  # stray inside the run
    new, rep = postprocess(lab, NAMES, SPEC, (2.0, 1.0, 1.0), editable_slices=range(4, 8))
    assert new[1, 16, 16] == 1 and new[5, 16, 16] == 0
    assert rep.by_name("liver").removed_slices == [5] and rep.editable_slices == "4-7"


@pytest.mark.parametrize("block, msg", [
    ({"kidney": {"single_component": True}}, "not a class"),
    ({"background": {"fill_holes": True}}, "background"),
    ({"liver": {"largest": True}}, "unknown setting"),
    ({"liver": {"side": "up"}}, "side"),
    ({"liver": {"large_fraction": 2}}, "large_fraction"),
    ({"liver": {"fill_holes": "yes"}}, "true or false"),
])
def test_bad_declarations_are_refused(block, msg):
    with pytest.raises(PostprocessSpecError, match=msg):
        parse_postprocess(block, NAMES)


def test_defaults_declare_known_organs_only():
    assert default_postprocess(["background", "liver", "spleen", "liver_lesion"]) == SPEC
    assert default_postprocess(["background", "soft", "dense"]) == {}


def test_checkpoint_carries_the_block(tmp_path):
    from _doubles import ThresholdConfig, ThresholdNet, register_double

    from napari_genseg.models.checkpoints import CheckpointError, load_checkpoint, save_checkpoint

    register_double()
    cfg = ThresholdConfig()
    inp = {"normalization": {"kind": "hu_window", "low": -200.0, "high": 200.0}, "grid": "resize"}
    names = ["background", "liver", "spleen"]
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, ThresholdNet(cfg), "testdouble", "testdouble_small", cfg, names, inp)
    assert load_checkpoint(path).postprocess == SPEC  # derived from the organ names
    custom = {"liver": {"single_component": True, "side": "right", "large_fraction": 0.3}}
    save_checkpoint(path, ThresholdNet(cfg), "testdouble", "testdouble_small", cfg, names, inp, postprocess=custom)
    # a retraining into the same file keeps the hand-edited block
    save_checkpoint(path, ThresholdNet(cfg), "testdouble", "testdouble_small", cfg, names, inp)
    ck = load_checkpoint(path)
    assert ck.postprocess == custom and ck.meta["postprocess"] == custom
    meta = json.loads(path.with_suffix(".json").read_text())
    meta["postprocess"] = {"liver": {"side": "north"}}
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="side"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not a class"):
        save_checkpoint(tmp_path / "x.safetensors", ThresholdNet(cfg), "testdouble", "testdouble_small", cfg,
                        names, inp, postprocess={"kidney": {}})


def test_shipped_checkpoints_declare_liver_and_spleen():
    from napari_genseg.models.checkpoints import shipped_checkpoints_dir

    for fam in ("msa2net", "arseg"):
        meta = json.loads((shipped_checkpoints_dir() / f"{fam}_demo.json").read_text())
        assert meta["postprocess"]["liver"]["side"] == "right"
        assert meta["postprocess"]["spleen"]["side"] == "left"
        parse_postprocess(meta["postprocess"], meta["class_names"])
