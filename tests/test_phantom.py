"""Synthetic abdomen phantom: determinism, anatomy/orientation, HU ranges, annotators."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_genseg.phantom import PHANTOM_CLASSES, Phantom, make_phantom, phantom_sample_data

LIVER, SPLEEN, KID_R, KID_L, BONE, LESION = 1, 2, 3, 4, 5, 6


@pytest.fixture(scope="module")
def ph0() -> Phantom:
    return make_phantom(seed=0)


@pytest.fixture(scope="module")
def ph1() -> Phantom:
    return make_phantom(seed=1)


def test_classes():
    assert PHANTOM_CLASSES == (
        "background", "liver", "spleen", "kidney_right", "kidney_left", "bone", "liver_lesion",
    )


def test_types_and_geometry(ph0):
    assert ph0.image.shape == (40, 160, 160) and ph0.image.dtype == np.int16
    assert ph0.labels.shape == ph0.image.shape and ph0.labels.dtype == np.uint8
    assert ph0.spacing == (3.0, 1.5, 1.5)
    assert ph0.class_names == PHANTOM_CLASSES
    assert set(np.unique(ph0.labels)) <= set(range(len(PHANTOM_CLASSES)))
    for k in range(1, 7):
        assert (ph0.labels == k).any(), PHANTOM_CLASSES[k]
    aff = ph0.affine
    assert aff.shape == (4, 4) and aff.dtype == np.float64
    np.testing.assert_allclose(np.diag(aff)[:3], [-1.5, -1.5, 3.0])
    # centre voxel (x, y, z) maps to RAS (0, 0, 0)
    centre = np.array([(160 - 1) / 2, (160 - 1) / 2, (40 - 1) / 2, 1.0])
    np.testing.assert_allclose(aff @ centre, [0, 0, 0, 1], atol=1e-9)


def test_affine_axcodes(ph0):
    nib = pytest.importorskip("nibabel")
    # voxel axes (i=x, j=y, k=z) point to patient Left, Posterior, Superior
    assert nib.aff2axcodes(ph0.affine) == ("L", "P", "S")


def test_deterministic():
    a = make_phantom(seed=7, shape=(16, 64, 64), spacing=(5.0, 3.5, 3.5))
    b = make_phantom(seed=7, shape=(16, 64, 64), spacing=(5.0, 3.5, 3.5))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.lesion_annotations, b.lesion_annotations)


def test_seeds_differ(ph0, ph1):
    assert not np.array_equal(ph0.labels, ph1.labels)
    assert not np.array_equal(ph0.image, ph1.image)
    # shapes vary, not just noise: the organ volumes differ by a visible amount
    for k in (LIVER, SPLEEN):
        n0, n1 = (ph0.labels == k).sum(), (ph1.labels == k).sum()
        assert abs(int(n0) - int(n1)) > 0.01 * max(n0, n1)


def _median(ph, k):
    return float(np.median(ph.image[ph.labels == k]))


@pytest.mark.parametrize("which", ["ph0", "ph1"])
def test_hu_ranges_portal_venous(which, request):
    ph = request.getfixturevalue(which)
    liver = _median(ph, LIVER)
    assert 90 <= liver <= 125
    assert 100 <= _median(ph, SPLEEN) <= 140
    assert _median(ph, KID_R) > 130 and _median(ph, KID_L) > 130
    assert _median(ph, BONE) > 200
    lesion = _median(ph, LESION)
    assert liver - 50 <= lesion <= liver - 20  # hypodense by ~30-40 HU
    # air outside the body (image corners)
    assert np.abs(ph.image[:, :4, :4].astype(float).mean() + 1000) < 10
    # subcutaneous fat near the anterior skin at the midline
    col = ph.image[:, :, 80].astype(float)
    assert (col < -60).any(axis=1).all()


def test_hu_native_phase():
    ph = make_phantom(seed=2, phase="native")
    assert 45 <= _median(ph, LIVER) <= 70
    assert _median(ph, SPLEEN) < _median(ph, LIVER)
    with pytest.raises(ValueError):
        make_phantom(seed=0, phase="arterial")


@pytest.mark.parametrize("which", ["ph0", "ph1"])
def test_orientation(which, request):
    ph = request.getfixturevalue(which)
    nx = ph.labels.shape[2]

    def centroid(k):
        return np.argwhere(ph.labels == k).mean(axis=0)  # (z, y, x)

    liver = centroid(LIVER)
    spleen = centroid(SPLEEN)
    kr, kl, bone = centroid(KID_R), centroid(KID_L), centroid(BONE)
    assert liver[2] < nx / 2 < spleen[2]  # liver at low x (patient right), spleen at high x
    assert kr[2] < nx / 2 < kl[2]
    assert kr[1] > liver[1] and kl[1] > liver[1]  # kidneys posterior to the liver
    assert bone[1] > ph.labels.shape[1] / 2  # spine posterior (high y)
    assert liver[0] > kr[0]  # liver superior to the right kidney


def test_lesion_annotations(ph0):
    ann = ph0.lesion_annotations
    assert ann is not None and ann.dtype == bool
    assert ann.shape == (4,) + ph0.image.shape
    assert all(a.any() for a in ann)
    assert any(not np.array_equal(ann[0], ann[i]) for i in range(1, 4))
    # lesion label = strict majority of annotators, inside the liver
    cons = ann.mean(axis=0) > 0.5
    lesion = ph0.labels == LESION
    assert lesion.any()
    assert np.array_equal(lesion, cons & lesion) and (cons & ~lesion).sum() <= 0.05 * cons.sum()
    # annotators stay close to each other (plausible variants, not random masks)
    inter = np.logical_and(ann[:, None], ann[None]).reshape(16, -1).sum(1)
    assert (inter > 0).all()


def test_annotator_count_and_none():
    p2 = make_phantom(seed=3, shape=(20, 80, 80), spacing=(4.0, 3.0, 3.0), n_annotators=2)
    assert p2.lesion_annotations.shape == (2, 20, 80, 80)
    p0 = make_phantom(seed=3, shape=(20, 80, 80), spacing=(4.0, 3.0, 3.0), n_annotators=0)
    assert p0.lesion_annotations is None
    assert (p0.labels == LESION).any()


def test_other_shape_noise_free():
    ph = make_phantom(seed=4, shape=(24, 96, 112), spacing=(5.0, 2.5, 2.0), noise_hu=0.0)
    assert ph.image.shape == (24, 96, 112)
    assert ph.spacing == (5.0, 2.5, 2.0)
    assert (ph.labels == LIVER).any() and (ph.labels == SPLEEN).any()
    # no noise: the air outside is exactly -1000
    assert ph.image[0, 0, 0] == -1000


def test_sample_data(ph0):
    layers = phantom_sample_data(seed=0)
    assert len(layers) == 2
    (img, ikw, itype), (lab, lkw, ltype) = layers
    assert itype == "image" and ltype == "labels"
    np.testing.assert_array_equal(img, ph0.image)
    np.testing.assert_array_equal(lab, ph0.labels)
    assert ikw["name"] == "phantom CT" and lkw["name"] == "phantom labels"
    assert tuple(ikw["scale"]) == ph0.spacing and tuple(lkw["scale"]) == ph0.spacing
    assert ikw["contrast_limits"] == (-160, 240)
    assert "spacing" in ikw["metadata"] and "affine" in ikw["metadata"]


def test_module_does_not_import_napari():
    src = Path(__file__).resolve().parents[1] / "src" / "napari_genseg" / "phantom.py"
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('phantom_mod', r'{src}')\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['phantom_mod'] = m\n"
        "spec.loader.exec_module(m)\n"
        "m.phantom_sample_data(seed=0, shape=(8, 32, 32), spacing=(6.0, 6.0, 6.0))\n"
        "assert 'napari' not in sys.modules, 'napari imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
