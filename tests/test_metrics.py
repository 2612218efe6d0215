"""Hand-computed checks of napari_genseg.metrics (expected numbers derived in the comments)."""

import math

import numpy as np
import pytest

from napari_genseg import metrics as M


def a(*v):
    return np.array(v, dtype=bool)


# --------------------------------------------------------------------------------------------
# Dice / IoU
# --------------------------------------------------------------------------------------------
def test_dice_iou_hand():
    p = a(1, 1, 1, 0)
    r = a(0, 1, 1, 1)
    # |P|=3, |R|=3, |P&R|=2, |P|R|=4 -> Dice = 2*2/6 = 2/3, IoU = 2/4 = 1/2
    assert M.dice(p, r) == pytest.approx(2 / 3)
    assert M.iou(p, r) == pytest.approx(0.5)
    # non-bool input: anything > 0 is foreground
    assert M.dice(np.array([0, 2, 5]), np.array([0, 1, 0])) == pytest.approx(2 * 1 / (2 + 1))
    # both empty -> empty_value
    assert M.dice(a(0, 0), a(0, 0)) == 1.0
    assert M.iou(a(0, 0), a(0, 0), empty_value=0.0) == 0.0


# --------------------------------------------------------------------------------------------
# HD95
# --------------------------------------------------------------------------------------------
def test_hd95_anisotropic_single_voxels():
    spacing = (2.0, 1.0, 0.5)  # (sz, sy, sx) mm
    p = np.zeros((3, 4, 6), bool)
    r = np.zeros_like(p)
    p[1, 1, 1] = True
    r[1, 1, 3] = True
    # 2 voxels apart along x at 0.5 mm -> 1.0 mm in both directions
    assert M.hd95(p, r, spacing) == pytest.approx(1.0)
    r2 = np.zeros_like(p)
    r2[2, 1, 1] = True
    # 1 voxel apart along z at 2.0 mm -> 2.0 mm (checks that spacing[0] is the z axis)
    assert M.hd95(p, r2, spacing) == pytest.approx(2.0)
    r3 = np.zeros_like(p)
    r3[2, 3, 3] = True
    # offsets (1, 2, 2) voxels -> sqrt(2^2 + 2^2 + 1^2) = 3 mm
    assert M.hd95(p, r3, spacing) == pytest.approx(3.0)


def test_hd95_medpy_vs_monai_percentile():
    # one row, spacing 2 mm along x. With a single row every voxel is a surface voxel
    # (its up/down neighbours are outside the array = background).
    p = np.zeros((1, 10), bool)
    r = np.zeros((1, 10), bool)
    p[0, 0:4] = True  # surface x = 0,1,2,3
    r[0, 0:2] = True  # surface x = 0,1
    sp = (1.0, 2.0)
    # d(P->R) = [0, 0, 1, 2] voxels * 2 mm = [0, 0, 2, 4];  d(R->P) = [0, 0]
    d_pr, d_rp = M.surface_distances(p, r, sp)
    assert sorted(d_pr.tolist()) == [0, 0, 2, 4]
    assert sorted(d_rp.tolist()) == [0, 0]
    # medpy: percentile([0,0,0,0,2,4], 95): rank 0.95*5 = 4.75 -> 2 + 0.75*(4-2) = 3.5
    assert M.hd95(p, r, sp) == pytest.approx(3.5)
    # monai: max(percentile([0,0,2,4], 95), percentile([0,0], 95));
    #        rank 0.95*3 = 2.85 -> 2 + 0.85*(4-2) = 3.7
    assert M.hd95(p, r, sp, mode="monai") == pytest.approx(3.7)


def test_hd95_shifted_cube_mm():
    # a 6^3 cube shifted by 2 voxels along y at sy = 1.5 mm: every surface distance is <= 3 mm,
    # and the faces perpendicular to y are exactly 3 mm apart -> HD95 = 3 mm
    p = np.zeros((12, 12, 12), bool)
    r = np.zeros_like(p)
    p[3:9, 3:9, 3:9] = True
    r[3:9, 5:11, 3:9] = True
    h = M.hd95(p, r, (3.0, 1.5, 0.7))
    assert h == pytest.approx(3.0)


def test_hd95_empty_is_nan():
    p = np.zeros((4, 4), bool)
    r = p.copy()
    r[1, 1] = True
    assert math.isnan(M.hd95(p, r, (1.0, 1.0)))


