"""The AR-Seg explorer's Edit tab (issue 13): edit the consensus at a coarse scale on the mask grid,
redraw the finer scales in a worker, write the result as one undo step (tiny random AR-Seg)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytestmark = pytest.mark.gui

Z = 2


def _setup(viewer, qtbot, ckpt, n=4):
    from napari_genseg.phantom import make_phantom
    from napari_genseg.ui.arseg_explorer import ArSegExplorer
    from napari_genseg.ui.layers import image_layer_data
    from napari_genseg.volume import Volume

    # not square, anisotropic, off the origin: a swapped axis or a missing translate shows
    ph = make_phantom(seed=1, shape=(5, 64, 72), spacing=(3.0, 2.0, 1.6))
    d, kw, _ = image_layer_data(Volume(ph.image, spacing=ph.spacing, origin=(-7.5, 12.0, -30.0)), "ph")
    image = viewer.add_image(d, **kw)
    w = ArSegExplorer(viewer)
    w._model.value = "arseg_tiny"
    w._checkpoint.value = str(ckpt)
    w._device.value = "cpu"
    w._samples.value = n
    viewer.dims.set_current_step(0, Z)
    w._scope.value = "current"
    assert w.run() is not None
    qtbot.waitUntil(lambda: w.worker is None, timeout=60000)
    qtbot.waitUntil(lambda: w._decoder is None, timeout=60000)
    return w, image


def _edit(qtbot, w, k=3):
    w.redraw._k.value = k
    assert w._scale.value == k  # the View tab's slider follows
    assert w.redraw._edit_btn.text == f"Edit at scale {k}"
    assert w.redraw.edit_at_scale() is not None
    qtbot.waitUntil(lambda: w.redraw._prep is None, timeout=30000)
    return w.redraw.edit_layer


def _redraw(qtbot, w):
    assert w.redraw.redraw() is not None
    qtbot.waitUntil(lambda: w.redraw.worker is None, timeout=60000)


def test_edit_layer_holds_the_scale_k_consensus_on_the_mask_grid_over_the_anatomy(
        make_napari_viewer_proxy, qtbot, arseg_tiny_checkpoint):
    viewer = make_napari_viewer_proxy()
    w, image = _setup(viewer, qtbot, arseg_tiny_checkpoint)
    lay = _edit(qtbot, w, 3)
    res, pred = w.results, w.predictor
    M = int(pred.cfg.mask_size)
    assert lay.name == "AR-Seg edit (scale 3)" and lay.data.shape == (1, M, M)
    assert viewer.layers.selection.active.name == lay.name and lay.mode == "paint"
    assert lay.selected_label == res.target_class
    votes3 = pred.decode_samples(res.tokens[Z], (64, 72), (2.0, 1.6), upto_scale=3).sum(0)
    np.testing.assert_array_equal(lay.data[0] > 0, pred.to_mask_grid(votes3 / 4 > 0.5, (2.0, 1.6)))
    # marker pixel: the image pixels whose centres lie in the edit pixel's footprint on screen are
    # exactly the pixels the model's mask grid maps that pixel to (from_mask_grid), on slice Z
    for u, v in ((5, 20), (0, 0), (M - 1, 7)):
        marker = np.zeros((M, M), bool)
        marker[u, v] = True
        on_slice = pred.from_mask_grid(marker, (64, 72), (2.0, 1.6))
        centre = np.asarray(lay.data_to_world((0, u, v)))
        half = np.asarray(lay.scale) / 2
        yy, xx = np.mgrid[0:64, 0:72]
        world = np.asarray(image.translate)[1:, None, None] + np.asarray(image.scale)[1:, None, None] * np.stack([yy, xx])
        inside = (np.abs(world[0] - centre[1]) < half[1]) & (np.abs(world[1] - centre[2]) < half[2])
        np.testing.assert_array_equal(inside, on_slice, err_msg=str((u, v)))
        assert centre[0] == pytest.approx(image.data_to_world((Z, 0, 0))[0])  # on the run's slice
    # the edit stays on its slice: one slice deep at Z
    zc = image.data_to_world((Z, 0, 0))[0]
    assert list(lay.extent.world[:, 0]) == pytest.approx([zc, zc])


def test_redraw_in_a_box_replaces_the_consensus_there_as_one_undo_step(
        make_napari_viewer_proxy, qtbot, arseg_tiny_checkpoint):
    from napari.utils.colormaps.standardize_color import transform_color
    viewer = make_napari_viewer_proxy()
    w, image = _setup(viewer, qtbot, arseg_tiny_checkpoint)
    cons = w._layer("consensus")
    w._show.value = "variability"
    var = w._layer("variability")
    lay = _edit(qtbot, w, 3)
    lay.data[0, :16] = w.results.target_class  # the reader paints the top half in, erases the rest
    lay.data[0, 16:] = 0
    # a box (Box tab) on slice Z: pixel centres y 8..39, x 10..49
    shapes = w.roi.draw_box()
    shapes.add_rectangles(np.array([[Z, 7.6, 9.6], [Z, 7.6, 49.4], [Z, 39.4, 49.4], [Z, 39.4, 9.6]]))
    w.redraw._use_box.value = True
    clicks = w.redraw.add_clicks()
    assert clicks.name == "AR-Seg clicks" and clicks.mode == "add"
    clicks.add([Z, 30.2, 20.0])  # positive (the default)
    w.redraw._sign.value = False
    clicks.add([Z, 10.0, 40.0])
    clicks.add([Z + 1, 10.0, 40.0])  # another slice: not this redraw's
    assert list(clicks.features["positive"]) == [True, False, False]
    green, magenta = transform_color(["#33ff66", "#ff33cc"])
    np.testing.assert_allclose(clicks.face_color, [green, magenta, magenta])  # positive / negative
    assert w.redraw.clicks(image, Z) == [(30, 20, True), (10, 40, False)]
    before_labels, before_votes = cons.data.copy(), w.results.votes.copy()
    before_tokens, before_var = w.results.tokens[Z], var.data.copy()
    calls = []
    redraw = w.predictor.redraw

    def spy(*a, **k):
        calls.append((threading.current_thread(), a, k))
        return redraw(*a, **k)

    w.predictor.redraw = spy
    _redraw(qtbot, w)
    (thread, args, kw), = calls
    assert thread is not threading.main_thread()
    assert args[2] == 3 and kw["edited_on"] == "mask" and kw["box"] == (8, 40, 10, 50)
    assert kw["clicks"] == [(30, 20, True), (10, 40, False)]
    np.testing.assert_array_equal(kw["previous"], before_labels[Z] == 1)
    r = w.redraw.last
    assert r is not None and r.from_scale == 3 and len(r.cells) == 2
    inside = np.zeros((64, 72), bool)
    inside[8:40, 10:50] = True
    changed = cons.data != before_labels
    assert not changed[:Z].any() and not changed[Z + 1:].any() and not changed[Z][~inside].any()
    np.testing.assert_array_equal(cons.data[Z][inside] > 0, r.consensus[inside])
    # the slice's results follow: votes inside the box, tokens of the box, variability
    res = w.results
    np.testing.assert_array_equal(res.votes[Z][inside], r.samples.sum(0)[inside])
    np.testing.assert_array_equal(res.votes[Z][~inside], before_votes[Z][~inside])
    assert res.tokens[Z] is before_tokens and res.regions[Z][0][0] == (8, 40, 10, 50)
    np.testing.assert_array_equal(var.data[Z], res.disagreement([Z], 0.5)[0])
    assert "redraw from scale 3:" in w.redraw._status.value and "full run" in w.redraw._status.value
    assert viewer.layers.selection.active.name == cons.name and not lay.visible
    # the scales view decodes the redrawn box from its own tokens
    w._show.value = "scales"
    w._scale.value = 8
    qtbot.waitUntil(lambda: w._decoder is None and res.scale_votes(Z, 8) is not None, timeout=30000)
    np.testing.assert_array_equal(res.scale_votes(Z, 8), res.votes[Z])
    # ONE undo step (Ctrl+Z on the consensus shown) restores the consensus exactly, and the
    # slice's results with it
    w._show.value = "consensus"
    cons.undo()
    np.testing.assert_array_equal(cons.data, before_labels)
    np.testing.assert_array_equal(res.votes[Z], before_votes[Z])
    assert res.tokens[Z] is before_tokens and Z not in res.regions
    np.testing.assert_array_equal(var.data, before_var)
    cons.redo()
    np.testing.assert_array_equal(cons.data[Z][inside] > 0, r.consensus[inside])
    np.testing.assert_array_equal(res.votes[Z][inside], r.samples.sum(0)[inside])


def test_redraw_of_the_whole_slice_keeps_the_edited_coarse_scales(make_napari_viewer_proxy, qtbot,
                                                                arseg_tiny_checkpoint):
    viewer = make_napari_viewer_proxy()
    w, image = _setup(viewer, qtbot, arseg_tiny_checkpoint)
    cons = w._layer("consensus")
    before = cons.data.copy()
    lay = _edit(qtbot, w, 2)
    lay.data[0] = 0
    lay.data[0, 8:24, 8:24] = w.results.target_class
    _redraw(qtbot, w)
    r, res, pred = w.redraw.last, w.results, w.predictor
    lk = 1 + 4  # scales 1 and 2: 1x1 + 2x2 tokens
    expected = pred.encode_grid(lay.data[0] > 0)[:lk]
    assert (r.tokens[:, :lk] == expected).all()
    np.testing.assert_array_equal(res.tokens[Z], r.tokens.astype(np.int16))  # no box: the slice's tokens
    assert Z not in res.regions
    np.testing.assert_array_equal(cons.data[Z] > 0, r.consensus)
    assert not (cons.data != before)[[z for z in range(5) if z != Z]].any()
    cons.undo()
    np.testing.assert_array_equal(cons.data, before)


@pytest.mark.parametrize("how", ["failure", "cancel"])
def test_a_failed_or_cancelled_redraw_changes_nothing(make_napari_viewer_proxy, qtbot, arseg_tiny_checkpoint,
                                                      how):
    from napari_genseg.predictors.arseg import RedrawError

    viewer = make_napari_viewer_proxy()
    w, image = _setup(viewer, qtbot, arseg_tiny_checkpoint)
    cons = w._layer("consensus")
    lay = _edit(qtbot, w, 3)
    lay.data[0, 4:10, 4:10] = w.results.target_class
    edit_before, cons_before = lay.data.copy(), cons.data.copy()
    votes_before, tokens_before = w.results.votes.copy(), w.results.tokens[Z]
    release = threading.Event()
    redraw = w.predictor.redraw

    def fake(*a, **k):
        if how == "failure":
            raise RedrawError("the model refused")
        release.wait(10)
        return redraw(*a, **k)

    w.predictor.redraw = fake
    assert w.redraw.redraw() is not None
    if how == "cancel":
        assert w._cancel.enabled
        w.cancel()
        release.set()
    qtbot.waitUntil(lambda: w.redraw.worker is None, timeout=60000)
    qtbot.wait(50)
    assert lay in viewer.layers
    np.testing.assert_array_equal(lay.data, edit_before)
    np.testing.assert_array_equal(cons.data, cons_before)
    np.testing.assert_array_equal(w.results.votes, votes_before)
    assert w.results.tokens[Z] is tokens_before and w.redraw.last is None
    status = w.redraw._status.value
    assert ("the model refused" in status if how == "failure" else "cancelled" in status), status
    assert "nothing changed" in status and "\n" not in status
    assert w._run.enabled and w.redraw._redraw_btn.enabled


def test_edit_and_redraw_are_refused_without_results(make_napari_viewer_proxy, qtbot, arseg_tiny_checkpoint):
    viewer = make_napari_viewer_proxy()
    w, image = _setup(viewer, qtbot, arseg_tiny_checkpoint)
    assert w.redraw.redraw() is None  # no edit layer yet
    viewer.dims.set_current_step(0, Z + 1)  # a slice without a run
    assert w.redraw.edit_at_scale() is None and w.redraw.edit_layer is None
    assert "Run AR-Seg on this slice first" in w.redraw._status.value


def test_roi_mode_edits_the_box_result_and_redraws_it_as_one_undo_step(make_napari_viewer_proxy, qtbot,
                                                                       roi_everything_checkpoint):
    from napari_genseg.phantom import PHANTOM_CLASSES, make_phantom
    from napari_genseg.ui._run import add_class_labels
    from napari_genseg.ui.arseg_explorer import ArSegExplorer
    from napari_genseg.ui.layers import image_layer_data
    from napari_genseg.volume import Volume

    viewer = make_napari_viewer_proxy()
    ph = make_phantom(seed=1, shape=(6, 64, 72), spacing=(3.0, 2.0, 1.6))
    d, kw, _ = image_layer_data(Volume(ph.image, spacing=ph.spacing, origin=(4.5, -20.0, 8.0)), "ph")
    image = viewer.add_image(d, **kw)
    labels = add_class_labels(viewer, image, "ph labels", list(PHANTOM_CLASSES))
    labels.data[:] = ph.labels
    w = ArSegExplorer(viewer)
    w._image.value = image
    w._device.value, w._samples.value = "cpu", 3
    w.roi._checkpoint.value = str(roi_everything_checkpoint)
    w.roi._paste_to.value = labels
    viewer.dims.set_current_step(0, 3)
    shapes = w.roi.draw_box()
    shapes.add_rectangles(np.array([[3, 10.2, 30.4], [3, 10.2, 41.9], [3, 27.7, 41.9], [3, 27.7, 30.4]]))
    assert w.roi.run() is not None
    qtbot.waitUntil(lambda: w.roi.worker is None, timeout=60000)
    res, pred = w.roi.result, w.roi.predictor
    assert str(res.box) == "3:4,11:28,31:42"
    w.redraw._source.value = "box"
    assert not w.redraw._use_box.enabled
    w.redraw._k.value = 3
    assert w.redraw.edit_at_scale() is not None
    qtbot.waitUntil(lambda: w.redraw._prep is None, timeout=30000)
    lay = w.redraw.edit_layer
    M = pred.mask_size
    assert lay.data.shape == (1, M, M) and lay.mode == "paint"
    cons3 = w.roi.progression[0, 2] / 3 > 0.5
    np.testing.assert_array_equal(lay.data[0] > 0, pred.to_mask_grid(cons3, res.box, (2.0, 1.6)))
    # marker: a 3 x 3 pixel block of the box; the mask pixels the crop's grid gives it sit on it
    block = np.zeros((17, 11), bool)
    block[6:9, 4:7] = True
    grid = pred.to_mask_grid(block, res.box, (2.0, 1.6))
    assert grid.any()
    lo = np.asarray(image.data_to_world((3, 11 + 6 - 0.5, 31 + 4 - 0.5)))
    hi = np.asarray(image.data_to_world((3, 11 + 9 - 0.5, 31 + 7 - 0.5)))
    inside = np.zeros((M, M), bool)
    for u in range(M):
        for v in range(M):
            c = np.asarray(lay.data_to_world((0, u, v)))
            assert c[0] == pytest.approx(lo[0])  # the box's slice
            inside[u, v] = lo[1] <= c[1] <= hi[1] and lo[2] <= c[2] <= hi[2]
    assert grid[~inside].sum() == 0  # nothing off the marker
    assert grid.sum() >= 0.5 * inside.sum()  # and most of it
    # the reader erases part of the pasted lesion (a stroke of its own), then corrects scale 3
    labels.data_setitem((np.full(20, 3), np.repeat(np.arange(14, 18), 5), np.tile(np.arange(33, 38), 4)),
                        np.zeros(20, np.uint8))
    lay.data[0] = 0
    lay.data[0, M // 4: 3 * M // 4, M // 4: 3 * M // 4] = res.target_class
    before, votes_before, tokens_before = labels.data.copy(), res.votes.copy(), res.tokens.copy()
    assert w.redraw.redraw() is not None
    qtbot.waitUntil(lambda: w.redraw.worker is None, timeout=60000)
    r = w.redraw.last
    assert r is not None and r.samples.shape == (3, 17, 11)
    inbox = np.zeros(before.shape, bool)
    inbox[3, 11:28, 31:42] = True
    assert not (labels.data != before)[~inbox].any()
    # liver_lesion = 6 by name; only background and its own voxels change, other labels are kept
    box_before = before[3, 11:28, 31:42]
    free = (box_before == 0) | (box_before == 6)
    assert (~free).any()  # liver voxels inside the box: markers of another label
    np.testing.assert_array_equal(labels.data[3, 11:28, 31:42] == 6, r.consensus & free)
    np.testing.assert_array_equal(labels.data[3, 11:28, 31:42][~free], box_before[~free])
    np.testing.assert_array_equal(res.votes[0], r.samples.sum(0))
    np.testing.assert_array_equal(res.tokens[0], r.tokens)
    np.testing.assert_array_equal(w.roi.progression[0, -1], res.votes[0])
    np.testing.assert_array_equal(w.roi._layers["consensus"].data[0] > 0, r.consensus)
    assert "redraw from scale 3:" in w.redraw._status.value
    assert "20 pixel(s) changed" in w.redraw._status.value  # the redrawn lesion fills the box again
    labels.undo()
    np.testing.assert_array_equal(labels.data, before)
    np.testing.assert_array_equal(res.votes, votes_before)
    np.testing.assert_array_equal(res.tokens, tokens_before)
    labels.redo()
    np.testing.assert_array_equal(res.tokens[0], r.tokens)
    np.testing.assert_array_equal(labels.data[3, 11:28, 31:42] == 6, r.consensus & free)
