"""Review dock through pytest-qt (test double model): uncertainty layer, ranking, navigation and
shortcuts, statuses from paint events, protection on re-run + undo, metrics + CSV, autosave and
restore after a killed process, Save with the review log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from napari_genseg.volume import Volume

pytestmark = pytest.mark.gui
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(autouse=True)
def _autosave_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("GENSEG_AUTOSAVE_DIR", str(tmp_path / "autosave"))


def _ct(z=8, hw=32):
    data = np.full((z, hw, hw), -1000, np.int16)
    data[:, 8:24, 8:24] = 0  # soft tissue (class 1 of the double)
    data[:, 14:18, 14:18] = 900  # dense (class 2)
    data[5, 8:24, 8:24] = -110  # slice 5: close to the double's band edge -> the HU views disagree
    return data


def _image(viewer, data=None, name="ct"):
    from napari_genseg.ui.layers import image_layer_data

    d, kw, _ = image_layer_data(Volume(_ct() if data is None else data, spacing=(3.0, 1.0, 1.0)), name)
    return viewer.add_image(d, **kw)


def _mask(viewer, image, name="ct [testdouble]"):
    from napari_genseg.ui._run import add_class_labels

    return add_class_labels(viewer, image, name, ["background", "soft", "dense"])


def _dock(viewer, ckpt, image, mask, reference=None):
    from napari_genseg.ui.review_dock import ReviewDock

    w = ReviewDock(viewer)
    w._model.value = "testdouble"
    w._checkpoint.value = str(ckpt)
    w._device.value = "cpu"
    w._image.value = image
    w._mask.value = mask
    if reference is not None:
        w._reference.value = reference
    return w


def _wait(qtbot, w, timeout=20000):
    qtbot.waitUntil(lambda: w.worker is None, timeout=timeout)


def _queue_settled(qtbot, w, timeout=20000):
    """Wait for the queue update that runs in a worker (``ReviewDock.refresh_later``)."""
    qtbot.waitUntil(lambda: w.refresh_worker is None and not w._refresh_timer.isActive(), timeout=timeout)


def _paint(layer, z, y, x, value):
    """A reader's brush stroke (napari's paint path: one history item, a paint event)."""
    layer.data_setitem((np.atleast_1d(z), np.atleast_1d(y), np.atleast_1d(x)), value)


def test_uncertainty_fills_an_empty_mask_ranks_the_queue_and_navigates(make_napari_viewer_proxy, qtbot, double_checkpoint):
    viewer = make_napari_viewer_proxy()
    img = _image(viewer)
    mask = _mask(viewer, img)
    w = _dock(viewer, double_checkpoint, img, mask)
    w._views.value = 8
    assert w.compute_uncertainty() is not None
    _wait(qtbot, w)
    _queue_settled(qtbot, w)  # the uncertainty layer and the queue come from a worker
    assert mask.data[0, 16, 16] == 2 and mask.data[0, 10, 10] == 1  # the model's result, shown
    unc = viewer.layers["ct [testdouble] uncertainty"]
    assert unc.data.shape == mask.data.shape and unc.data.max() > 0
    np.testing.assert_array_equal(unc.scale, img.scale)
    # slice 5 sits at the band edge: the HU views disagree there, so it leads the queue
    assert w.items[0].index == 5 and "uncertainty" in w.items[0].signals
    table = w._queue.value["data"]
    assert table[0][0] == 5 and table[0][2] == "untouched"
    # the mask mostly agrees with its own views away from slice 5
    assert unc.data[2, 16, 16] == 0
    mask.undo()  # the fill was one undo step
    assert not mask.data.any()


def test_click_next_previous_accept_flag_and_shortcuts(make_napari_viewer_proxy, qtbot, double_checkpoint):
    from napari_genseg.ui.review_dock import SHORTCUTS

    viewer = make_napari_viewer_proxy()
    img = _image(viewer)
    mask = _mask(viewer, img)
    mask.data[1:7, 10:20, 10:20] = 1
    mask.data[3] = 0  # a lost slice: area jump
    mask.data[6, 0, 0] = 1  # a stray voxel: small component
    w = _dock(viewer, double_checkpoint, img, mask)
    w.set_flags({1: "liver volume implausible"})  # the plausibility hook
    order = [it.index for it in w.items]
    assert order[:3] == [1, 3, 6]  # flag 1.0, area jump 0.5 · 1, small pieces 0.5 · 0.5
    w.go_to_row(1)
    assert w.current_slice() == order[1]
    w.accept()
    assert w.state.status[order[1]] == "accepted"
    assert w.next() == order[2] and w.current_slice() == order[2]
    w.flag()
    assert w.previous() == order[1]
    assert w.state.status[order[2]] == "flagged"
    # shortcuts are the viewer's
    kb = viewer.keymap
    assert all(any(str(k).replace("+", "-").lower() == v.lower() for k in kb) for v in SHORTCUTS.values())
    w.go_to(order[0])
    from napari.utils.key_bindings import KeyBinding

    viewer.keymap[KeyBinding.from_str(SHORTCUTS["accept"])](viewer)
    assert w.state.status[order[0]] == "accepted"
    # slice 3 (accepted) holds no soft tissue; slice 6 is flagged, not reviewed
    assert w.progress_text == "1 of 5 slices with soft reviewed, 1 flagged"
    assert [r[2] for r in w._queue.value["data"][:3]] == ["accepted", "accepted", "flagged"]


def test_painting_marks_edited_and_rerun_keeps_painted_voxels_and_accepted_slices(make_napari_viewer_proxy, qtbot, double_checkpoint):
    viewer = make_napari_viewer_proxy()
    img = _image(viewer)
    mask = _mask(viewer, img)
    w = _dock(viewer, double_checkpoint, img, mask)
    # the reader paints on slices 2 and 4 (nothing was run: the mask is the reader's)
    _paint(mask, 2, 0, 0, 2)
    _paint(mask, 4, 16, 16, 1)  # relabels the dense marker as soft by hand
    assert w.state.status[2] == w.state.status[4] == "edited" and w.state.edits[2] == 1
    w.go_to(4)
    w.accept()  # edited then accepted
    before = mask.data.copy()
    for z in (2, 4, 6):
        assert w.rerun_slice(index=z) is not None or z == 4
        _wait(qtbot, w)
    # slice 6: fully the model's; slice 2: the model's except the painted voxel; slice 4 accepted: untouched
    assert mask.data[6, 16, 16] == 2 and mask.data[6, 10, 10] == 1
    assert mask.data[2, 0, 0] == 2 and mask.data[2, 16, 16] == 2
    np.testing.assert_array_equal(mask.data[4], before[4])
    assert w.state.status[6] == "untouched"  # a model write is no edit
    mask.undo()  # one step per re-run: slice 6's (the last) goes, slice 2's stays
    np.testing.assert_array_equal(mask.data[6], before[6])
    assert mask.data[2, 16, 16] == 2
    mask.undo()
    np.testing.assert_array_equal(mask.data, before)


def test_a_brush_stroke_marks_its_slice_edited_and_protects_its_voxels(make_napari_viewer_proxy, double_checkpoint):
    from napari_genseg.ui.review_dock import painted_indices

    viewer = make_napari_viewer_proxy()
    img = _image(viewer)
    mask = _mask(viewer, img)
    w = _dock(viewer, double_checkpoint, img, mask)
    w.go_to(3)
    atoms = []
    mask.events.paint.connect(lambda e: atoms.extend(e.value))
    mask.brush_size = 3
    mask.paint((3, 10, 12), 2)  # napari's brush (a masked history atom)
    assert w.state.status[3] == "edited" and w.state.edits == [0, 0, 0, 1, 0, 0, 0, 0]
    np.testing.assert_array_equal(w.protect, mask.data > 0)
    assert w.protect[3, 10, 12] and w.protect.sum() == (mask.data > 0).sum() > 1
    # both atom kinds give the voxels they changed
    assert hasattr(atoms[0], "slice_key")
    idx = painted_indices(atoms[0], mask.data.shape)
    assert (mask.data[idx] == 2).all() and len(idx[0]) == (mask.data > 0).sum()
    assert painted_indices(((np.array([1]), np.array([2]), np.array([3])), 0, 1), mask.data.shape)[2].tolist() == [3]


def test_metrics_against_a_reference_and_without_one_and_csv(make_napari_viewer_proxy, qtbot, double_checkpoint, tmp_path):
    viewer = make_napari_viewer_proxy()
    img = _image(viewer)
    mask = _mask(viewer, img)
    mask.data[2:6, 10:20, 10:20] = 1
    w = _dock(viewer, double_checkpoint, img, mask)
    kind, rows = w.compute_metrics()
    assert kind == "stats" and rows[0]["class"] == "soft"
    assert rows[0]["volume_ml"] == pytest.approx(400 * 3.0 / 1000)
    w.go_to(2)
    w.update_metrics()
    qtbot.waitUntil(lambda: w.metrics_worker is None and bool(w.metric_rows), timeout=10000)
    assert list(w._metrics.value["columns"])[4:] == ["slice 2 ml", "slice 2 HU"]
    assert list(w._metrics.value["data"][0])[4:] == [0.3, "144.0 ± 329.9"]  # 100 px of 3 mm³, 16 of them 900 HU
    ref = viewer.add_labels(mask.data.copy(), name="reference", scale=img.scale)
    ref.data[2:6, 10:20, 15:20] = 0
    w._reference.value = ref
    w.update_metrics()  # in a worker (the reference change also schedules one, debounced)
    qtbot.waitUntil(lambda: w.metric_kind == "reference" and w.metrics_worker is None, timeout=10000)
    assert w.metric_kind == "reference" and w.metric_rows[0]["dice"] == pytest.approx(2 * 200 / 600)
    assert list(w._metrics.value["columns"])[:4] == ["class", "dice", "iou", "hd95_mm"]
    # the worker's rows are signed by what they were computed on (hashed in the worker): Export
    # CSV re-uses them instead of computing HD95 again on the GUI thread
    assert w._metrics_for == w._metrics_key(*w._metric_inputs())
    import napari_genseg.ui.review_dock as rd
    monkey = pytest.MonkeyPatch()
    monkey.setattr(rd, "slice_metrics", lambda *a, **k: pytest.fail("metrics computed again"))
    out = w.export_csv(tmp_path / "m.csv")
    monkey.undo()
    assert out.read_text().splitlines()[0] == "class,scope,axis,slice,dice,iou,hd95_mm"
    assert out.read_text().splitlines()[1].startswith("soft,volume,,,0.666667,0.5,")
    # the reference also ranks the queue
    w.refresh()
    assert all("reference" in it.signals for it in w.items[:4])


def test_a_reference_that_is_the_mask_itself_or_on_another_grid_is_not_compared(make_napari_viewer_proxy,
                                                                                double_checkpoint):
    viewer = make_napari_viewer_proxy()
    img = _image(viewer)
    mask = _mask(viewer, img)
    mask.data[2:6, 10:20, 10:20] = 1
    w = _dock(viewer, double_checkpoint, img, mask, reference=mask)
    kind, rows = w.compute_metrics()  # (old code: "reference", Dice 1.0 against itself)
    assert kind == "stats" and "is the mask under review itself" in w._status.value
    w.refresh()
    assert not any("reference" in it.signals for it in w.items)
    other = viewer.add_labels(np.zeros((8, 16, 16), np.uint8), name="small")
    w._reference.value = other
    kind, _ = w.compute_metrics()
    assert kind == "stats" and "has shape (8, 16, 16), the mask (8, 32, 32): not compared" in w._status.value


def test_autosave_after_a_killed_session_is_offered_and_restored(make_napari_viewer_proxy, qtbot, double_checkpoint, tmp_path):
    """A reviewing process autosaves and is killed; the same voxels opened again (another layer
    name) get the work back: mask, statuses and protection."""
    from napari_genseg.review.autosave import default_autosave_dir

    data = _ct()
    np.save(tmp_path / "ct.npy", data)
    code = textwrap.dedent(f"""
        import os, signal, numpy as np
        from napari_genseg.review.autosave import Autosaver, image_key, default_autosave_dir
        from napari_genseg.review.queue import ReviewState
        data = np.load({str(tmp_path / 'ct.npy')!r})
        saver = Autosaver(default_autosave_dir(), image_key(data, (3.0, 1.0, 1.0)), every_edits=1, mask_name="ct [testdouble]")
        mask = np.zeros(data.shape, np.uint8); mask[3, 5:9, 5:9] = 2
        st = ReviewState(data.shape[0]); st.mark_edited(3); st.accept(1)
        saver.note_edit(); saver.maybe_save(mask, st.to_dict(), protect=mask > 0)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert list(default_autosave_dir().glob("*.npz"))
    viewer = make_napari_viewer_proxy()
    img = _image(viewer, data.copy(), name="same CT opened again")
    mask = _mask(viewer, img, "new mask")
    w = _dock(viewer, double_checkpoint, img, mask)
    assert w.restore_available and not w._restore.native.isHidden() and "1 edits" in w._restore_info.value
    assert w.restore_autosave()
    assert mask.data[3, 6, 6] == 2 and mask.data.sum() == 32
    assert w.state.status[3] == "edited" and w.state.status[1] == "accepted"
    assert w.protection()[3, 6, 6] and w.protection()[1].all() and not w.protection()[2].any()
    mask.undo()  # the restore is one undo step
    assert not mask.data.any()
    # a different image gets nothing
    other = _ct()
    other[0, 0, 0] += 1
    img2 = _image(viewer, other, name="another CT")
    w._image.value = img2
    assert not w.restore_available


