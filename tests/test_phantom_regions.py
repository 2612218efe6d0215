"""Pelvis and thorax phantoms (negatives for the liver/spleen models): anatomy on the right side,
no liver or spleen, HU ranges, determinism, and the ``phantom:N@S/REGION`` data spec."""

import numpy as np
import pytest

from napari_genseg.phantom import make_phantom
from napari_genseg.phantom_regions import TORSO_CLASSES, make_region_phantom

BONE, BLADDER, LUNG, HEART, BOWEL = 5, 7, 8, 9, 10
SHAPE, SPACING = (24, 112, 112), (5.0, 3.0, 3.0)


@pytest.fixture(scope="module")
def pelvis():
    return [make_region_phantom(s, "pelvis", SHAPE, SPACING) for s in range(3)]


@pytest.fixture(scope="module")
def thorax():
    return [make_region_phantom(s, "thorax", SHAPE, SPACING) for s in range(3)]


def _centroid_mm(ph, label):
    """Centroid of a label in mm from the volume centre: (z sup+, y post+, x left+)."""
    idx = np.argwhere(ph.labels == label).mean(axis=0)
    return (idx - (np.asarray(ph.labels.shape) - 1) / 2) * np.asarray(ph.spacing)


def test_class_names_extend_the_abdomen_classes():
    assert TORSO_CLASSES[:7] == make_phantom(0, shape=(4, 32, 32), spacing=(5, 6, 6)).class_names
    assert TORSO_CLASSES[7:] == ("urinary_bladder", "lung", "heart", "bowel")


@pytest.mark.parametrize("region", ["pelvis", "thorax"])
def test_no_liver_or_spleen_and_deterministic(region):
    a = make_region_phantom(5, region, SHAPE, SPACING)
    b = make_phantom(5, SHAPE, SPACING, region=region)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.isin(a.labels, (1, 2, 3, 4, 6)).any()
    assert a.class_names == TORSO_CLASSES and a.meta["region"] == region
    assert a.image.dtype == np.int16 and a.image.shape == SHAPE
    c = make_region_phantom(6, region, SHAPE, SPACING)
    assert not np.array_equal(a.image, c.image)


def test_pelvis_anatomy(pelvis):
    for ph in pelvis:
        z, y, x = _centroid_mm(ph, BLADDER)
        assert y < -15 and abs(x) < 20, "bladder: anterior midline"
        assert z < 0, "bladder: lower half of the pelvis"
        hu = ph.image[ph.labels == BLADDER]
        assert -20 < np.median(hu) < 45, "urine + wall, water-like"
        assert (ph.labels == BONE).sum() > 0.01 * ph.labels.size
        assert (ph.labels == BOWEL).any()
    # a metal hip prosthesis appears in some seeds, on the side recorded in meta
    sides = [ph.meta["prosthesis_side"] for ph in pelvis]
    for ph, side in zip(pelvis, sides):
        metal = ph.image >= 2500
        if side:
            xs = np.argwhere(metal)[:, 2].mean() - (SHAPE[2] - 1) / 2
            assert np.sign(xs) == side  # +1 = patient left (x toward left)
        else:
            assert metal.sum() < 5


def test_thorax_anatomy(thorax):
    for ph in thorax:
        lung = ph.labels == LUNG
        assert lung.sum() > 0.1 * lung.size
        assert np.median(ph.image[lung]) < -700
        left = lung[..., SHAPE[2] // 2 + 5:].sum()
        right = lung[..., : SHAPE[2] // 2 - 5].sum()
        assert 0.5 < left / right < 2.0, "two lungs"
        z, y, x = _centroid_mm(ph, HEART)
        assert y < 0 and x > 0, "heart: anterior, left of the midline"
        assert 60 < np.median(ph.image[ph.labels == HEART]) < 200  # contrast-enhanced blood pool/myocardium


def test_native_phase_heart_is_darker():
    a = make_region_phantom(1, "thorax", SHAPE, SPACING, phase="native")
    assert np.median(a.image[a.labels == HEART]) < 60


def test_bad_region_is_refused():
    with pytest.raises(ValueError, match="region"):
        make_phantom(0, region="head")


def test_data_spec_with_region_maps_negatives_to_background():
    from napari_genseg.training.data import DataSpecError, load_sources, parse_data_spec

    assert parse_data_spec("phantom:2@200/pelvis") == ("phantom", {"n": 2, "seed0": 200, "region": "pelvis"})
    assert parse_data_spec("phantom:3")[1]["region"] == "abdomen"
    with pytest.raises(DataSpecError, match="region"):
        parse_data_spec("phantom:2@0/head")
    (cases,) = load_sources(["phantom:1@7/thorax"], class_names=["background", "liver", "spleen"],
                            phantom_shape=SHAPE, phantom_spacing=SPACING)
    (c,) = cases
    assert c.name == "phantom_thorax_0007" and c.meta["region"] == "thorax"
    assert c.labels.max() == 0  # lungs, heart, bone: all background for a liver/spleen model
    (cases,) = load_sources(["phantom:1@7/pelvis"], class_names=["background", "urinary_bladder"],
                            phantom_shape=SHAPE, phantom_spacing=SPACING)
    ph = make_region_phantom(7, "pelvis", SHAPE, SPACING)
    np.testing.assert_array_equal(cases[0].labels == 1, ph.labels == BLADDER)
