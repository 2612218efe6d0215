"""Region-of-interest mode: box parsing, crop geometry (mm, anisotropic pixels) and the AR-Seg ROI
predictor mapping its masks back into the box exactly (marker voxels)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from napari_genseg.errors import InputError
from napari_genseg.roi import RoiBox, RoiCrop, RoiError, crop_for_box, parse_roi


def test_parse_roi_good_and_bad():
    b = parse_roi("1:3, 12:30,40:52", (5, 50, 70))
    assert b == RoiBox(1, 3, 12, 30, 40, 52) and b.shape == (2, 18, 12) and str(b) == "1:3,12:30,40:52"
    for spec, msg in (("1:3,12:30", "z0:z1,y0:y1,x0:x1"), ("1:3,a:30,40:52", "'a:30'"), ("1:3,12,40:52", "'12'"),
                      ("3:3,12:30,40:52", "empty z range"), ("1:3,12:60,40:52", "outside 0:50"),
                      ("-1:3,12:30,40:52", "outside")):
        with pytest.raises(RoiError, match=msg) as ei:
            parse_roi(spec, (5, 50, 70))
        assert isinstance(ei.value, InputError) and "\n" not in str(ei.value)


def test_crop_covers_the_field_of_view_in_mm_and_maps_back_exactly():
    """A linear ramp survives slice -> crop -> box exactly (bilinear reproduces linear functions),
    which pins both mappings; the crop's pixel centres span fov_mm - one pixel, in mm."""
    sy, sx = 0.8, 1.3
    yy, xx = np.meshgrid(np.arange(50.0), np.arange(70.0), indexing="ij")
    ramp = (3.0 * yy - 2.0 * xx)[None].astype(np.float32)
    box = RoiBox(0, 1, 12, 30, 40, 52)  # off-centre, 18 x 12 voxels = 14.4 x 15.6 mm
    crop = crop_for_box(box, (sy, sx), 24.0, 64)
    assert crop.fov_mm == 24.0 and crop.zoom == 1.0 and crop.center_yx == (20.5, 45.5)
    ys, xs = crop.sample_points()
    assert (ys[-1] - ys[0]) * sy == pytest.approx(24.0 - 24.0 / 64)
    assert (xs[-1] - xs[0]) * sx == pytest.approx(24.0 - 24.0 / 64)
    c = crop.from_slices(ramp, pad_value=-1e4)
    assert c.shape == (1, 64, 64) and c.min() > -1e4  # all inside the 50 x 70 slice
    back = crop.to_box(c, box)
    np.testing.assert_allclose(back[0], ramp[0, 12:30, 40:52], atol=1e-3)
    # a box larger than the field of view widens the crop to the box's larger side (zoom > 1)
    big = crop_for_box(RoiBox(0, 1, 0, 50, 0, 40), (sy, sx), 24.0, 64)
    assert big.fov_mm == pytest.approx(52.0) and big.zoom == pytest.approx(52.0 / 24.0)
    # outside the slice: pad value
    edge = crop_for_box(RoiBox(0, 1, 0, 4, 0, 4), (sy, sx), 24.0, 64).from_slices(ramp, pad_value=-1e4)
    assert (edge[0, 0, 0] == -1e4) and (edge[0, -1, -1] > -1e4)


class _ThresholdModel(torch.nn.Module):
    """A model double whose 'segmentation' of a crop is the crop's bright voxels: embed = the input;
    sample stashes each slice's embedding and returns tokens naming it; decode resizes that crop to
    the mask grid (same field of view) and returns +-logits around half the marker intensity. So the
    masks seen in the box are the marker voxels exactly when both geometric mappings are right."""

    def __init__(self, img_size=64, mask_size=32):
        super().__init__()
        self.cfg = SimpleNamespace(img_size=img_size, mask_size=mask_size, num_scales=8)
        self.stash = []
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def embed(self, x):
        return x

    def sample(self, emb, cls, n_samples, generator=None, top_k=None, **kw):
        ids = []
        for e in emb:
            self.stash.append(e)
            ids.append(torch.full((n_samples, 204), len(self.stash) - 1, dtype=torch.long))
        return torch.stack(ids)

    def decode(self, tokens, upto_scale=None):
        e = self.stash[int(tokens[0, 0])][None]  # (1, 1, S, S), normalised to [0, 1]
        m = torch.nn.functional.interpolate(e, size=(self.cfg.mask_size,) * 2, mode="bilinear",
                                            align_corners=False, antialias=True)
        return ((m - 0.5) * 40.0).expand(tokens.shape[0], -1, -1, -1)


def _roi_predictor(model, fov_mm, n=3):
    from napari_genseg.predictors.arseg import ArSegPredictor
    from napari_genseg.predictors.arseg_roi import ArSegRoiPredictor
    from napari_genseg.preprocessing import Normalization, SliceGrid

    norm = Normalization.from_dict({"kind": "hu_window", "low": 0.0, "high": 1000.0})
    base = ArSegPredictor(model, ["background", "lesion"], norm, SliceGrid(model.cfg.img_size), device="cpu",
                          n_samples=n)
    return ArSegRoiPredictor(base, fov_mm)