def test_edits_autosave_every_n_and_save_writes_mask_and_log(make_napari_viewer_proxy, qtbot, double_checkpoint, tmp_path):
    import nibabel as nib

    from napari_genseg.review.autosave import find_autosave

    viewer = make_napari_viewer_proxy()
    img = _image(viewer)
    mask = _mask(viewer, img)
    w = _dock(viewer, double_checkpoint, img, mask)
    w._every_edits.value = 2
    _paint(mask, 1, 3, 3, 1)
    assert find_autosave(w._autosave_folder(), w.key) is None
    _paint(mask, 2, 3, 3, 1)
    assert find_autosave(w._autosave_folder(), w.key).edits == 2
    w._reader.value = "Dr. Reader"
    out, log = w.save(tmp_path / "reviewed.nii.gz")
    assert np.asarray(nib.load(out).dataobj).sum() == 2
    j = json.loads(log.read_text())
    assert j["reader"] == "Dr. Reader" and j["review"]["counts"]["edited"] == 2
    assert j["metrics"]["kind"] == "stats" and j["image_sha256"] == w.key
    assert find_autosave(w._autosave_folder(), w.key) is None  # saved: nothing to offer next time


def test_add_to_training_set_from_the_dock(make_napari_viewer_proxy, double_checkpoint, tmp_path):
    viewer = make_napari_viewer_proxy()
    img = _image(viewer, name="Patient Name CT")
    mask = _mask(viewer, img)
    mask.data[2:5, 10:20, 10:20] = 1
    w = _dock(viewer, double_checkpoint, img, mask)
    rep = w.add_to_training_set(tmp_path / "train")
    assert rep["case"].startswith("genseg_") and "Patient" not in rep["case"]
    assert "dropped patient name" in w._status.value
    mask.data[2] = 0
    again = w.add_to_training_set(tmp_path / "train")
    assert again["replaced"] and json.loads((tmp_path / "train" / "dataset.json").read_text())["numTraining"] == 1


