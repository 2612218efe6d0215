"""Issue 13: correct the coarse shape, let AR-Seg redraw the finer scales.

Teacher-forced prefix in sampling (KV cache and uncached paths), ``ArSegPredictor.redraw`` (tokens
of the edited mask kept, no re-embedding, box and clicks), the mask-grid geometry proven with marker
pixels, and ROI mode. Tiny random-weight models except where a trained mask VQ is needed (the
shipped demo's, for encode -> decode at the same place).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _doubles import cached_vs_uncached_sampling

from napari_genseg.errors import InputError
from napari_genseg.models import registry
from napari_genseg.models.arseg import sampling
from napari_genseg.predictors.arseg import ArSegPredictor, RedrawError, cell_block
from napari_genseg.predictors.embedding_cache import EmbeddingCache
from napari_genseg.preprocessing import Normalization, SliceGrid

pytestmark = pytest.mark.usefixtures("one_torch_thread")

K = 8
OFFSETS = [0, 1, 5, 14, 30, 55, 91, 140, 204]  # sum of pn² for patch_nums 1..8


def _tiny():
    torch.manual_seed(0)
    return registry.create_model("arseg_tiny").eval()


def _predictor(model=None, grid=None, cache="off", n=4):
    model = model or _tiny()
    return ArSegPredictor(model, ["background", "lesion", "organ"], Normalization.from_dict({"kind": "minmax"}),
                          grid or SliceGrid(64, "resize"), device="cpu", n_samples=n, embedding_cache=cache)


def _slice(seed=0, hw=(48, 40)):
    rng = np.random.default_rng(seed)
    img = rng.normal(0.0, 80.0, hw).astype(np.float32)
    img[hw[0] // 4: hw[0] // 2, hw[1] // 4: hw[1] * 3 // 4] += 300.0
    return img


def _blob(hw, cy, cx, ry, rx):
    yy, xx = np.mgrid[: hw[0], : hw[1]]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1


# ---- sampling with a teacher-forced prefix ---------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, K - 1])
def test_prefix_is_kept_and_cached_equals_uncached(k, monkeypatch):
    """ids[:, :, :L_k] == prefix; only scales k+1..K are drawn (k = K-1 still draws the last one);
    the KV-cache and the uncached path compute the same logits (float tolerance) and, forced to the
    same draws, the same ids."""
    m = _tiny()
    emb = m.embed(torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(k)))
    cls = torch.tensor([0, 2])
    ref = m.sample(emb, cls, 1, generator=torch.Generator().manual_seed(99))[:, 0]  # (2, 204)
    prefix = ref[:, : OFFSETS[k]].clone()
    a, b, lc, lu = cached_vs_uncached_sampling(monkeypatch, m, emb, cls, 3, prefix)
    assert a.shape == (2, 3, 204) and a.dtype == torch.int64 and torch.equal(a, b)
    assert torch.equal(a[:, :, : OFFSETS[k]], prefix[:, None].expand(-1, 3, -1))
    assert len(lc) == len(lu) == K - k  # scales k+1..K drawn, nothing else
    for s, (x, y) in enumerate(zip(lc, lu)):
        pn = k + 1 + s
        assert x.shape == y.shape == (6, pn * pn, x.shape[-1])
        torch.testing.assert_close(x, y, rtol=0, atol=2e-5)


@pytest.mark.parametrize("use_kv_cache", [True, False])
@pytest.mark.parametrize("k", [1, 3, K - 1])
def test_teacher_forced_prefix_equals_the_unforced_path(k, use_kv_cache):
    """Forcing scales 1..k to the tokens an unforced run drew gives the logits of scale k+1 that
    run had (p(r_{k+1} | r_<=k, c, f) is the same distribution with or without teacher forcing):
    the prefix's f_hat, its scale inputs and their token positions match the plain path's."""
    m = _tiny()
    emb = m.embed(torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(11)))
    cls = torch.tensor([0, 2])
    real = sampling.draw_tokens
    seen = []
    try:
        sampling.draw_tokens = lambda lg, *a: (seen.append(lg.float().clone()), real(lg, *a))[1]
        ref = m.sample(emb, cls, 1, generator=torch.Generator().manual_seed(5), use_kv_cache=use_kv_cache)
        plain = list(seen)
        seen.clear()
        m.sample(emb, cls, 1, generator=torch.Generator().manual_seed(5), use_kv_cache=use_kv_cache,
                 prefix_ids=ref[:, 0, : OFFSETS[k]])
    finally:
        sampling.draw_tokens = real
    assert len(plain) == K and seen[0].shape == plain[k].shape == (2, (k + 1) ** 2, seen[0].shape[-1])
    torch.testing.assert_close(seen[0], plain[k], rtol=0, atol=2e-5)


def test_prefix_conditions_the_next_scale_and_runs_once_on_the_image_rows():
    """The logits of scale k+1 depend on the prefix (another prefix, other logits); the prefix scales
    run once on the B image rows, then one pass per remaining scale on the B*N rows (new tokens only)."""
    m = _tiny()
    emb = m.embed(torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(7)))
    cls = torch.tensor([1])
    k = 3
    seen = []
    real = sampling.draw_tokens
    calls = []
    hook = m.segmentor.blocks[0].register_forward_hook(lambda mod, inp, out: calls.append(tuple(inp[0].shape[:2])))
    try:
        sampling.draw_tokens = lambda lg, *a: (seen.append(lg.clone()), real(lg, *a))[1]
        p1 = torch.zeros(1, OFFSETS[k], dtype=torch.long)
        p2 = torch.arange(OFFSETS[k])[None] % 64
        m.sample(emb, cls, 5, generator=torch.Generator().manual_seed(0), prefix_ids=p1)
        first = seen[0]
        n_calls = list(calls)
        seen.clear()
        m.sample(emb, cls, 5, generator=torch.Generator().manual_seed(0), prefix_ids=p2)
    finally:
        sampling.draw_tokens = real
        hook.remove()
    assert (first - seen[0]).abs().max() > 1e-4
    assert n_calls[0] == (1, 16 + OFFSETS[k + 1])  # conditioning + start + inputs of scales 2..k+1
    assert n_calls[1:] == [(5, pn * pn) for pn in range(k + 2, K + 1)]


def test_prefix_errors():
    m = _tiny()
    emb = m.embed(torch.rand(2, 1, 64, 64))
    cls = torch.tensor([0, 0])
    full = torch.zeros(2, 204, dtype=torch.long)
    with pytest.raises(ValueError, match="k must be < K"):
        m.sample(emb, cls, 2, prefix_ids=full)  # a reference's own tokens, all K scales
    with pytest.raises(ValueError, match="not scales 1..k"):
        m.sample(emb, cls, 2, prefix_ids=full[:, :7])
    with pytest.raises(ValueError, match="B = 2"):
        m.sample(emb, cls, 2, prefix_ids=full[:1, :5])
    with pytest.raises(ValueError, match="0..63"):
        m.sample(emb, cls, 2, prefix_ids=full[:, :5] + 64)
    assert sampling.prefix_scales(140, m.cfg.patch_nums) == 7


# ---- redraw on the whole slice ------------------------------------------------------------------------
def _encoder_counter(model):
    calls = []
    return calls, model.image_encoder.register_forward_hook(lambda *a: calls.append(1))


def test_redraw_never_reembeds_a_cached_slice(tmp_path):
    """With the embedding cache (memory layer) or, without a cache, after ``set_image`` of the slice, a
    redraw runs no image encoder; a slice never seen is embedded once."""
    img, other = _slice(0), _slice(1)
    ed = np.zeros(img.shape, bool)
    ed[12:30, 8:28] = True
    for cache in (EmbeddingCache(None), "off"):
        p = _predictor(cache=cache)
        calls, hook = _encoder_counter(p.model)
        try:
            p.set_image(img[None])
            p.predict()
            assert len(calls) == 1
            r = p.redraw(img, ed, 3, seed=0)
            assert len(calls) == 1 and r.embedding_cached
            r2 = p.redraw(other, ed, 3, seed=0)
            assert len(calls) == 2 and not r2.embedding_cached
        finally:
            hook.remove()


def test_redraw_keeps_the_edited_tokens_and_is_seeded():
    p = _predictor(n=5)
    img = _slice(2)
    ed = _blob(img.shape, 20, 18, 10, 9)
    k = 4
    r = p.redraw(img, ed, k, seed=3)
    tok = p.encode_mask(ed)
    assert r.tokens.shape == (5, 204) and r.tokens.dtype == np.int64
    assert np.array_equal(r.edited_tokens, tok)
    assert (r.tokens[:, : OFFSETS[k]] == tok[: OFFSETS[k]]).all()
    assert r.samples.shape == (5, *img.shape) and r.samples.dtype == bool
    assert r.consensus.shape == img.shape and r.variability.dtype == np.float32
    assert r.from_scale == k and r.seconds > 0
    # consensus and variability are those of the N decoded samples
    votes = r.samples.sum(0)
    assert np.array_equal(r.consensus, votes / 5 > 0.5)
    assert np.allclose(r.variability, 100.0 / 5 * np.where(r.consensus, 5 - votes, votes))
    # the samples are the decoded tokens; the same seed in the same process draws the same tokens
    assert np.array_equal(r.samples, p.decode_samples(r.tokens, img.shape))
    again = p.redraw(img, ed, k, seed=3)
    assert np.array_equal(again.tokens, r.tokens)
    # exact prefix tokens (e.g. a reference's own) are kept as given, no quantisation
    ref = p.encode_mask(_blob(img.shape, 30, 10, 8, 6))
    pt = p.redraw(img, None, k, prefix_tokens=ref, seed=3)
    assert (pt.tokens[:, : OFFSETS[k]] == ref[: OFFSETS[k]]).all()
    with pytest.raises(RedrawError, match="at least 30 ids"):
        p.redraw(img, None, k, prefix_tokens=ref[:20])
    # the edited mask given on the mask grid is the same request
    on_grid = p.redraw(img, p.to_mask_grid(ed), k, edited_on="mask", seed=3)
    assert np.array_equal(on_grid.tokens, r.tokens)


def test_redraw_box_changes_nothing_outside_it():
    p = _predictor(n=4)
    img = _slice(3)
    rng = np.random.default_rng(0)
    previous = rng.random(img.shape) > 0.5
    box = (10, 30, 5, 22)
    r = p.redraw(img, _blob(img.shape, 24, 20, 12, 12), 2, seed=1, box=box, previous=previous)
    outside = np.ones(img.shape, bool)
    outside[10:30, 5:22] = False
    assert np.array_equal(r.consensus[outside], previous[outside])
    assert (r.variability[outside] == 0).all()
    inside = ~outside
    assert np.array_equal(r.consensus[inside], (r.samples.sum(0) / 4 > 0.5)[inside])
    assert r.box == box
    # without ``previous`` the outside is empty
    r0 = p.redraw(img, _blob(img.shape, 24, 20, 12, 12), 2, seed=1, box=box)
    assert not r0.consensus[outside].any()


def test_redraw_click_sets_its_cell_before_quantising():
    """A positive click on an empty mask and a negative one on a full mask set that scale-k cell's
    block of the mask grid (the tokens of scales 1..k come from the clicked mask)."""
    p = _predictor(n=2)
    img = _slice(4, hw=(96, 160))  # mask grid 32: 3 x 5 slice pixels per mask pixel
    k = 3
    r = p.redraw(img, np.zeros(img.shape, bool), k, seed=0, clicks=[(50, 10, True)])
    assert r.cells == [(1, 0)]  # u = floor(50.5 / 3) = 16 -> 16 * 3 // 32 = 1; v = floor(10.5 / 5) = 2 -> 0
    grid = np.zeros((32, 32), bool)
    grid[cell_block(1, 0, 3, 32)] = True
    assert grid.sum() == 11 * 11  # rows/cols 11..21 and 0..10: floor(u * 3 / 32) == 1 / == 0
    assert grid[11:22, 0:11].all()
    assert np.array_equal(r.edited_tokens, p.encode_grid(grid))
    r2 = p.redraw(img, np.ones(img.shape, bool), k, seed=0, clicks=[(50, 10, False)])
    assert np.array_equal(r2.edited_tokens, p.encode_grid(~grid))


@pytest.mark.parametrize("kwargs, match", [
    ({"from_scale": 0}, "scale must be an integer in 1..7"),
    ({"from_scale": 8}, "last scale leaves nothing"),
    ({"from_scale": 2.5}, "scale must be an integer"),
    ({"edited_mask": np.zeros((40, 48), bool)}, "differ in shape"),
    ({"edited_mask": np.zeros((31, 31), bool), "edited_on": "mask"}, r"must be \(32, 32\)"),
    ({"edited_on": "grid"}, "edited_on"),
    ({"box": (0, 49, 0, 10)}, "outside the 48 x 40 slice"),
    ({"box": (5, 5, 0, 10)}, "empty"),
    ({"box": (0, 10, 0)}, "4 integers"),
    ({"clicks": [(48, 3, True)]}, "outside the 48 x 40 slice"),
    ({"clicks": [(4, 3)]}, r"\(y, x, positive\)"),
    ({"previous": np.zeros((4, 4), bool)}, "previous mask"),
    ({"n_samples": 0}, "between 1 and 64"),
    ({"threshold": 1.0}, "threshold"),
    ({"target_class": 3}, "target class"),
    ({"spacing_yx": (0, 0)}, "finite pixel spacings > 0"),
    ({"spacing_yx": (-3, 3)}, "finite pixel spacings > 0"),
    ({"spacing_yx": (float("nan"), 1.0)}, "finite pixel spacings > 0"),
    ({"slice_hu": np.full((48, 40), np.nan, np.float32)}, "NaN/inf"),
])
def test_redraw_input_errors_are_one_line(kwargs, match):
    p = _predictor()
    img = kwargs.get("slice_hu", _slice(5))
    args = {"slice_hu": img, "edited_mask": np.zeros(img.shape, bool), "from_scale": 3, **kwargs}
    with pytest.raises(RedrawError, match=match) as info:
        p.redraw(args.pop("slice_hu"), args.pop("edited_mask"), args.pop("from_scale"), **args)
    assert isinstance(info.value, InputError) and "\n" not in str(info.value)


# ---- geometry of the mask grid on the slice, with marker pixels ---------------------------------------
GRIDS = [
    (SliceGrid(64, "resize"), (96, 160), (1.0, 1.0)),
    (SliceGrid(64, "spacing", (2.0, 2.0)), (100, 70), (1.0, 1.5)),   # padded: 25 x 26 of 32 mask pixels
    (SliceGrid(64, "spacing", (2.0, 2.0)), (300, 150), (1.0, 1.0)),  # cropped in y: 75 -> 32
]


@pytest.mark.parametrize("grid, hw, spacing", GRIDS)
def test_mask_grid_transform_puts_a_marker_where_it_is(grid, hw, spacing):
    """A marker blob goes to the mask grid (``to_mask_grid``); its centroid, placed with the napari
    scale/translate of ``mask_grid_transform``, lands on the slice blob's centroid (within half a mask
    pixel), and ``from_mask_grid`` brings it back to the same place; off-centre on purpose (y != x)."""
    p = _predictor(grid=grid)
    cy, cx = hw[0] * 0.4, hw[1] * 0.6
    ry, rx = max(6.0, hw[0] * 0.08), max(6.0, hw[1] * 0.06)
    blob = _blob(hw, cy, cx, ry, rx)
    g = p.to_mask_grid(blob, spacing)
    assert g.shape == (32, 32) and g.sum() > 4
    (sy, sx), (ty, tx) = p.mask_grid_transform(hw, spacing)
    gc = np.argwhere(g).mean(0) * (sy, sx) + (ty, tx)
    sc = np.argwhere(blob).mean(0)
    assert abs(gc[0] - sc[0]) <= sy / 2 and abs(gc[1] - sc[1]) <= sx / 2, (gc, sc)
    back = p.from_mask_grid(g, hw, spacing)
    bc = np.argwhere(back).mean(0)
    assert abs(bc[0] - sc[0]) <= sy / 2 and abs(bc[1] - sc[1]) <= sx / 2
    dice = 2 * (back & blob).sum() / (back.sum() + blob.sum())
    assert dice > 0.8


@pytest.mark.parametrize("grid, hw, spacing", GRIDS)
def test_click_cell_of_a_marker_pixel(grid, hw, spacing):
    """Every marker pixel lies inside the slice image of the block of the cell ``click_cell`` gives
    (mask pixel -> cell by floor(u p_k / M)); the cell index is the one computed by hand from the
    napari transform."""
    p = _predictor(grid=grid)
    (sy, sx), (ty, tx) = p.mask_grid_transform(hw, spacing)
    rng = np.random.default_rng(1)
    k, pn = 3, 3
    checked = 0
    cells = p.scale_cells(k, hw, spacing)
    assert cells.shape == hw
    for _ in range(60):
        y, x = int(rng.integers(hw[0])), int(rng.integers(hw[1]))
        u, v = (y - ty) / sy, (x - tx) / sx  # continuous mask-grid coordinates of the pixel centre
        uu, vv = int(np.floor(u + 0.5)), int(np.floor(v + 0.5))  # the mask pixel holding it
        if not (0 <= uu < 32 and 0 <= vv < 32):
            assert cells[y, x] == -1
            with pytest.raises(RedrawError, match="field of view"):
                p.click_cell(y, x, k, hw, spacing)
            continue
        if abs(u % 1 - 0.5) < 1e-6 or abs(v % 1 - 0.5) < 1e-6:
            continue  # on a mask-pixel border: bilinear gives exactly 0.5 there
        i, j = p.click_cell(y, x, k, hw, spacing)
        assert (i, j) == (uu * pn // 32, vv * pn // 32) and cells[y, x] == i * pn + j
        block = np.zeros((32, 32), bool)
        block[cell_block(i, j, pn, 32)] = True
        assert p.from_mask_grid(block, hw, spacing)[y, x]
        checked += 1
    assert checked > 10


def test_encode_then_scale_K_puts_a_marker_where_it_was():
    """With the shipped demo's trained mask VQ (spacing grid, 3 mm): an off-centre marker blob survives
    encode_mask -> scale_mask(k = K) at the same place (centroid within one mask pixel, 3 mm), and
    the coarse scales keep it within a scale-k cell."""
    from napari_genseg.models.checkpoints import load_checkpoint, shipped_checkpoint

    path = shipped_checkpoint("arseg")
    if path is None:
        pytest.skip("shipped AR-Seg demo not installed")
    p = ArSegPredictor.from_checkpoint(load_checkpoint(path), device="cpu", embedding_cache="off")
    hw, spacing = (160, 200), (2.0, 1.5)
    for cy, cx in [(50, 140), (110, 60)]:
        blob = _blob(hw, cy, cx, 16, 22)
        tok = p.encode_mask(blob, spacing)
        full = p.scale_mask(tok, K, hw, spacing)
        c = np.argwhere(full).mean(0)
        assert abs(c[0] - cy) * spacing[0] <= 3.0 and abs(c[1] - cx) * spacing[1] <= 3.0, (c, cy, cx)
        assert 2 * (full & blob).sum() / (full.sum() + blob.sum()) > 0.85
        for k in (3, 5):
            coarse = p.scale_mask(tok, k, hw, spacing)
            cc = np.argwhere(coarse).mean(0)
            cell_mm = 384.0 / (k)  # a scale-k cell of the 384 mm field of view
            assert abs(cc[0] - cy) * spacing[0] < cell_mm / 2 and abs(cc[1] - cx) * spacing[1] < cell_mm / 2


# ---- ROI mode ---------------------------------------------------------------------------------------
def test_roi_redraw_reuses_the_run_embedding_and_keeps_outside_the_region():
    from napari_genseg.predictors.arseg_roi import ArSegRoiPredictor
    from napari_genseg.roi import RoiBox

    p = _predictor(n=3)
    roi = ArSegRoiPredictor(p, fov_mm=40.0)
    rng = np.random.default_rng(0)
    image = rng.normal(0, 60, (3, 64, 64)).astype(np.float32)
    box = RoiBox(1, 2, 10, 40, 20, 44)
    spacing = (3.0, 1.0, 1.0)
    calls, hook = _encoder_counter(p.model)
    try:
        run = roi.run(image, spacing, box)
        assert len(calls) == 1
        h, w = 30, 24
        edited = _blob((h, w), 14, 11, 8, 7)
        prev = rng.random((h, w)) > 0.5
        r = roi.redraw(image, spacing, box, edited, 3, seed=0, region=(5, 20, 4, 18), previous=prev,
                       clicks=[(2, 2, True)])
        assert len(calls) == 1 and r.embedding_cached
    finally:
        hook.remove()
    assert run.votes.shape == (1, h, w)
    g = roi.to_mask_grid(edited, box, spacing)
    i, j = roi.click_cell(2, 2, 3, box, spacing)
    g[cell_block(i, j, 3, 32)] = True
    tok = roi.base.encode_grid(g)
    assert np.array_equal(r.edited_tokens, tok) and r.cells == [(i, j)]
    assert (r.tokens[:, : OFFSETS[3]] == tok[: OFFSETS[3]]).all()
    assert r.samples.shape == (3, h, w) and r.consensus.shape == (h, w)
    outside = np.ones((h, w), bool)
    outside[5:20, 4:18] = False
    assert np.array_equal(r.consensus[outside], prev[outside]) and (r.variability[outside] == 0).all()
    with pytest.raises(RedrawError, match="last scale"):
        roi.redraw(image, spacing, box, edited, 8)
    with pytest.raises(RedrawError, match="box's pixels"):
        roi.redraw(image, spacing, box, np.zeros((64, 64), bool), 3)


def test_roi_remembered_embeddings_are_bounded_and_released():
    """ROI mode keeps the last run's embeddings for redraws only within ``memo_max_bytes`` (oldest
    slices out: their redraw re-embeds, still correct), and ``release`` frees them."""
    from napari_genseg.predictors.arseg_roi import ArSegRoiPredictor
    from napari_genseg.roi import RoiBox

    p = _predictor(n=2)
    roi = ArSegRoiPredictor(p, fov_mm=40.0)
    image = np.random.default_rng(1).normal(0, 60, (5, 64, 64)).astype(np.float32)
    spacing, box = (3.0, 1.0, 1.0), RoiBox(0, 5, 10, 40, 20, 44)
    roi.run(image, spacing, box)
    one = next(iter(roi._emb_memo.values()))
    per_slice = one.numel() * one.element_size()
    assert len(roi._emb_memo) == 5
    roi.memo_max_bytes = 2 * per_slice
    roi.run(image, spacing, box, batch_size=2)
    assert len(roi._emb_memo) == 2  # the last two slices
    calls, hook = _encoder_counter(p.model)
    try:
        edited = _blob((30, 24), 14, 11, 8, 7)
        assert roi.redraw(image, spacing, box, edited, 3, z=4, seed=0).embedding_cached
        assert not roi.redraw(image, spacing, box, edited, 3, z=0, seed=0).embedding_cached
        assert len(calls) == 1
    finally:
        hook.remove()
    roi.release()
    assert roi._emb_memo == {}


def test_roi_mask_grid_geometry_with_markers():
    """ROI mode: a marker blob on the box's pixels goes to the crop's mask grid at the place the napari
    transform says, comes back to the same place, and a clicked pixel lies in its cell's block."""
    from napari_genseg.predictors.arseg_roi import ArSegRoiPredictor
    from napari_genseg.roi import RoiBox

    roi = ArSegRoiPredictor(_predictor(), fov_mm=48.0)
    box = RoiBox(0, 1, 30, 70, 50, 80)  # 40 x 30 box pixels of 0.8 x 1.2 mm
    spacing = (2.0, 0.8, 1.2)
    h, w = 40, 30
    blob = _blob((h, w), 12, 20, 6, 5)
    g = roi.to_mask_grid(blob, box, spacing)
    (sy, sx), (ty, tx) = roi.mask_grid_transform(box, spacing)
    gc = np.argwhere(g).mean(0) * (sy, sx) + (ty, tx)
    sc = np.argwhere(blob).mean(0)
    assert abs(gc[0] - sc[0]) <= max(sy, 1) / 2 and abs(gc[1] - sc[1]) <= max(sx, 1) / 2, (gc, sc)
    back = roi.from_mask_grid(g, box, spacing)
    assert 2 * (back & blob).sum() / (back.sum() + blob.sum()) > 0.8
    for y, x in [(3, 4), (12, 20), (39, 29), (25, 7)]:
        i, j = roi.click_cell(y, x, 4, box, spacing)
        block = np.zeros((32, 32), bool)
        block[cell_block(i, j, 4, 32)] = True
        assert roi.from_mask_grid(block, box, spacing)[y, x]