# --------------------------------------------------------------------------------------------
# TransUNet convention
# --------------------------------------------------------------------------------------------
def test_case_metrics_empty_conventions():
    e = np.zeros((3, 3, 3), bool)
    f = e.copy()
    f[1, 1, 1] = True
    sp = (3.0, 1.0, 1.0)
    # pred empty, ref non-empty -> Dice 0, HD95 0
    assert M.case_metrics(e, f, sp) == {"dice": 0.0, "iou": 0.0, "hd95_mm": 0.0}
    # pred non-empty, ref empty -> Dice 1, HD95 0
    assert M.case_metrics(f, e, sp) == {"dice": 1.0, "iou": 1.0, "hd95_mm": 0.0}
    # both empty: spec "empty prediction -> Dice 0" (official calculate_metric_percase)
    assert M.case_metrics(e, e, sp) == {"dice": 0.0, "iou": 0.0, "hd95_mm": 0.0}
    assert M.case_metrics(e, e, sp, both_empty_dice=1.0)["dice"] == 1.0
    # both non-empty and identical -> 1, 1, 0
    assert M.case_metrics(f, f, sp) == {"dice": 1.0, "iou": 1.0, "hd95_mm": 0.0}


def test_evaluate_labels():
    ref = np.zeros((1, 4, 4), np.uint8)
    pred = np.zeros_like(ref)
    ref[0, 0, 0:2] = 1  # class 1: 2 voxels
    pred[0, 0, 1:3] = 1  # overlap 1 -> Dice 2*1/4 = 0.5, IoU 1/3
    ref[0, 3, 3] = 2  # class 2 missed entirely -> Dice 0
    res = M.evaluate_labels(pred, ref, (1.0, 1.0, 1.0), {1: "liver", 2: "spleen", 3: "absent"})
    assert res["liver"]["dice"] == pytest.approx(0.5)
    assert res["liver"]["iou"] == pytest.approx(1 / 3)
    # surfaces (every voxel of a 1-voxel-thick row): P = x{1,2}, R = x{0,1}:
    # d(P->R) = [0, 1], d(R->P) = [1, 0] -> percentile([0,0,1,1], 95) = 1
    assert res["liver"]["hd95_mm"] == pytest.approx(1.0)
    assert res["spleen"] == {"dice": 0.0, "iou": 0.0, "hd95_mm": 0.0}
    assert res["absent"]["dice"] == 0.0


# --------------------------------------------------------------------------------------------
# multi-annotator metrics
# --------------------------------------------------------------------------------------------
def test_pairwise_distance_both_empty_zero():
    x = np.zeros((2, 5), bool)
    x[1, :2] = True
    d = M.pairwise_iou_distance(x, x)
    # d(empty, empty) = 0, d(empty, non-empty) = 1 - 0 = 1
    np.testing.assert_allclose(d, [[0, 1], [1, 0]])


def test_ged_identical_sets_zero():
    rng = np.random.default_rng(0)
    y = rng.random((4, 8, 8)) > 0.5
    assert M.generalized_energy_distance(y, y.astype(np.float32)) == pytest.approx(0.0, abs=1e-12)
    assert M.ged(y, y) == pytest.approx(0.0, abs=1e-12)


def test_ged_hand():
    y = np.array([[1, 1, 0, 0], [1, 0, 0, 0]], bool)
    s = np.array([[0.9, 0.8, 0.1, 0.0]])  # binarised > 0.5 -> [1, 1, 0, 0]
    # d(Y1,S1) = 0, d(Y2,S1) = 1 - 1/2 = 0.5 -> mean_ys = 0.25
    # d_yy = [[0, .5], [.5, 0]] -> mean 0.25 (diagonal included); d_ss = [[0]] -> 0
    # GED^2 = 2*0.25 - 0.25 - 0 = 0.25
    assert M.generalized_energy_distance(y, s) == pytest.approx(0.25)


def test_hm_iou_two_by_two():
    y = np.array([[1, 1, 0, 0], [0, 0, 1, 1]], bool)
    s = np.array([[0, 0, 1, 0], [1, 1, 1, 0]], float)
    # IoU(Y1,S1) = 0, IoU(Y1,S2) = 2/3, IoU(Y2,S1) = 1/2, IoU(Y2,S2) = 1/4
    # matchings: {Y1-S1, Y2-S2}: d = 1 + 3/4 = 1.75; {Y1-S2, Y2-S1}: d = 1/3 + 1/2 -> chosen
    # HM-IoU = (2/3 + 1/2) / 2 = 7/12
    assert M.hm_iou(y, s) == pytest.approx(7 / 12)
    # N = 1 < A = 2: the sample is repeated to 2 -> matched to both annotations
    # (2/3 + 1/4) / 2 = 11/24
    assert M.hm_iou(y, s[1:]) == pytest.approx(11 / 24)


def test_hm_iou_spec_repeat_4_to_16():
    rng = np.random.default_rng(1)
    y = rng.random((4, 6, 6)) > 0.5
    s = np.concatenate([y] * 4).astype(float)  # 16 samples = each annotation 4 times
    assert M.hm_iou(y, s) == pytest.approx(1.0)
    s2 = s.copy()
    s2[0] = 1 - s2[0]  # one sample inverted: only that pair loses
    iou_inv = M.iou(y[0], s2[0] > 0.5, empty_value=1.0)
    assert M.hm_iou(y, s2) == pytest.approx((15 + iou_inv) / 16)