def test_model_agreement_per_class_layers_feed_the_queue(make_napari_viewer_proxy, double_checkpoint):
    """Other models' results give one disagreement layer per class (classes matched by name: a
    model that does not segment a class abstains for it), in the class's colour, and their
    per-slice scores rank the queue with the classes named."""
    from napari_genseg.run_record import RUN_KEY

    viewer = make_napari_viewer_proxy()
    img = _image(viewer)
    mask = _mask(viewer, img)  # background, soft, dense
    mask.data[1:7, 10:20, 10:20] = 1
    mask.data[1:7, 14:16, 14:16] = 2
    mask.metadata[RUN_KEY] = {"model": {"family": "msa2net"}}
    w = _dock(viewer, double_checkpoint, img, mask)
    assert not [lay for lay in viewer.layers if "disagree" in lay.name]
    multi = _mask(viewer, img, "ct [marseg]")  # same classes
    multi.data[:] = mask.data
    multi.data[4, 10:20, 10:13] = 0  # misses a strip of soft on slice 4
    multi.data[2, 14:16, 14:16] = 1  # calls the dense marker soft on slice 2
    multi.metadata[RUN_KEY] = {"model": {"family": "marseg"}}
    single = _mask(viewer, img, "ct [arseg]")
    single.features = {"class": ["background", "dense"]}  # a one-class model: its id 1 is dense
    single.data[:] = (mask.data == 2).astype(np.uint8)  # agrees about dense everywhere
    single.data[6, 14:16, 14:16] = 0  # ... except slice 6
    single.metadata[RUN_KEY] = {"model": {"family": "arseg"}}
    w.refresh()
    soft = viewer.layers["ct [testdouble] models disagree: soft"]
    dense = viewer.layers["ct [testdouble] models disagree: dense"]
    assert "ct [testdouble] model disagreement" not in viewer.layers
    # soft: only MARSeg knows it (AR-Seg abstains): 100 % where it differs
    assert soft.data[4, 12, 11] == 100.0 and soft.data[4, 12, 17] == 0 and soft.data[2, 14, 14] == 100.0
    assert soft.data[6].max() == 0 and soft.metadata["models"] == ["ct [marseg]"]
    # dense: both know it (AR-Seg through its own id 1): one of two disagrees on slices 2 and 6
    assert dense.data[2, 14, 14] == 50.0 and dense.data[6, 14, 14] == 50.0 and dense.data[4].max() == 0
    assert dense.metadata["class"] == "dense" and dense.metadata["class_id"] == 2
    assert dense.metadata["models"] == ["ct [marseg]", "ct [arseg]"]
    np.testing.assert_allclose(dense.colormap.colors[-1][:3], mask.get_color(2)[:3], atol=1e-6)
    np.testing.assert_array_equal(dense.scale, img.scale)
    top = {it.index: it for it in w.items}
    assert "models" in top[4].signals and "models disagree on soft" in top[4].note
    assert "models disagree on dense" in top[6].note and "soft" not in top[6].note
    assert "soft" in top[2].note and "dense" in top[2].note
    assert w.items[0].index in (2, 4) and "models disagree on" in w._queue.value["data"][0][3]
    # MARSeg's layer goes: soft has no other model left, its layer is removed
    viewer.layers.remove(multi)
    w.refresh()
    assert "ct [testdouble] models disagree: soft" not in viewer.layers
    assert viewer.layers["ct [testdouble] models disagree: dense"].data[2].max() == 0
    assert [lay.name for lay in w.model_layers()] == ["ct [arseg]"]


