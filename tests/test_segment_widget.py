"""Segment dock widget through pytest-qt: run, cancel, undo, bad input (test double model)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_genseg.volume import Volume

pytestmark = pytest.mark.gui


def _image(viewer, z=8, hw=32):
    from napari_genseg.ui.layers import image_layer_data

    data = np.full((z, hw, hw), -1000, np.int16)
    data[:, 8:24, 8:24] = 0
    data[:, 14:18, 14:18] = 900
    d, kw, _ = image_layer_data(Volume(data, spacing=(3.0, 1.0, 1.0)), "ct")
    return viewer.add_image(d, **kw)


def _widget(viewer, ckpt):
    from napari_genseg.ui.segment_widget import SegmentWidget

    w = SegmentWidget(viewer)
    w._model.value = "testdouble"
    w._checkpoint.value = str(ckpt)
    w._device.value = "cpu"
    w._batch.value = 3
    return w


def _wait_done(qtbot, w, timeout=20000):
    qtbot.waitUntil(lambda: w.worker is None, timeout=timeout)


def test_run_all_then_range_replaces_only_range_and_undo_restores_edits(make_napari_viewer_proxy, qtbot, double_checkpoint):
    viewer = make_napari_viewer_proxy()
    img = _image(viewer)
    w = _widget(viewer, double_checkpoint)
    assert w.run() is not None
    _wait_done(qtbot, w)
    lab = viewer.layers["ct [testdouble]"]
    assert lab.data[0, 16, 16] == 2 and lab.data[0, 10, 10] == 1 and lab.data[0, 0, 0] == 0
    np.testing.assert_array_equal(lab.scale, img.scale)
    assert list(lab.features["class"]) == ["background", "soft", "dense"]
    assert lab.colormap.map(1)[:3].tolist() != lab.colormap.map(2)[:3].tolist()
    # the user corrects slices 2 and 6 by hand
    lab.data_setitem((np.array([2, 6]), np.array([0, 0]), np.array([0, 0])), 5)
    edited = lab.data.copy()
    # re-run slices 5..6 only: slice 6 is replaced, slice 2 keeps the edit
    w._scope.value = "range"
    w._start.value, w._stop.value = 5, 6
    w.run()
    _wait_done(qtbot, w)
    assert lab.data[6, 0, 0] == 0 and lab.data[2, 0, 0] == 5
    np.testing.assert_array_equal(np.delete(lab.data, [5, 6], 0), np.delete(edited, [5, 6], 0))
    lab.undo()  # one step undoes the whole re-run
    np.testing.assert_array_equal(lab.data, edited)


def test_cancel_keeps_partial_result(make_napari_viewer_proxy, qtbot, slow_double_checkpoint):
    viewer = make_napari_viewer_proxy()
    _image(viewer, z=30)
    w = _widget(viewer, slow_double_checkpoint)
    w._batch.value = 1
    worker = w.run()
    lab = viewer.layers["ct [testdouble]"]
    qtbot.waitUntil(lambda: lab.data[:, 16, 16].max() == 2, timeout=10000)
    w.cancel()
    _wait_done(qtbot, w)
    done = (lab.data[:, 16, 16] == 2).sum()
    assert 1 <= done < 30
    assert "cancelled" in w._status.value
    assert worker.abort_requested


def test_gui_stays_responsive_while_running(make_napari_viewer_proxy, qtbot, slow_double_checkpoint):
    import time

    from qtpy.QtCore import QTimer

    viewer = make_napari_viewer_proxy()
    _image(viewer, z=10)
    w = _widget(viewer, slow_double_checkpoint)
    w._batch.value = 1
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(20)
    w.run()
    _wait_done(qtbot, w)
    timer.stop()
    # ~1.5 s of model time; the event loop kept ticking throughout
    assert len(ticks) > 20


@pytest.fixture
def notes(monkeypatch):
    """Every napari notification dispatched during the test."""
    from napari.utils.notifications import notification_manager

    got = []
    monkeypatch.setattr(notification_manager, "dispatch", got.append)
    return got


def test_bad_inputs_notify_one_line_and_create_nothing(make_napari_viewer_proxy, qtbot, double_checkpoint, tmp_path, notes):
    from napari.utils.notifications import ErrorNotification

    viewer = make_napari_viewer_proxy()
    w = _widget(viewer, double_checkpoint)
    assert w.run() is None and "image layer" in notes[-1].message
    _image(viewer)
    w._scope.value = "range"
    w._start.value, w._stop.value = 5, 3
    assert w.run() is None and "empty slice range" in notes[-1].message
    w._scope.value = "all"
    w._checkpoint.value = str(tmp_path / "missing.safetensors")
    assert w.run() is None and "not found" in notes[-1].message
    assert "msa2net_paper" in w._model.choices  # a registered config: its checkpoint must match
    w._model.value = "msa2net_paper"
    w._checkpoint.value = str(double_checkpoint)
    assert w.run() is None and "testdouble checkpoint" in notes[-1].message
    assert [l.name for l in viewer.layers] == ["ct"]
    assert len(notes) == 4 and not any(isinstance(n, ErrorNotification) for n in notes)
    assert all("\n" not in n.message for n in notes)


def test_a_bug_in_the_worker_shows_its_traceback(make_napari_viewer_proxy, qtbot, double_checkpoint, notes, monkeypatch):
    from _doubles import ThresholdNet
    from napari.utils.notifications import ErrorNotification

    def broken(self, x):
        raise ValueError("shape bug deep in the model")

    monkeypatch.setattr(ThresholdNet, "forward", broken)
    viewer = make_napari_viewer_proxy()
    _image(viewer)
    w = _widget(viewer, double_checkpoint)
    assert w.run() is not None
    _wait_done(qtbot, w)
    [err] = [n for n in notes if isinstance(n, ErrorNotification)]
    assert isinstance(err.exception, ValueError) and "Segmentation failed" in err.message
    assert "broken" in err.as_text()  # the traceback reaches the frame that raised
    assert w._run.enabled and "failed" in w._status.value


def test_a_run_that_fails_before_its_first_slice_leaves_the_layers_as_they_were(
        make_napari_viewer_proxy, qtbot, double_checkpoint, tmp_path, notes):
    """Weights that cannot be read fail in the worker (the dock loads checkpoints lazily): one
    line to the user, no new Labels layer, and an existing layer keeps its data and the run record
    of the run that made it (a saved mask must not claim the broken checkpoint)."""
    import shutil

    from napari.utils.notifications import ErrorNotification

    from napari_genseg.run_record import RUN_KEY

    broken = tmp_path / "broken" / "double.safetensors"
    broken.parent.mkdir()
    shutil.copy(double_checkpoint.with_suffix(".json"), broken.with_suffix(".json"))
    broken.write_bytes(double_checkpoint.read_bytes()[:64])
    viewer = make_napari_viewer_proxy()
    _image(viewer)
    w = _widget(viewer, broken)
    assert w.run() is not None
    _wait_done(qtbot, w)
    assert [lyr.name for lyr in viewer.layers] == ["ct"]  # no empty layer claiming a run
    assert "cannot read weights" in notes[-1].message and "\n" not in notes[-1].message
    assert not any(isinstance(n, ErrorNotification) for n in notes)  # the user's input, not a bug

    w._checkpoint.value = str(double_checkpoint)
    w.run()
    _wait_done(qtbot, w)
    lab = viewer.layers["ct [testdouble]"]
    data, record = lab.data.copy(), dict(lab.metadata[RUN_KEY])
    assert record["model"]["checkpoint"] == str(double_checkpoint)
    w._checkpoint.value = str(broken)
    w.run()
    _wait_done(qtbot, w)
    assert "failed" in w._status.value
    np.testing.assert_array_equal(lab.data, data)
    assert lab.metadata[RUN_KEY] == record


@pytest.mark.parametrize("error", [RuntimeError("CUDA out of memory"), ValueError("bad batch")])
def test_a_runtime_error_in_the_worker_ends_the_run(make_napari_viewer_proxy, qtbot, double_checkpoint, notes,
                                                    monkeypatch, error):
    """superqt's generator worker took a RuntimeError (torch's out-of-memory, shape errors) for a
    deleted worker and ended the thread without ``errored`` or ``finished``: the dock waited for
    ever with Run disabled and no message. Now every failure type ends the run the same way."""
    import napari_genseg.ui.segment_widget as S

    def failing(*a, **k):
        raise error
        yield  # a generator, like run_volume

    monkeypatch.setattr(S, "run_volume", failing)
    viewer = make_napari_viewer_proxy()
    _image(viewer)
    w = _widget(viewer, double_checkpoint)
    assert w.run() is not None
    _wait_done(qtbot, w)
    assert w._status.value.startswith("failed") and str(error) in w._status.value
    assert w._run.enabled and not w._cancel.enabled
    assert [lyr.name for lyr in viewer.layers] == ["ct"]
    assert f"{type(error).__name__}: {error}" in notes[-1].message  # the original, not the wrapper


def test_a_partial_checkpoint_warns_in_the_dock(make_napari_viewer_proxy, qtbot, tmp_path, notes):
    from _doubles import ThresholdConfig, ThresholdNet, register_double
    from napari.utils.notifications import NotificationSeverity

    from napari_genseg.models.checkpoints import save_checkpoint

    register_double()
    cfg = ThresholdConfig()
    ck = save_checkpoint(tmp_path / "partial.safetensors", ThresholdNet(cfg), "testdouble", "testdouble_small", cfg,
                         ["background", "soft", "dense"],
                         {"normalization": {"kind": "hu_window", "low": -200.0, "high": 200.0}, "grid": "resize"},
                         untrained=["gain"])
    viewer = make_napari_viewer_proxy()
    _image(viewer)
    w = _widget(viewer, ck)
    assert w.run() is not None
    _wait_done(qtbot, w)
    warned = [n for n in notes if n.severity == NotificationSeverity.WARNING and "--allow-partial" in n.message]
    assert len(warned) == 1 and "gain" in warned[0].message


def test_window_preset_sets_contrast_only(make_napari_viewer_proxy, double_checkpoint):
    viewer = make_napari_viewer_proxy()
    img = _image(viewer)
    w = _widget(viewer, double_checkpoint)
    data = img.data.copy()
    w._window.value = "lung"
    assert tuple(img.contrast_limits) == (-1350.0, 150.0)
    np.testing.assert_array_equal(img.data, data)