def test_roi_masks_land_on_the_marker_voxels_of_an_off_centre_box_with_anisotropic_pixels():
    vol = np.zeros((5, 50, 70), np.float32)
    markers = [(1, 13, 41), (1, 13, 42), (1, 14, 41), (1, 28, 50), (2, 20, 45), (2, 12, 51), (2, 29, 40)]
    for m in markers:
        vol[m] = 1000.0
    outside = [(1, 11, 41), (1, 20, 52), (0, 20, 45), (3, 20, 45), (2, 30, 45)]  # just outside the box
    for m in outside:
        vol[m] = 1000.0
    box = RoiBox(1, 3, 12, 30, 40, 52)
    pred = _roi_predictor(_ThresholdModel(), fov_mm=16.0)  # image px 0.25 mm, mask px 0.5 mm
    res = pred.run(vol, (3.0, 0.8, 1.3), box, batch_size=1)
    assert res.votes.shape == (2, 18, 12) and res.tokens.shape == (2, 3, 204) and not res.warnings
    expected = vol[box.slices] > 0
    np.testing.assert_array_equal(res.votes == 3, expected)
    np.testing.assert_array_equal(res.votes == 0, ~expected)
    labels = np.full(vol.shape, 7, np.uint8)  # pasting replaces the box only
    res.paste(labels)
    inside = np.zeros(vol.shape, bool)
    inside[box.slices] = True
    assert (labels[~inside] == 7).all()
    np.testing.assert_array_equal(np.argwhere(labels == 1), np.array(sorted(markers)))
    # the scale progression and samples decode onto the same voxels
    votes_k, masks = pred.decode_progression(res.tokens[1], res.crop, box)
    assert votes_k.shape == (8, 18, 12) and masks.shape == (3, 18, 12)
    np.testing.assert_array_equal(votes_k[-1], res.votes[1])
    np.testing.assert_array_equal(res.variability(), np.zeros((2, 18, 12)))


def test_roi_box_larger_than_the_field_of_view_warns_and_still_covers_the_box():
    vol = np.zeros((2, 60, 60), np.float32)
    vol[0, 4:7, 5:8] = vol[0, 49:52, 51:54] = 1000.0  # 3 x 3 markers
    pred = _roi_predictor(_ThresholdModel(img_size=64, mask_size=64), fov_mm=10.0)
    box = RoiBox(0, 1, 0, 60, 0, 60)  # 30 x 30 mm at 0.5 mm: 3x the 10 mm field of view
    res = pred.run(vol, (0.5, 0.5), box)
    assert res.crop.zoom == pytest.approx(3.0) and "3.00x smaller" in res.warnings[0]
    assert res.votes.shape == (1, 60, 60)
    # crop px 30/64 mm ~ slice px: the markers are found where they are, give or take their rim
    hit = res.votes[0] == res.n
    assert hit[5, 6] and hit[50, 52] and hit.sum() >= 2
    near = np.zeros((60, 60), bool)
    near[3:8, 4:9] = near[48:53, 50:55] = True
    assert not (hit & ~near).any()


def test_roi_predictor_with_the_real_tiny_model_and_checkpoint_contract(arseg_tiny_checkpoint):
    from napari_genseg.models.checkpoints import load_checkpoint
    from napari_genseg.predictors.arseg_roi import ArSegRoiPredictor, roi_meta
    from napari_genseg.predictors.base import PredictorOptionError

    ck = load_checkpoint(arseg_tiny_checkpoint)
    assert roi_meta(ck) is None
    with pytest.raises(PredictorOptionError, match="whole slices"):
        ArSegRoiPredictor.from_checkpoint(ck, device="cpu")
    ck.input["roi"] = {"fov_mm": 40.0}
    pred = ArSegRoiPredictor.from_checkpoint(ck, device="cpu", n_samples=4, target_class=2)
    assert pred.fov_mm == 40.0
    vol = np.random.default_rng(0).normal(50, 30, (4, 40, 48)).astype(np.float32)
    box = RoiBox(1, 4, 5, 22, 30, 41)
    res = pred.run(vol, (2.5, 0.9, 0.7), box, batch_size=2)
    assert res.votes.shape == (3, 17, 11) and res.votes.max() <= 4 and res.tokens.dtype == np.int16
    for i in range(3):
        vk, masks = pred.decode_progression(res.tokens[i], res.crop, box)
        np.testing.assert_array_equal(vk[-1], res.votes[i])
        np.testing.assert_array_equal(masks.sum(0), res.votes[i])
        probs = pred.sample_probabilities(res.tokens[i], res.crop, box)
        np.testing.assert_array_equal(probs > 0.5, masks)
    assert set(np.unique(res.labels())) <= {0, 2}


