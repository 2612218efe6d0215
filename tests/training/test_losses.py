import math

import pytest
import torch

from napari_genseg.training.losses import (
    BoundaryDoULoss, DiceCELoss, boundary_count, boundary_dou_loss, one_hot,
)


def _perfect_logits(lab, k, scale=50.0):
    return one_hot(lab, k) * scale


def test_boundary_count_hand_case():
    t = torch.zeros(1, 1, 7, 7)
    t[0, 0, 2:5, 2:5] = 1  # 3x3 square: 8 boundary pixels, 1 interior
    assert boundary_count(t).tolist() == [8.0]
    t = torch.ones(1, 1, 4, 4)  # touches the image edge: zero padding -> edge pixels are boundary
    assert boundary_count(t).tolist() == [12.0]


def test_bdou_perfect_prediction_is_zero():
    lab = torch.zeros(2, 16, 16, dtype=torch.long)
    lab[:, 3:9, 3:9] = 1
    lab[:, 10:14, 2:12] = 2
    loss = boundary_dou_loss(_perfect_logits(lab, 3), lab)
    assert float(loss) < 1e-6


def test_bdou_matches_formula_by_hand():
    torch.manual_seed(0)
    lab = torch.zeros(1, 6, 6, dtype=torch.long)
    lab[0, 1:4, 1:4] = 1
    logits = torch.randn(1, 2, 6, 6)
    p = torch.softmax(logits, 1)
    s = 1e-5
    total = 0.0
    for c in range(2):
        t = (lab == c).float()[0]
        pc = p[0, c]
        # boundary: foreground pixels with a background 4-neighbour (zero padding)
        pad = torch.nn.functional.pad(t, (1, 1, 1, 1))
        nb = pad[:-2, 1:-1] + pad[2:, 1:-1] + pad[1:-1, :-2] + pad[1:-1, 2:]
        C = float(((t == 1) & (nb < 4)).sum())
        S = float(t.sum())
        alpha = min(2 * (1 - (C + s) / (S + s)) - 1, 0.8)
        inter, ys, zs = float((pc * t).sum()), float((t * t).sum()), float((pc * pc).sum())
        total += (zs + ys - 2 * inter + s) / (zs + ys - (1 + alpha) * inter + s)
    assert math.isclose(float(BoundaryDoULoss()(logits, lab)), total / 2, rel_tol=1e-5)
    # class 1: 3x3 square -> C=8, S=9, alpha = 2(1-8/9)-1 < 0; background: alpha truncated at 0.8
    assert float(boundary_dou_loss(logits, lab)) > 0


def test_bdou_gradient_lowers_loss():
    torch.manual_seed(0)
    lab = torch.zeros(1, 12, 12, dtype=torch.long)
    lab[0, 2:8, 3:9] = 1
    logits = torch.zeros(1, 2, 12, 12, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.3)
    l0 = float(boundary_dou_loss(logits, lab).detach())
    for _ in range(30):
        opt.zero_grad()
        boundary_dou_loss(logits, lab).backward()
        opt.step()
    assert float(boundary_dou_loss(logits, lab).detach()) < 0.5 * l0


def test_dice_ce_perfect_small_and_wrong_large():
    lab = torch.zeros(2, 10, 10, dtype=torch.long)
    lab[:, 2:6, 2:6] = 1
    lab[:, 7:9, 1:9] = 2
    crit = DiceCELoss()
    good = float(crit(_perfect_logits(lab, 3), lab))
    bad = float(crit(_perfect_logits((lab + 1) % 3, 3), lab))
    assert good < 1e-3 and bad > 1.0