def test_soft_dice_hand():
    y = np.array([[1, 1, 0, 0], [1, 0, 0, 0]], float)  # soft ref = [1, .5, 0, 0]
    s = np.array([[0.9, 0.8, 0.2, 0.0], [0.7, 0.0, 0.6, 0.0]])  # mean pred = [.8, .4, .4, 0]
    # tau 0.1: P=[1,1,1,0], R=[1,1,0,0] -> 2*2/(3+2) = 0.8
    # tau 0.3: same -> 0.8
    # tau 0.5: P=[1,0,0,0], R=[1,0,0,0] (0.5 is not > 0.5) -> 1
    # tau 0.7: P=[1,0,0,0], R=[1,0,0,0] -> 1
    # tau 0.9: P empty, R=[1,0,0,0] -> 0
    # mean = (0.8 + 0.8 + 1 + 1 + 0) / 5 = 0.72
    assert M.soft_dice(y, s) == pytest.approx(0.72, abs=1e-6)
    # both empty at every tau -> 1
    assert M.soft_dice(np.zeros((2, 3)), np.zeros((4, 3))) == pytest.approx(1.0)


def test_dataset_multiannotator_metrics():
    y1 = np.array([[1, 1, 0, 0], [1, 0, 0, 0]], bool)
    s1 = np.array([[0.9, 0.8, 0.1, 0.0], [0.9, 0.8, 0.1, 0.0]])
    y2 = np.array([[0, 0, 1, 1], [0, 0, 1, 1]], bool)
    s2 = np.array([[0, 0, 1, 1], [0, 0, 1, 1]], float)
    res = M.dataset_multiannotator_metrics([(y1, s1), (y2, s2)], n_list=(1, 2))
    # image 2 is perfect: GED 0, HM-IoU 1, Soft-Dice 1
    # image 1, N=1: GED 0.25 (see test_ged_hand); N=2: the two samples are identical,
    #   so d_ys/d_ss are unchanged -> 0.25 as well
    assert res[1]["ged"] == pytest.approx((0.25 + 0) / 2)
    assert res[2]["ged"] == pytest.approx((0.25 + 0) / 2)
    # image 1 HM-IoU: every sample = [1,1,0,0]; IoU with Y1 = 1, Y2 = 1/2 -> mean 3/4
    assert res[2]["hm_iou"] == pytest.approx((0.75 + 1) / 2)
    assert res[1]["hm_iou"] == pytest.approx((0.75 + 1) / 2)
    # image 1 Soft-Dice: ref [1,.5,0,0], pred [.9,.8,.1,0]
    # tau .1: P=[1,1,0,0] R=[1,1,0,0] -> 1; .3: same -> 1; .5: P=[1,1,0,0] R=[1,0,0,0] -> 2/3
    # .7: same -> 2/3; .9: P empty, R=[1,0,0,0] -> 0  => (1+1+2/3+2/3+0)/5 = 2/3
    assert res[2]["soft_dice"] == pytest.approx((2 / 3 + 1) / 2, abs=1e-6)
    assert res[2]["n_images"] == 2
    with pytest.raises(ValueError):
        M.dataset_multiannotator_metrics([(y1, s1)], n_list=(1, 4))


def test_interrater_metrics_leave_one_out_hand():
    """Y0 = 1100, Y1 = 1110, Y2 = 0000 (values worked out in the comments)."""
    y = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]], bool)
    r = M.interrater_metrics(y)
    # GED^2 leave-one-out: k=0: 2*(1/3+1)/2 - (0+1+1+0)/4 = 5/6; k=1: 5/6; k=2: 2*1 - (2/3)/4 = 11/6
    assert r["ged"] == pytest.approx((5 / 6 + 5 / 6 + 11 / 6) / 3)
    # HM-IoU: k=0: (2/3 + 0)/2, k=1: (2/3 + 0)/2, k=2: (0 + 0)/2 (Y2 is empty, the others are not)
    assert r["hm_iou"] == pytest.approx(2 / 9)
    # Soft-Dice: k=0: ref .5 .5 .5 0 vs 1100 -> Dice 0.8 at tau .1/.3, ~0 above (ref empty): 0.32;
    # k=1: ref .5 .5 0 0 vs 1110 -> 0.32; k=2: empty prediction against a non-empty ref -> ~0
    assert r["soft_dice"] == pytest.approx(0.64 / 3, abs=1e-5)
    assert r["pairwise_iou"] == pytest.approx(2 / 9)
    assert r["pairwise_dice"] == pytest.approx((0.8 + 0 + 0) / 3)
    # identical annotators agree perfectly; empty-vs-empty counts as agreement (d = 0)
    same = M.interrater_metrics(np.stack([y[1]] * 4))
    assert same["ged"] == pytest.approx(0) and same["hm_iou"] == pytest.approx(1) and same["pairwise_dice"] == 1
    empty = M.interrater_metrics(np.zeros((3, 5), bool))
    assert empty["ged"] == 0 and empty["hm_iou"] == 1 and empty["soft_dice"] == pytest.approx(1)
    with pytest.raises(ValueError):
        M.interrater_metrics(y[:1])