@pytest.mark.parametrize("answer", ["cancel", "discard", "save"])
def test_closing_napari_with_unsaved_work_asks(make_napari_viewer_proxy, double_checkpoint, tmp_path, monkeypatch,
                                               answer):
    """Closing the (shown) napari window with unsaved work asks Save / Discard / Cancel (the
    dialog's answer patched): Cancel keeps the window open, Discard closes and leaves the
    autosave on disk, Save writes the mask + log as the Save button does and closes."""
    from qtpy.QtGui import QCloseEvent
    from qtpy.QtWidgets import QMessageBox

    from napari_genseg.review.autosave import find_autosave

    asked = []
    buttons = {"cancel": QMessageBox.StandardButton.Cancel, "discard": QMessageBox.StandardButton.Discard,
               "save": QMessageBox.StandardButton.Save}
    monkeypatch.setattr(QMessageBox, "question", staticmethod(lambda *a, **k: asked.append(a[1]) or buttons[answer]))
    viewer = make_napari_viewer_proxy(show=True)
    img = _image(viewer)
    mask = _mask(viewer, img)
    w = _dock(viewer, double_checkpoint, img, mask)
    w._every_edits.value = 100  # not due by count or time
    w._output.value = str(tmp_path / "closing.nii.gz")
    viewer.window.add_dock_widget(w, name="Review")
    qt_window = w.native.window()
    assert qt_window.isVisible() and w._close_guard.watching == id(qt_window)

    def close_event():  # the close event napari's window gets (close button, Ctrl+Q), through the guard
        ev = QCloseEvent()
        return not w._close_guard.eventFilter(qt_window, ev) and ev.isAccepted()

    assert close_event() and asked == []  # nothing unsaved: no question
    _paint(mask, 2, 5, 5, 1)
    assert w.dirty and find_autosave(w._autosave_folder(), w.key) is None
    if answer == "cancel":
        closed = qt_window.close()  # a real close: refused
    else:
        closed = close_event()  # (a real close would delete the viewer under the fixture)
    assert asked == ["Unsaved review work"]
    info = find_autosave(w._autosave_folder(), w.key)
    if answer == "cancel":
        assert not closed and qt_window.isVisible() and w.dirty and info is None
        assert not (tmp_path / "closing.nii.gz").exists()
        w.dirty = False  # let the fixture close it
    elif answer == "discard":
        assert closed and info is not None and info.edits == 1
        assert not (tmp_path / "closing.nii.gz").exists()
    else:
        assert closed and info is None and not w.dirty
        assert (tmp_path / "closing.nii.gz").exists() and (tmp_path / "closing.review.json").exists()


