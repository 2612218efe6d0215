"""``genseg segment --roi``: AR-Seg region-of-interest mode from the command line."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_genseg.cli import main

_RUN = ["--device", "cpu", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def small_ct(tmp_path_factory):
    """A small phantom as NIfTI (stored x, y, z) and its displayed (z, y, x) shape."""
    from napari_genseg.phantom import make_phantom

    ph = make_phantom(seed=2, shape=(6, 64, 80), spacing=(3.0, 2.0, 1.6))
    p = tmp_path_factory.mktemp("roi_ct") / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.transpose(ph.image, (2, 1, 0)), ph.affine), str(p))
    return p


def _checkpoint(path, roi: bool, everything: bool = True):
    """arseg_tiny with seeded weights; ``everything``: the mask decoder's output bias is +30, so every
    sample marks every pixel of its crop (what lands in the file is then exactly the box)."""
    from napari_genseg.models import registry
    from napari_genseg.models.checkpoints import save_checkpoint

    entry = registry.get_entry("arseg_tiny")
    torch.manual_seed(0)
    model = registry.get_family("arseg").build(entry.config)
    if everything:
        with torch.no_grad():
            model.vq.decoder.conv_out.weight.zero_()
            model.vq.decoder.conv_out.bias.fill_(30.0)
    inp = {"normalization": {"kind": "hu_window", "low": -125, "high": 275}, "grid": "resize"}
    if roi:
        inp["roi"] = {"fov_mm": 40.0}
    return save_checkpoint(path, model, "arseg", "arseg_tiny", entry.config, ["background", "liver_lesion"], inp)


def test_segment_roi_writes_the_box_and_nothing_else(small_ct, tmp_path):
    from napari_genseg.io import load_volume

    ck = _checkpoint(tmp_path / "roi.safetensors", roi=True)
    out = tmp_path / "m.nii.gz"
    # an off-centre, non-square box: 18 x 12 voxels = 36 x 19.2 mm (fits the 40 mm field of view)
    assert main(["segment", str(small_ct), "--model", "arseg", "--checkpoint", str(ck), "--roi", "2:4,30:48,9:21",
                 "--out", str(out), *_RUN]) == 0
    mask = load_volume(out).data  # back in the displayed (z, y, x) order
    want = np.zeros(mask.shape, bool)
    want[2:4, 30:48, 9:21] = True
    assert mask.shape == (6, 64, 80)
    np.testing.assert_array_equal(mask > 0, want)
    assert set(np.unique(mask)) == {0, 1}
    side = json.loads(out.with_name("m.json").read_text())
    assert side["roi"]["box"] == "2:4,30:48,9:21" and side["roi"]["fov_mm"] == 40.0 and side["roi"]["zoom"] == 1.0
    assert side["postprocessing"]["enabled"] is False


def test_segment_roi_larger_than_the_field_of_view_warns(small_ct, tmp_path, capsys):
    ck = _checkpoint(tmp_path / "roi.safetensors", roi=True)
    out = tmp_path / "m.nii.gz"
    assert main(["segment", str(small_ct), "--model", "arseg", "--checkpoint", str(ck), "--roi", "0:1,0:64,0:80",
                 "--out", str(out), *_RUN]) == 0
    assert "larger than the checkpoint's 40 mm field of view" in capsys.readouterr().err


@pytest.mark.parametrize("roi,msg", [
    ("2:4,30:48", "is not z0:z1,y0:y1,x0:x1"),
    ("2:4,30:48,9:x", "is not a range a:b of integers"),
    ("2:4,30:70,9:21", "y range 30:70 is outside 0:64"),
    ("4:2,30:48,9:21", "empty z range"),
])
def test_segment_bad_roi_is_one_line(small_ct, tmp_path, capsys, roi, msg):
    ck = _checkpoint(tmp_path / "roi.safetensors", roi=True)
    out = tmp_path / "m.nii.gz"
    assert main(["segment", str(small_ct), "--model", "arseg", "--checkpoint", str(ck), "--roi", roi,
                 "--out", str(out), *_RUN]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("genseg: error:") and msg in err[0]
    assert not out.exists()


def test_roi_and_whole_slice_checkpoints_are_not_mixed_up(small_ct, tmp_path, capsys):
    roi_ck = _checkpoint(tmp_path / "roi.safetensors", roi=True)
    whole_ck = _checkpoint(tmp_path / "whole.safetensors", roi=False)
    out = tmp_path / "m.nii.gz"
    assert main(["segment", str(small_ct), "--model", "arseg", "--checkpoint", str(roi_ck), "--out", str(out),
                 *_RUN]) == 2
    assert "trained on 40 mm regions of interest: pass --roi" in capsys.readouterr().err
    assert main(["segment", str(small_ct), "--model", "arseg", "--checkpoint", str(whole_ck), "--roi",
                 "2:4,30:48,9:21", "--out", str(out), *_RUN]) == 2
    assert "trained on whole slices" in capsys.readouterr().err
    assert not out.exists()