def test_paste_target_never_changes_other_labels():
    """The redraw's paste (CLI, Edit tab, Box tab): a marker voxel of another label inside the
    redrawn region survives both the consensus over it and the target's removal around it."""
    from napari_genseg.predictors.arseg import paste_target

    old = np.zeros((6, 7), np.uint16)
    old[1:4, 1:4] = 1  # the target
    old[2, 2] = 3  # a lesion marker inside the target
    old[5, 6] = 5  # another organ where the consensus grows
    cons = np.zeros((6, 7), bool)
    cons[2:6, 2:7] = True
    new = paste_target(old, cons, 1)
    assert new[2, 2] == 3 and new[5, 6] == 5  # the markers are kept
    assert new[1, 1] == 0 and new[4, 4] == 1  # target voxels outside the consensus go, background joins
    inside = np.zeros((6, 7), bool)
    inside[:, :3] = True
    limited = paste_target(old, cons, 1, inside)
    assert limited[1, 3] == 1 and limited[4, 4] == 0 and limited[2, 2] == 3  # outside `inside`: unchanged


def test_decode_composite_skips_regions_a_newer_box_covers():
    """Each redrawn box is decoded from its own tokens, newest on top; a box inside a newer box
    is not decoded at all (each decode is a whole slice), and the masks are the same."""
    from napari_genseg.ui.arseg_state import decode_composite

    class Decoder:  # a test double: sample n of tokens t is the constant t[n, 0] on the whole slice
        calls = 0

        def decode_samples(self, tokens, hw, spacing_yx, upto_scale=None):
            Decoder.calls += 1
            return np.broadcast_to(tokens[:, :1, None] > 0, (len(tokens), *hw)).copy()

    def tok(v):
        return np.full((2, 3), v, np.int16)

    regions = [((0, 4, 0, 4), tok(1)), ((5, 8, 5, 8), tok(1)), ((0, 6, 0, 6), tok(0))]  # 1st inside 3rd
    got = decode_composite(Decoder(), tok(0), regions, (8, 8), (1.0, 1.0))
    assert Decoder.calls == 3  # the base, the 2nd box and the 3rd box
    want = np.zeros((2, 8, 8), bool)
    want[:, 5:8, 5:8] = True
    want[:, 0:6, 0:6] = False
    np.testing.assert_array_equal(got, want)