def test_a_hidden_window_closing_autosaves_without_asking(make_napari_viewer_proxy, double_checkpoint, monkeypatch):
    from qtpy.QtCore import QEvent
    from qtpy.QtWidgets import QMessageBox

    from napari_genseg.review.autosave import find_autosave

    monkeypatch.setattr(QMessageBox, "question", staticmethod(lambda *a, **k: pytest.fail("asked")))
    viewer = make_napari_viewer_proxy()
    img = _image(viewer)
    mask = _mask(viewer, img)
    w = _dock(viewer, double_checkpoint, img, mask)
    w._every_edits.value = 100
    w.go_to(2)
    w.flag()
    assert w.dirty and find_autosave(w._autosave_folder(), w.key) is None
    viewer.window.add_dock_widget(w, name="Review")
    assert w._close_guard.watching == id(w.native.window())
    w._close_guard.eventFilter(w.native.window(), QEvent(QEvent.Type.Close))
    assert find_autosave(w._autosave_folder(), w.key) is not None


def test_reference_from_a_label_file_with_a_label_map(make_napari_viewer_proxy, double_checkpoint, tmp_path):
    from napari_genseg.io import write_mask

    viewer = make_napari_viewer_proxy()
    img = _image(viewer)
    mask = _mask(viewer, img)
    mask.data[2:5, 10:20, 10:20] = 1
    ref = np.zeros(mask.data.shape, np.uint8)
    ref[2:5, 10:20, 10:20] = 5  # ids of another map (TotalSegmentator liver = 5)
    path = write_mask(tmp_path / "ref.nii.gz", ref, spacing=(3.0, 1.0, 1.0), origin=tuple(img.translate))
    w = _dock(viewer, double_checkpoint, img, mask)
    lay = w.load_reference(path, label_map="5:1")
    assert lay.name == "ref (reference)" and w._reference.value.name == lay.name  # (the test viewer wraps layers)
    np.testing.assert_array_equal(lay.data, (ref == 5).astype(np.uint8))
    kind, rows = w.compute_metrics()
    assert kind == "reference" and rows[0]["class"] == "soft" and rows[0]["dice"] == 1.0


