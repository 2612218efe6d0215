"""``genseg redraw``: AR-Seg redraws the finer scales of edited labels from the command line (issue 13)."""

from __future__ import annotations

import hashlib
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_genseg.cli import main

_RUN = ["--device", "cpu", "--threads", "1", "--quiet", "--embedding-cache", "off"]
SHAPE = (5, 48, 56)  # displayed (z, y, x)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A small phantom CT and edited labels on its grid (both NIfTI, stored x, y, z): label 1 (the
    target) a block on slices 1..3, label 2 a block on every slice."""
    from napari_genseg.phantom import make_phantom

    ph = make_phantom(seed=3, shape=SHAPE, spacing=(3.0, 2.0, 1.6))
    d = tmp_path_factory.mktemp("redraw_ct")
    ct = d / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.transpose(ph.image, (2, 1, 0)), ph.affine), str(ct))
    lab = np.zeros(SHAPE, np.uint8)
    lab[1:4, 12:30, 14:40] = 1
    lab[:, 34:44, 8:20] = 2
    ed = d / "edited.nii.gz"
    nib.save(nib.Nifti1Image(np.transpose(lab, (2, 1, 0)), ph.affine), str(ed))
    return ct, ed


def _checkpoint(path, bias: float, roi: bool = False):
    """arseg_tiny with seeded weights; the mask decoder's output bias ``bias`` (+30: every sample marks
    every pixel; -30: none), so the file's content is known exactly."""
    from napari_genseg.models import registry
    from napari_genseg.models.checkpoints import save_checkpoint

    entry = registry.get_entry("arseg_tiny")
    torch.manual_seed(0)
    model = registry.get_family("arseg").build(entry.config)
    with torch.no_grad():
        model.vq.decoder.conv_out.weight.zero_()
        model.vq.decoder.conv_out.bias.fill_(bias)
    inp = {"normalization": {"kind": "hu_window", "low": -125, "high": 275}, "grid": "resize"}
    if roi:
        inp["roi"] = {"fov_mm": 40.0}
    return save_checkpoint(path, model, "arseg", "arseg_tiny", entry.config, ["background", "liver", "spleen"], inp)