def test_shipped_roi_demo_finds_a_phantom_lesion_in_a_box():
    """The shipped crop checkpoint (models/arseg_roi_demo) on a lesion of an unseen phantom: a weak
    model (its card), but its samples mark the lesion far more often than the liver around it in
    the box, and each sample overlaps the lesion."""
    from scipy import ndimage as ndi

    from napari_genseg.metrics import dice
    from napari_genseg.models.checkpoints import load_checkpoint
    from napari_genseg.phantom import LESION, make_phantom
    from napari_genseg.predictors.arseg_roi import ArSegRoiPredictor, shipped_roi_checkpoint

    path = shipped_roi_checkpoint()
    if path is None:
        pytest.skip("models/arseg_roi_demo.safetensors is not installed")
    torch.set_num_threads(1)
    ck = load_checkpoint(path)
    assert ck.input["roi"]["fov_mm"] == 48.0 and list(ck.class_names) == ["background", "liver_lesion"]
    ph = make_phantom(seed=1001, shape=(40, 224, 224), spacing=(3.0, 1.5, 1.5))
    lesion = ph.labels == LESION
    z = int(np.argmax(lesion.sum((1, 2))))
    lab, _ = ndi.label(lesion[z])
    big = np.argmax(np.bincount(lab.ravel())[1:]) + 1
    ys, xs = np.where(lab == big)
    box = RoiBox(z, z + 1, ys.min() - 4, ys.max() + 5, xs.min() - 4, xs.max() + 5)
    pred = ArSegRoiPredictor.from_checkpoint(ck, device="cpu", n_samples=8)
    res = pred.run(ph.image, ph.spacing, box)
    ref = lesion[box.slices][0]
    freq = res.votes[0] / res.n
    assert freq[ref].mean() > 3 * freq[~ref].mean()
    masks = pred.decode_samples(res.tokens[0], res.crop, box)
    assert np.mean([dice(m, ref) for m in masks]) > 0.3


def _whole_slice_crop(crop, a, pad_value, order):
    """The crop computed on the whole slice (filter everything, sample, pad): the reference the
    windowed ``RoiCrop.from_slices`` must equal bit for bit."""
    from scipy import ndimage as ndi

    a = np.asarray(a, np.float32)
    h, w = a.shape
    ys, xs = crop.sample_points()
    sigma = tuple(max(0.0, (crop.pixel_mm / s - 1.0) / 2.0) for s in crop.spacing_yx)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    if order >= 1 and max(sigma) > 0:
        a = ndi.gaussian_filter(a, sigma=sigma, mode="nearest")
    v = ndi.map_coordinates(a, [yy, xx], order=order, mode="nearest")
    inside = (yy >= -0.5) & (yy <= h - 0.5) & (xx >= -0.5) & (xx <= w - 0.5)
    return np.where(inside, v, np.float32(pad_value))


def test_crop_reads_only_its_window_and_equals_the_whole_slice_crop(monkeypatch):
    """Crops at the slice's edges, outside it, with and without the anti-aliasing filter, of float
    and bool slices: equal to filtering and sampling the whole slice; and the filter runs on the
    crop's window, not on the whole slice (a 512² slice was filtered whole for every crop)."""
    from napari_genseg import roi

    rng = np.random.default_rng(0)
    img = rng.normal(0, 300, (90, 70)).astype(np.float32)
    mask = img > 200
    seen, real = [], roi.ndi.gaussian_filter

    def windowed(crop, a, pad, order):
        monkeypatch.setattr(roi.ndi, "gaussian_filter", lambda a, **kw: seen.append(a.shape) or real(a, **kw))
        try:
            return crop.from_slices(a, pad_value=pad, order=order)
        finally:
            monkeypatch.setattr(roi.ndi, "gaussian_filter", real)

    cases = [((45.0, 35.0), (0.5, 0.7), 20.0, 16),   # crop pixel 1.25 mm > slice pixels: filtered
             ((0.0, 69.0), (0.8, 0.6), 30.0, 32),    # a corner, half outside
             ((89.4, -3.0), (1.0, 1.0), 12.0, 24),   # crop pixel < slice pixel: no filter
             ((200.0, 30.0), (1.0, 1.0), 10.0, 8),   # wholly outside the slice
             ((10.5, 20.25), (0.4, 2.0), 15.0, 17)]  # anisotropic: filtered along y only
    for centre, spacing, fov, size in cases:
        crop = RoiCrop(centre, spacing, fov, size)
        for a, pad in ((img, -1024.0), (mask, 0.0)):
            for order in (0, 1):
                np.testing.assert_array_equal(windowed(crop, a, pad, order),
                                              _whole_slice_crop(crop, a, pad, order))
    assert seen and all(s[0] * s[1] < img.size // 2 for s in seen), seen