def test_switching_the_mask_autosaves_the_review_being_left(make_napari_viewer_proxy, double_checkpoint):
    from napari_genseg.review.autosave import find_autosave, load_autosave

    viewer = make_napari_viewer_proxy()
    img = _image(viewer)
    mask = _mask(viewer, img)
    other = _mask(viewer, img, "another mask")
    w = _dock(viewer, double_checkpoint, img, mask)
    w._every_edits.value = 100
    _paint(mask, 2, 5, 5, 1)
    assert find_autosave(w._autosave_folder(), w.key) is None
    w._mask.value = other
    saved, meta = load_autosave(find_autosave(w._autosave_folder(), w.key).path)
    assert saved[2, 5, 5] == 1 and meta["mask_name"] == mask.name and meta["review"]["status"][2] == "edited"
    assert w.state.status[2] == "untouched" and not w.dirty  # the other mask starts its own review


def test_the_segment_docks_clean_up_report_feeds_the_queue(make_napari_viewer_proxy, double_checkpoint):
    """Plausibility findings of the 3-D clean-up (removed stray components, a wrong-side organ) in
    the mask layer's run record become queue signals on their axial slices."""
    from napari_genseg.postprocessing import postprocess
    from napari_genseg.run_record import RUN_KEY

    viewer = make_napari_viewer_proxy()
    img = _image(viewer)
    mask = _mask(viewer, img)
    raw = np.zeros(mask.data.shape, np.uint8)
    raw[1:7, 10:20, 10:20] = 1
    raw[3, 2:4, 28:30] = 1  # a stray piece on slice 3, removed by the clean-up
    clean, rep = postprocess(raw, ["background", "soft", "dense"], {"soft": {"single_component": True}},
                             (3.0, 1.0, 1.0))
    mask.data[:] = clean
    mask.metadata[RUN_KEY] = {"model": {"family": "testdouble"}, "postprocessing": rep.to_dict()}
    w = _dock(viewer, double_checkpoint, img, mask)
    w.refresh()
    top = {it.index: it for it in w.items}
    assert top[3].signals.get("flags") == 1.0 and "stray component removed" in top[3].note
    assert w.items[0].index == 3