def _digest(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _labels(p):
    from napari_genseg.io import load_volume

    return np.asarray(load_volume(p).data).astype(np.int64)


def test_redraw_cli_box_changes_only_the_target_inside_the_box(case, tmp_path):
    ct, ed = case
    before = (_digest(ct), _digest(ed))
    ck = _checkpoint(tmp_path / "all.safetensors", 30.0)
    out = tmp_path / "redrawn.nii.gz"
    assert main(["redraw", str(ct), "--model", str(ck), "--edited", str(ed), "--from-scale", "3", "--target", "liver",
                 "--n", "3", "--seed", "5", "--box-roi", "0:3,10:26,16:30", "--out", str(out), *_RUN]) == 0
    edited, got = _labels(ed), _labels(out)
    want = edited.copy()
    # slices 1, 2 hold the target inside the box's z range 0:3; every sample marks everything there
    want[1:3, 10:26, 16:30] = 1
    np.testing.assert_array_equal(got, want)
    assert (_digest(ct), _digest(ed)) == before  # inputs untouched
    side = json.loads(out.with_name("redrawn.json").read_text())
    r = side["redraw"]
    assert r["from_scale"] == 3 and r["n_samples"] == 3 and r["target_class"] == "liver" and r["box"] == "0:3,10:26,16:30"
    assert [s["z"] for s in r["slices"]] == [1, 2] and all(s["redraw_s"] > 0 for s in r["slices"])
    assert side["model"]["family"] == "arseg"


def test_redraw_cli_whole_slice_keeps_other_labels_and_slices(case, tmp_path):
    ct, ed = case
    ck = _checkpoint(tmp_path / "none.safetensors", -30.0)
    out = tmp_path / "r.nii.gz"
    assert main(["redraw", str(ct), "--checkpoint", str(ck), "--edited", str(ed), "--from-scale", "7",
                 "--slices", "2:5", "--n", "2", "--out", str(out), *_RUN]) == 0
    edited, got = _labels(ed), _labels(out)
    want = edited.copy()
    want[2:5][want[2:5] == 1] = 0  # no sample marks anything: the target goes on the redrawn slices
    np.testing.assert_array_equal(got, want)
    assert (got == 2).sum() == (edited == 2).sum()


def test_redraw_cli_roi_checkpoint_needs_a_box(case, tmp_path, capsys):
    ct, ed = case
    ck = _checkpoint(tmp_path / "roi.safetensors", 30.0, roi=True)
    out = tmp_path / "r.nii.gz"
    assert main(["redraw", str(ct), "--model", str(ck), "--edited", str(ed), "--from-scale", "2", "--out", str(out),
                 *_RUN]) == 2
    assert "pass --box" in capsys.readouterr().err
    assert main(["redraw", str(ct), "--model", str(ck), "--edited", str(ed), "--from-scale", "2",
                 "--box", "2:3,14:28,20:36", "--n", "2", "--out", str(out), *_RUN]) == 0
    want = _labels(ed)
    want[2, 14:28, 20:36] = 1
    np.testing.assert_array_equal(_labels(out), want)


@pytest.mark.parametrize("extra, msg", [
    (["--from-scale", "8"], "--from-scale 8: keep 1..7 scales"),
    (["--from-scale", "2", "--target", "kidney"], "--target kidney: not one of"),
    (["--from-scale", "2", "--slices", "4:5"], "no voxel of label 1"),
    (["--from-scale", "2", "--n", "65"], "between 1 and 64"),
    (["--from-scale", "2", "--box", "0:3,10:70,0:5"], "outside 0:48"),
])
def test_redraw_cli_errors_are_one_line(case, tmp_path, capsys, extra, msg):
    ct, ed = case
    ck = _checkpoint(tmp_path / "c.safetensors", 30.0)
    assert main(["redraw", str(ct), "--model", str(ck), "--edited", str(ed), "--out", str(tmp_path / "o.nii.gz"),
                 *extra, *_RUN]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("genseg: error:") and msg in err[-1]
    assert not (tmp_path / "o.nii.gz").exists()


def test_redraw_cli_never_overwrites_its_inputs(case, tmp_path, capsys):
    ct, ed = case
    before = (_digest(ct), _digest(ed))
    ck = _checkpoint(tmp_path / "c.safetensors", 30.0)
    for target in (ct, ed):
        assert main(["redraw", str(ct), "--model", str(ck), "--edited", str(ed), "--from-scale", "2",
                     "--out", str(target), *_RUN]) == 2
        assert "refusing to overwrite" in capsys.readouterr().err
    assert (_digest(ct), _digest(ed)) == before
    # edited labels on a grid that does not overlap the image (the label-file rules refuse them)
    other = tmp_path / "other.nii.gz"
    far = np.eye(4)
    far[:3, 3] = 1e4
    nib.save(nib.Nifti1Image(np.ones((10, 10, 5), np.uint8), far), str(other))
    assert main(["redraw", str(ct), "--model", str(ck), "--edited", str(other), "--from-scale", "2",
                 "--out", str(tmp_path / "o.nii.gz"), *_RUN]) == 2
    assert "does not overlap the image" in capsys.readouterr().err


def _save_like(path, data_zyx, ct, affine=None):
    img = nib.load(str(ct))
    nib.save(nib.Nifti1Image(np.transpose(data_zyx, (2, 1, 0)), img.affine if affine is None else affine), str(path))
    return path


@pytest.mark.parametrize("bias", [30.0, -30.0])
def test_redraw_cli_never_changes_other_labels_inside_the_redrawn_region(case, tmp_path, bias):
    """Marker voxels of other labels (a lesion 3 inside the target, an organ 4 beside it) inside the
    redrawn slices survive a consensus that covers everything (+30) and one that removes the target (-30)."""
    ct, ed = case
    lab = _labels(ed).astype(np.uint8)
    lab[2, 20, 25] = 3
    lab[2, 5, 5] = 4
    ed2 = _save_like(tmp_path / "ed_markers.nii.gz", lab, ct)
    ck = _checkpoint(tmp_path / "c.safetensors", bias)
    out = tmp_path / "r.nii.gz"
    assert main(["redraw", str(ct), "--model", str(ck), "--edited", str(ed2), "--from-scale", "3",
                 "--slices", "2:3", "--n", "2", "--out", str(out), *_RUN]) == 0
    got = _labels(out)
    assert got[2, 20, 25] == 3 and got[2, 5, 5] == 4
    assert (got == 2).sum() == (lab == 2).sum()
    assert ((got[2] == 1).sum() > (lab[2] == 1).sum()) if bias > 0 else not (got[2] == 1).any()


def test_redraw_cli_reads_edited_labels_by_the_label_file_rules(case, tmp_path):
    """An edited file on another grid (origin 2 voxels along x) is resampled through both affines with
    a warning in the sidecar (io.labels.labels_for_image): label 2 lands where it is in world space."""
    ct, ed = case
    lab = _labels(ed).astype(np.uint8)
    aff = nib.load(str(ct)).affine.copy()
    aff[:3, 3] += 2 * aff[:3, 0]  # label voxel x = image voxel x + 2... in world: shifted by two columns
    shifted = _save_like(tmp_path / "shifted.nii.gz", lab, ct, aff)
    ck = _checkpoint(tmp_path / "c.safetensors", -30.0)
    out = tmp_path / "r.nii.gz"
    assert main(["redraw", str(ct), "--model", str(ck), "--edited", str(shifted), "--from-scale", "3",
                 "--slices", "2:3", "--n", "2", "--out", str(out), *_RUN]) == 0
    got = _labels(out)
    want2 = np.zeros_like(lab, bool)
    want2[:, 34:44, 10:22] = True  # stored x 8:20 of the labels are image x 10:22
    np.testing.assert_array_equal(got == 2, want2)
    warns = json.loads(out.with_name("r.json").read_text())["warnings"]
    assert any("on another grid than the image" in w for w in warns)


@pytest.mark.parametrize("values, msg", [
    ("nan", "NaN/inf"),
    ("negative", "negative label id"),
    ("fraction", "label ids must be integers"),
    ("big", "label id 70000"),
    ("ct", "negative label id"),
])
def test_redraw_cli_refuses_edited_files_that_are_not_labels(case, tmp_path, capsys, values, msg):
    ct, ed = case
    lab = _labels(ed)
    if values == "ct":
        path = ct
    else:
        data = {"nan": np.where(lab == 2, np.nan, lab).astype(np.float32),
                "negative": np.where(lab == 2, -1, lab).astype(np.int16),
                "fraction": np.where(lab == 2, 1.5, lab).astype(np.float32),
                "big": np.where(lab == 2, 70000, lab).astype(np.int32)}[values]
        path = _save_like(tmp_path / f"{values}.nii.gz", data, ct)
    out = tmp_path / "o.nii.gz"
    assert main(["redraw", str(ct), "--edited", str(path), "--from-scale", "3", "--out", str(out), *_RUN]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("genseg: error:") and msg in err[-1], err
    assert not out.exists()


def test_redraw_cli_never_overwrites_another_files_sidecar(case, tmp_path, capsys):
    """--out edited.nii beside edited.nii.gz would write edited.json, the edited file's provenance."""
    ct, _ = case
    ed = _save_like(tmp_path / "seg.nii.gz", _labels(case[1]).astype(np.uint8), ct)
    side = tmp_path / "seg.json"
    side.write_text('{"format": "napari-genseg-output", "output": "seg.nii.gz"}\n')
    before = side.read_text()
    for out in (tmp_path / "seg.nii", tmp_path / "foreign.nii.gz"):
        if out.name == "foreign.nii.gz":
            (tmp_path / "foreign.json").write_text("{}\n")  # not a genseg sidecar of foreign.nii.gz
        assert main(["redraw", str(ct), "--edited", str(ed), "--from-scale", "3", "--out", str(out), *_RUN]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("genseg: error: refusing to") and ".json" in err
        assert not out.exists()
    assert side.read_text() == before and (tmp_path / "foreign.json").read_text() == "{}\n"


def test_redraw_cli_unwritable_folder_is_one_line_before_any_model(case, tmp_path, capsys):
    ct, ed = case
    assert main(["redraw", str(ct), "--edited", str(ed), "--from-scale", "3", "--out", "/proc/x.nii.gz",
                 *_RUN]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("genseg: error: cannot write into /proc")


def test_redraw_cli_hu_checks_and_offset_as_segment(case, tmp_path, capsys):
    """Stored values (HU + 1024) are flagged as genseg segment flags them; --hu-offset -1024 is
    applied and recorded, with the input checks, in the sidecar."""
    ct, ed = case
    img = nib.load(str(ct))
    raw = tmp_path / "raw.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj, np.float32) + 1024.0, img.affine), str(raw))
    ck = _checkpoint(tmp_path / "c.safetensors", -30.0)
    out = tmp_path / "r.nii.gz"
    args = ["redraw", str(raw), "--model", str(ck), "--edited", str(ed), "--from-scale", "3", "--slices", "2:3",
            "--n", "2", "--out", str(out), *_RUN]
    assert main(args) == 0
    assert "--hu-offset -1024" in capsys.readouterr().err
    side = json.loads(out.with_name("r.json").read_text())
    assert side["input_checks"]["hu_offset"] == 0 and side["input_checks"]["warnings"]
    assert set(side["input_checks"]["warnings"]) <= set(side["warnings"])
    assert main([*args, "--hu-offset", "-1024"]) == 0
    side = json.loads(out.with_name("r.json").read_text())
    assert side["input_checks"]["hu_offset"] == -1024 and not side["input_checks"]["warnings"]


def test_redraw_cli_roi_zoom_warning_in_the_sidecar(case, tmp_path):
    ct, ed = case
    ck = _checkpoint(tmp_path / "roi.safetensors", 30.0, roi=True)  # 40 mm field of view
    out = tmp_path / "r.nii.gz"
    assert main(["redraw", str(ct), "--model", str(ck), "--edited", str(ed), "--from-scale", "2",
                 "--box", "2:3,0:48,0:56", "--n", "2", "--out", str(out), *_RUN]) == 0
    warns = json.loads(out.with_name("r.json").read_text())["warnings"]
    assert any("smaller than in training" in w for w in warns)
