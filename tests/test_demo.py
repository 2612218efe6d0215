"""The main job (``genseg demo``) on the shipped real CT: mask + sidecar + overlay PNG + volumes,
the overlay's slice choice and orientation letters, and the "Abdominal CT (real)" sample."""

from __future__ import annotations

import json
import re

import nibabel as nib
import numpy as np
import pytest

from napari_genseg.cli import main
from napari_genseg.data import SAMPLE_CT_NAME, sample_ct_path
from napari_genseg.demo import class_volumes, overlay_png, overlay_slices, view_letters
from napari_genseg.io import read_nifti
from napari_genseg.volume import Volume

_RUN = ["--device", "cpu", "--threads", "1", "--quiet"]


def test_headless_demo_segments_the_real_sample_and_writes_mask_sidecar_png(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--headless", "--slices", "100:104", "--out", str(out), *_RUN]) == 0
    printed = capsys.readouterr().out
    mask, sidecar, png = (out / f"abdomen_ct_msa2net_{s}" for s in ("mask.nii.gz", "mask.json", "overlay.png"))
    src = nib.load(str(sample_ct_path()))
    m = nib.load(str(mask))
    assert m.shape == src.shape == (122, 101, 112)
    np.testing.assert_array_equal(m.affine, src.affine)  # on the sample's own voxel grid
    labels = np.asarray(m.dataobj)
    assert labels[..., 100:104].any() and not labels[..., :100].any() and not labels[..., 104:].any()
    record = json.loads(sidecar.read_text())
    assert record["model"]["family"] == "msa2net"
    assert record["inference"]["slices"] == "100-103"
    assert record["input"]["path"] == str(sample_ct_path())
    # printed volumes are those of the written mask: voxels x 27 mm3
    for k, name in ((1, "liver"), (2, "spleen")):
        got = re.search(rf"^\s+{name}\s+([\d.]+) mL\s+(\d+)$", printed, re.M)
        assert got, printed
        assert float(got.group(1)) == pytest.approx((labels == k).sum() * 27 / 1000, abs=0.05)
    assert SAMPLE_CT_NAME in printed and "82..111" in printed
    from PIL import Image

    with Image.open(png) as im:
        assert im.mode == "RGB" and im.width > 600 and im.height > 300


def test_headless_demo_phantom_still_scores_against_its_reference(tmp_path, capsys):
    assert main(["demo", "--headless", "--input", "phantom", "--slices", "20:24", "--out", str(tmp_path), *_RUN]) == 0
    printed = capsys.readouterr().out
    dice = float(re.search(r"phantom liver: Dice ([\d.]+)", printed).group(1))
    assert dice > 0.5
    assert (tmp_path / "phantom_msa2net_mask.nii.gz").is_file() and (tmp_path / "phantom_msa2net_mask.json").is_file()


def _vol(affine, shape=(4, 6, 8)):
    return Volume(np.zeros(shape, np.int16), spacing=(3, 2, 1), source_affine=np.asarray(affine, float),
                  ornt=np.array([[0, 1], [1, 1], [2, 1]], float), source_shape=shape[::-1])


def test_view_letters_come_from_the_affine_and_swap_with_x():
    lps = np.diag([-1.0, -2.0, 3.0, 1.0])  # display x toward L: radiological
    assert view_letters(_vol(lps)) == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    x_flipped = np.diag([1.0, -2.0, 3.0, 1.0])  # the same axes with x toward R
    assert view_letters(_vol(x_flipped)) == {"left": "L", "right": "R", "top": "A", "bottom": "P"}
    y_flipped = np.diag([-1.0, 2.0, 3.0, 1.0])
    assert view_letters(_vol(y_flipped))["top"] == "P"
    # no source affine: the display convention's own affine (LPS)
    plain = Volume(np.zeros((4, 6, 8), np.int16), spacing=(3, 2, 1))
    assert view_letters(plain) == {"left": "R", "right": "L", "top": "A", "bottom": "P"}


@pytest.mark.parametrize("stored", ["RAS", "LAS"])
def test_marker_on_the_patients_right_is_drawn_beside_the_R_letter(tmp_path, stored):
    """A marker voxel on the patient's right, stored in a RAS file and in an x-flipped (LAS)
    file: after reading it is in the tile half whose edge letter is R, in the written PNG."""
    nx, ny, nz = 40, 30, 5
    data = np.full((nx, ny, nz), -1000, np.int16)
    right = 3  # RAS: +x is toward the patient's right, so a high i is on the right
    i = nx - 1 - right if stored == "RAS" else right
    data[i, 12:15, 2] = 100
    aff = np.diag([1.0 if stored == "RAS" else -1.0, 1.0, 1.0, 1.0])
    aff[0, 3] = -(nx - 1) / 2 * aff[0, 0]  # same world x range in both files
    p = tmp_path / f"{stored}.nii.gz"
    nib.save(nib.Nifti1Image(data, aff), str(p))
    vol = read_nifti(p)
    labels = (vol.data == 100).astype(np.uint8)
    letters = view_letters(vol)
    png = overlay_png(tmp_path / "o.png", vol, labels, [2], ["background", "marker"], tile_px=400)
    from PIL import Image

    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    tile = rgb[28:28 + 300, 6:6 + 400]  # first tile: pad 6, header 22; 40 x 30 mm -> 400 x 300 px
    colour = (tile[..., 0] - tile[..., 1] > 40) & (tile[..., 0] - tile[..., 2] > 40)  # grey + class 1 orange-red
    cols = np.nonzero(colour.any(axis=0))[0]
    assert cols.size
    marker_side = "left" if cols.mean() < 200 else "right"
    assert letters[marker_side] == "R", (stored, letters, cols.mean())


def test_overlay_slices_follow_the_classes_not_quarters():
    labels = np.zeros((100, 30, 30), np.uint8)
    for z in range(30, 61):  # class 1 from 30 to its dome at 60, largest at 50
        r = 12 - (abs(z - 50) + 2) // 3
        labels[z, 15 - r:15 + r, 15 - r:15 + r] = 1
    labels[40:46, 1:7, 1:7] = 2  # class 2 up to 45
    zs = overlay_slices(labels, range(100))
    assert {60, 45, 50, 30} <= set(zs)  # dome of 1, top of 2, largest of 1, lowest class slice
    assert any(z < 30 for z in zs)  # the stretch below every class (pelvis) is shown too
    assert zs == sorted(zs) and len(zs) <= 8
    assert overlay_slices(labels, range(40, 46)) == sorted(set(overlay_slices(labels, range(40, 46))))
    with pytest.raises(ValueError):
        overlay_slices(labels, [])


def test_class_volumes_in_ml_with_26_connected_components():
    labels = np.zeros((6, 6, 6), np.uint8)
    labels[0, 0, 0:2] = 1
    labels[4, 4, 4] = 1  # a second, separate piece
    labels[1, 1, 1] = 2
    labels[2, 2, 2] = 2  # touches the first by a corner only: one 26-connected component
    v = class_volumes(labels, (3.0, 2.0, 1.0), ["background", "liver", "spleen", "kidney"])
    assert [(c.name, c.voxels, c.components) for c in v] == [("liver", 3, 2), ("spleen", 2, 1), ("kidney", 0, 0)]
    assert v[0].ml == pytest.approx(3 * 6 / 1000)


@pytest.mark.gui
def test_real_ct_sample_layer_has_the_files_voxels_at_their_world_position(make_napari_viewer_proxy):
    viewer = make_napari_viewer_proxy()
    viewer.open_sample("napari-genseg", "abdomen_ct")
    [img] = viewer.layers
    assert img.name == SAMPLE_CT_NAME and img.data.shape == (112, 101, 122)
    np.testing.assert_allclose(img.scale, (3.0, 3.0, 3.0))
    assert "82..111" in img.metadata["description"]
    src = nib.load(str(sample_ct_path()))
    np.testing.assert_array_equal(img.metadata["genseg_geometry"]["source_affine"], src.affine)
    stored = np.asarray(src.dataobj)
    for ijk in [(60, 40, 95), (10, 80, 3), (121, 0, 111)]:
        r, a, s = (src.affine @ [*ijk, 1])[:3]
        zyx = np.round((np.array([s, -a, -r]) - np.asarray(img.translate)) / np.asarray(img.scale)).astype(int)
        assert img.data[tuple(zyx)] == stored[ijk], ijk


@pytest.mark.gui
def test_gui_demo_opens_the_real_sample_and_runs_the_model_on_it(make_napari_viewer_proxy, qtbot):
    from types import SimpleNamespace

    from napari_genseg.demo import demo_volume
    from napari_genseg.ui._demo import show_in_viewer

    viewer = make_napari_viewer_proxy()
    vol, _, name, _ = demo_volume(None)
    args = SimpleNamespace(input=None, slices="105:107", model="msa2net", device="cpu")
    w = show_in_viewer(viewer, vol, name, args)
    assert w.worker is not None  # the run started by itself
    qtbot.waitUntil(lambda: w.worker is None, timeout=60000)
    img, lab = viewer.layers
    assert img.name == SAMPLE_CT_NAME and "82..111" in img.metadata["description"]
    assert lab.data.shape == (112, 101, 122) and lab.data[105:107].any()
    assert not lab.data[:105].any() and not lab.data[107:].any()
    assert viewer.dims.current_step[0] == 105  # the middle of the range is on screen