def test_reference_from_a_dicom_seg_lands_on_the_ct_slices(make_napari_viewer_proxy, double_checkpoint):
    """A reference DICOM SEG (the GE CT's dcmqi liver) is placed on the opened DICOM series by
    its frames' world positions: per-slice liver counts equal the SEG's frames, in position order."""
    import warnings

    from _ct_cases import shared_dir

    ge = shared_dir() / "data" / "dicom-robustness" / "ge-ct-3slice-liver"
    if not (ge / "liver.dcm").is_file():
        pytest.skip("../shared/data/dicom-robustness/ge-ct-3slice-liver absent")
    from napari_genseg.io import load_volume
    from napari_genseg.ui.layers import image_layer_data

    viewer = make_napari_viewer_proxy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vol = load_volume(ge)
    d, kw, _ = image_layer_data(vol, "ge")
    img = viewer.add_image(d, **kw)
    mask = _mask(viewer, img, "ge [testdouble]")
    w = _dock(viewer, double_checkpoint, img, mask)
    ref = w.load_reference(ge / "liver.dcm", label_map="1:1")
    assert ref is not None and w._reference.value.name == ref.name == "liver.dcm (reference)"
    assert (np.asarray(ref.data) == 1).sum(axis=(1, 2)).tolist() == [36233, 35645, 35220]


def test_outputs_that_cannot_be_written_are_one_line_and_keep_the_review(make_napari_viewer_proxy, double_checkpoint,
                                                                        tmp_path, monkeypatch):
    """Save, Export CSV, Add to training set into a folder that cannot exist (its parent is a
    file: an OSError, as a full disk or a read-only share) gave a traceback, and on closing napari
    with "Save" the window closed anyway; now: one error line each, nothing lost, window kept."""
    from napari.utils.notifications import notification_manager

    got = []
    monkeypatch.setattr(notification_manager, "dispatch", got.append)
    viewer = make_napari_viewer_proxy()
    img = _image(viewer)
    mask = _mask(viewer, img)
    w = _dock(viewer, double_checkpoint, img, mask)
    w._every_edits.value = 100
    _paint(mask, 2, 5, 5, 1)
    before = mask.data.copy()
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    bad = blocker / "sub"
    assert w.save(bad / "reviewed.nii.gz") is None
    assert w.export_csv(bad / "metrics.csv") is None
    assert w.add_to_training_set(bad / "train") is None
    monkeypatch.setattr(type(w), "ask_unsaved", lambda self: "save")
    w._output.value = str(bad / "on_close.nii.gz")
    assert w.confirm_close() is False  # the failed save keeps napari open
    msgs = [str(n.message) for n in got]
    assert len(msgs) == 4 and all("\n" not in m and "a_file" in m for m in msgs), msgs
    assert w.dirty and w.state.status[2] == "edited"
    np.testing.assert_array_equal(mask.data, before)
    w.dirty = False  # let the fixture close the viewer


def test_results_of_a_run_started_on_another_mask_are_dropped(make_napari_viewer_proxy, qtbot, double_checkpoint):
    """Switching the mask while "Compute uncertainty" or "Re-run" runs: the result belonged to the
    mask the run started on; it was written into the mask chosen now (the model's result pasted
    into another empty mask, a re-run slice into another mask)."""
    viewer = make_napari_viewer_proxy()
    img = _image(viewer)
    first = _mask(viewer, img, "first")
    second = _mask(viewer, img, "second")
    w = _dock(viewer, double_checkpoint, img, first)
    assert w.compute_uncertainty() is not None
    w._mask.value = second  # before the worker's result reaches the GUI thread
    _wait(qtbot, w)
    assert not first.data.any() and not second.data.any() and w.votes is None
    assert "result dropped" in w._status.value
    assert w.rerun_slice(index=3) is not None
    w._mask.value = first
    _wait(qtbot, w)
    assert not first.data.any() and not second.data.any() and "result dropped" in w._status.value
    w._mask.value = second  # the same run without a switch writes its slice
    assert w.rerun_slice(index=3) is not None
    _wait(qtbot, w)
    assert second.data[3].any() and not first.data.any()


