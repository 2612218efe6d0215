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
    # edited labels on another grid
    other = tmp_path / "other.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 5), np.uint8), np.eye(4)), str(other))
    assert main(["redraw", str(ct), "--model", str(ck), "--edited", str(other), "--from-scale", "2",
                 "--out", str(tmp_path / "o.nii.gz"), *_RUN]) == 2
    assert "must be on the image's grid" in capsys.readouterr().err
