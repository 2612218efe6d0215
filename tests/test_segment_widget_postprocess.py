"""Segment dock "3-D clean-up": on by default, in the run's one undo step, the range rule (only the
slices just run change), off keeps the raw mask. Test double model on the marker case of ``_postprocess_case``."""

from __future__ import annotations

import numpy as np
import pytest

from _postprocess_case import DENSE, HOLE, ORGAN, SPACING, STRAY, _ct, post_checkpoint  # noqa: F401

from napari_genseg.run_record import RUN_KEY
from napari_genseg.volume import Volume

pytestmark = pytest.mark.gui

LAYER = "ct [testdouble]"


def _setup(viewer, ck):
    from napari_genseg.ui.layers import image_layer_data
    from napari_genseg.ui.segment_widget import SegmentWidget

    d, kw, _ = image_layer_data(Volume(_ct(), spacing=SPACING), "ct")
    viewer.add_image(d, **kw)
    w = SegmentWidget(viewer)
    w._model.value = "testdouble"
    w._checkpoint.value = str(ck)
    w._device.value = "cpu"
    w._batch.value = 6
    return w


def _run(qtbot, w):
    assert w.run() is not None
    qtbot.waitUntil(lambda: w.worker is None, timeout=20000)
    return w.viewer.layers[LAYER]


def test_cleanup_is_on_by_default_and_one_undo_step(make_napari_viewer_proxy, qtbot, post_checkpoint):
    viewer = make_napari_viewer_proxy()
    w = _setup(viewer, post_checkpoint)
    assert w._cleanup.value is True
    w._cleanup.value = False
    lab = _run(qtbot, w)  # a raw run first
    assert (lab.data[STRAY] == 1).all() and not lab.data[HOLE].any()
    assert lab.metadata[RUN_KEY]["postprocessing"]["enabled"] is False
    lab.data_setitem((np.array([11]), np.array([0]), np.array([0])), 2)  # the user paints (the next run redoes it)
    before = lab.data.copy()
    w._cleanup.value = True
    _run(qtbot, w)
    assert not lab.data[STRAY].any() and (lab.data[HOLE] == 1).all() and (lab.data[DENSE] == 2).all()
    rep = lab.metadata[RUN_KEY]["postprocessing"]
    assert rep["enabled"] is True and rep["classes"][0]["removed_voxels"] == 40
    assert "soft 2.2 mL" in w._status.value
    lab.undo()  # one step: the model's write and the clean-up together
    np.testing.assert_array_equal(lab.data, before)


def test_range_run_changes_only_its_slices(make_napari_viewer_proxy, qtbot, post_checkpoint):
    viewer = make_napari_viewer_proxy()
    w = _setup(viewer, post_checkpoint)
    w._cleanup.value = False
    lab = _run(qtbot, w)
    lab.data_setitem((np.array([11]), np.array([16]), np.array([16])), 1)  # a painted soft voxel
    before = lab.data.copy()
    w._cleanup.value = True
    w._scope.value = "range"
    w._start.value, w._stop.value = 2, 4  # holds part of the stray piece (z 3, 4), not the hole (z 5, 6)
    _run(qtbot, w)
    assert not lab.data[STRAY].any()  # inside the range: removed
    assert lab.data[11, 16, 16] == 1  # a separate piece, but outside the range: kept
    assert not lab.data[HOLE].any()  # the hole lies outside the range: not filled
    np.testing.assert_array_equal(np.delete(lab.data, [2, 3, 4], 0), np.delete(before, [2, 3, 4], 0))
    assert lab.metadata[RUN_KEY]["postprocessing"]["editable_slices"] == "2-4"
    lab.undo()
    np.testing.assert_array_equal(lab.data, before)


def test_wrong_side_notifies(make_napari_viewer_proxy, qtbot, post_checkpoint, monkeypatch):
    from napari.utils.notifications import notification_manager

    got = []
    monkeypatch.setattr(notification_manager, "dispatch", got.append)
    viewer = make_napari_viewer_proxy()
    w = _setup(viewer, post_checkpoint)
    viewer.layers["ct"].data = _ct(left=True)
    lab = _run(qtbot, w)
    assert any("soft: lies on the patient's left" in n.message for n in got)
    assert any("patient's left" in x for x in lab.metadata[RUN_KEY]["warnings"])


def test_cancelled_run_is_left_raw_and_recorded(make_napari_viewer_proxy, qtbot, post_checkpoint):
    viewer = make_napari_viewer_proxy()
    w = _setup(viewer, post_checkpoint)
    w._batch.value = 1
    w.run()
    w.cancel()  # before the first slice is done or just after: no clean-up either way
    qtbot.waitUntil(lambda: w.worker is None, timeout=20000)
    if LAYER not in viewer.layers:  # cancelled before its first slice: the new layer is removed
        assert w._written == 0
        return
    assert w._written > 0
    rec = viewer.layers[LAYER].metadata[RUN_KEY]["postprocessing"]
    assert rec["enabled"] is False and "cancelled" in rec["reason"]