def test_the_queue_after_an_edit_is_computed_off_the_gui_thread(make_napari_viewer_proxy, qtbot, double_checkpoint,
                                                              monkeypatch):
    """A paint stroke schedules the queue update (ranking, disagreement, model agreement, progress:
    seconds on a real CT); it runs in a worker on a copy of the mask, not on the GUI thread, and
    a paint event itself computes nothing over the volume."""
    import threading

    from napari_genseg.review.queue import ReviewState
    from napari_genseg.ui import review_dock

    threads = []
    real_rank, real_progress = review_dock.rank_slices, ReviewState.progress

    def rank(*a, **k):
        threads.append(("rank", threading.current_thread() is threading.main_thread()))
        return real_rank(*a, **k)

    def progress(self, *a, **k):
        threads.append(("progress", threading.current_thread() is threading.main_thread()))
        return real_progress(self, *a, **k)

    monkeypatch.setattr(review_dock, "rank_slices", rank)
    monkeypatch.setattr(ReviewState, "progress", progress)
    viewer = make_napari_viewer_proxy()
    img = _image(viewer)
    mask = _mask(viewer, img)
    w = _dock(viewer, double_checkpoint, img, mask)
    def settled():
        return getattr(w, "refresh_worker", None) is None and not w._refresh_timer.isActive()

    qtbot.waitUntil(settled, timeout=10000)
    threads.clear()
    _paint(mask, 2, 5, 5, 1)
    assert threads == []  # the paint event itself: no whole-volume work
    qtbot.waitUntil(lambda: bool(threads) and settled(), timeout=10000)
    assert ("rank", False) in threads and ("progress", False) in threads
    assert all(not on_main for _, on_main in threads), threads
    assert w.progress_text.startswith("1 of 1 slices with soft reviewed")
    assert any(it.index == 2 for it in w.items)


def test_save_and_csv_reuse_the_metrics_the_worker_computed_for_this_mask(make_napari_viewer_proxy, qtbot,
                                                                          double_checkpoint, tmp_path, monkeypatch):
    """Save and Export CSV recomputed every metric on the GUI thread (HD95 of a real CT: seconds
    of frozen window) though the metrics worker had just computed them; they now re-use the rows
    computed on the same mask/reference, and compute afresh after an edit."""
    import threading

    from napari_genseg.ui import review_dock

    calls = []
    for name in ("volume_metrics", "volume_stats", "slice_metrics", "slice_stats"):
        real = getattr(review_dock, name)
        monkeypatch.setattr(review_dock, name, lambda *a, _r=real, _n=name, **k: calls.append(
            (_n, threading.current_thread() is threading.main_thread())) or _r(*a, **k))
    viewer = make_napari_viewer_proxy()
    img = _image(viewer)
    mask = _mask(viewer, img)
    mask.data[2:5, 10:20, 10:20] = 1
    ref = viewer.add_labels(np.roll(np.asarray(mask.data), 2, axis=2), name="ref", scale=mask.scale)
    w = _dock(viewer, double_checkpoint, img, mask, reference=ref)
    _paint(mask, 3, 0, 0, 1)
    assert w.update_metrics() is not None or w.metrics_worker is not None
    qtbot.waitUntil(lambda: w.metrics_worker is None and not w._metrics_timer.isActive() and bool(w.metric_rows),
                    timeout=20000)
    calls.clear()
    out, log = w.save(tmp_path / "m.nii.gz")
    csv = w.export_csv(tmp_path / "m.csv")
    assert calls == [] and csv.exists()
    assert json.loads(log.read_text())["metrics"]["rows"] == json.loads(json.dumps(w.metric_rows))
    _paint(mask, 4, 0, 0, 1)  # an edit: the rows shown are stale until recomputed
    _, log2 = w.save(tmp_path / "m2.nii.gz")
    assert ("volume_metrics", True) in calls
    assert json.loads(log2.read_text())["metrics"]["rows"] != json.loads(log.read_text())["metrics"]["rows"]
    w.dirty = False


def test_a_runtime_error_in_a_review_worker_ends_it(make_napari_viewer_proxy, qtbot, double_checkpoint, monkeypatch):
    """The re-run and uncertainty workers end on a RuntimeError (torch's usual failure type) as on
    any other: the dock used to wait for ever with Compute disabled (superqt's generator worker
    emitted neither errored nor finished); the mask is unchanged."""
    import napari_genseg.engine as E

    def failing(*a, **k):
        raise RuntimeError("out of memory")
        yield  # a generator, like run_volume

    monkeypatch.setattr(E, "run_volume", failing)  # the dock imports it when a worker starts
    viewer = make_napari_viewer_proxy()
    img = _image(viewer)
    mask = _mask(viewer, img)
    mask.data[2, 3:6, 3:6] = 1
    before = mask.data.copy()
    w = _dock(viewer, double_checkpoint, img, mask)
    for start in (lambda: w.rerun_slice(index=2), w.compute_uncertainty):
        assert start() is not None
        qtbot.waitUntil(lambda: w.worker is None, timeout=20000)
        assert w._compute.enabled
        np.testing.assert_array_equal(mask.data, before)
