"""AR-Seg explorer dock with the real (tiny, untrained) AR-Seg model: run, threshold, samples,
variability, scale animation, export, results keyed by run, decoding off the GUI thread, and
the engine's memory contract."""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytestmark = pytest.mark.gui

MANAGED = ("consensus", "scales", "sample", "variability")


def _image(viewer, seed=1, name="ph"):
    from napari_genseg.phantom import make_phantom
    from napari_genseg.ui.layers import image_layer_data
    from napari_genseg.volume import Volume

    ph = make_phantom(seed=seed, shape=(6, 64, 64), spacing=(3.0, 2.0, 2.0))
    d, kw, _ = image_layer_data(Volume(ph.image, spacing=ph.spacing), name)
    return viewer.add_image(d, **kw)


def _explorer(viewer, ckpt, n=4):
    from napari_genseg.ui.arseg_explorer import ArSegExplorer

    w = ArSegExplorer(viewer)
    w._model.value = "arseg_tiny"
    w._checkpoint.value = str(ckpt)
    w._device.value = "cpu"
    w._samples.value = n
    return w


def _run(qtbot, w, start=None, stop=None, wait_decode=True):
    if start is None:
        w._scope.value = "current"
    else:
        w._scope.value = "range"
        w._start.value, w._stop.value = start, stop
    assert w.run() is not None
    qtbot.waitUntil(lambda: w.worker is None, timeout=60000)
    if wait_decode:
        qtbot.waitUntil(lambda: w._decoder is None, timeout=60000)


def _visible(w):
    return {k for k in MANAGED if w._layer(k) is not None and w._layer(k).visible}


def test_explorer_run_threshold_samples_scales_export(make_napari_viewer_proxy, qtbot, arseg_tiny_checkpoint, tmp_path):
    viewer = make_napari_viewer_proxy()
    _image(viewer)
    w = _explorer(viewer, arseg_tiny_checkpoint)
    viewer.dims.set_current_step(0, 2)
    assert w._target.choices == (1, 2) and w._target.value == 1  # "lesion", "organ" from the JSON
    w.reset_choices()  # napari does this on every layer change: the target list must survive
    assert w._target.choices == (1, 2)
    _run(qtbot, w, 1, 3)
    res = w.results
    assert res.slices == [1, 2, 3] and res.tokens[2].shape[0] == 4
    cons = w._layer("consensus")
    expected = res.votes[2] / 4 > 0.5
    np.testing.assert_array_equal(cons.data[2] > 0, expected)
    # threshold slider updates the consensus live, as one undo step
    w._threshold.value = 0.2
    np.testing.assert_array_equal(cons.data[2] > 0, res.votes[2] / 4 > 0.2)
    cons.undo()
    np.testing.assert_array_equal(cons.data[2] > 0, expected)
    # samples are decoded (in the worker) and browsed
    w._sample.value = 3
    qtbot.waitUntil(lambda: w._decoder is None)
    assert "sample 3/4" in w._layer("sample").name
    np.testing.assert_array_equal(w._layer("sample").data[2] > 0, w.predictor.decode_samples(
        res.tokens[2], (64, 64), w.volume.spacing[1:])[2])
    # the scale animation steps 1..8 and loops
    w._scale.value = 1
    assert "scale 1/8" in w._layer("scales").name and "scale 1/8" in w.text_overlay().text
    for _ in range(8):
        w.step_scale()
    assert w._scale.value == 1
    seen = []
    w._scale.changed.connect(seen.append)
    w._fps.value = 10
    w.toggle_play()
    assert w._play.text == "Pause"
    qtbot.waitUntil(lambda: len(seen) >= 3, timeout=5000)  # the animation advances by itself
    w.toggle_play()
    assert w._play.text == "Play" and seen[:2] == [2, 3]
    # full-scale progression equals the consensus mean
    prog = w.progression(2)
    assert prog.shape == (8, 64, 64)
    np.testing.assert_array_equal(prog[-1], res.votes[2] / 4)
    for name in ("scales.gif", "scales.png"):
        w._export_path.value = str(tmp_path / name)
        out = w.export()
        assert out is not None and out.stat().st_size > 0
    import imageio.v3 as iio

    assert iio.imread(tmp_path / "scales.gif", index=None).shape[0] == 8


def test_variability_is_the_percentage_of_samples_disagreeing_with_the_consensus_shown(
        make_napari_viewer_proxy, qtbot, arseg_tiny_checkpoint):
    """Hand-made votes of N = 4 samples on one row: 0, 1, 2, 3, 4 samples mark the pixel."""
    viewer = make_napari_viewer_proxy()
    _image(viewer)
    w = _explorer(viewer, arseg_tiny_checkpoint)
    viewer.dims.set_current_step(0, 2)
    _run(qtbot, w)
    w.results.votes[2, 0, :5] = [0, 1, 2, 3, 4]
    w._show.value = "variability"
    var, cons = w._layer("variability"), w._layer("consensus")
    w._threshold.value = 0.2
    # consensus > 0.2 marks 1..4 votes; where it is shown, the samples that do not mark the pixel
    # disagree (3 of 4 = 75 %, 2 of 4, 1 of 4, none); where it is not, the ones that mark it
    np.testing.assert_array_equal(cons.data[2, 0, :5], [0, 1, 1, 1, 1])
    np.testing.assert_array_equal(var.data[2, 0, :5], [0, 75, 50, 25, 0])
    assert tuple(var.contrast_limits) == pytest.approx((0, 80)) and "80 %" in w._legend.value
    w._threshold.value = 0.5
    np.testing.assert_array_equal(cons.data[2, 0, :5], [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(var.data[2, 0, :5], [0, 25, 50, 25, 0])  # an even split: 50 %
    assert tuple(var.contrast_limits) == pytest.approx((0, 50)) and "50 %" in w._legend.value
    assert var.data.max() <= 50


def test_show_makes_exactly_the_named_layer_visible(make_napari_viewer_proxy, qtbot, arseg_tiny_checkpoint):
    viewer = make_napari_viewer_proxy()
    img = _image(viewer)
    w = _explorer(viewer, arseg_tiny_checkpoint)
    _run(qtbot, w)
    assert _visible(w) == {"consensus"}
    for choice in ("variability", "scales", "sample", "consensus"):
        w._show.value = choice
        assert _visible(w) == {choice}, choice
        assert img.visible
    w._show.value = "variability"
    w._scale.value = 3  # moving the scale shows the scales (and only them)
    assert _visible(w) == {"scales"} and w._show.value == "scales"
    w._sample.value = 2
    assert _visible(w) == {"sample"}


def test_results_are_dropped_when_image_checkpoint_seed_class_or_n_change(
        make_napari_viewer_proxy, qtbot, arseg_tiny_checkpoint, tmp_path):
    import shutil

    viewer = make_napari_viewer_proxy()
    a = _image(viewer, seed=1, name="a")
    w = _explorer(viewer, arseg_tiny_checkpoint)
    viewer.dims.set_current_step(0, 2)
    w._image.value = a
    _run(qtbot, w)
    assert w.results.slices == [2] and w.results.votes[2].any()  # something a stale state could leak
    b = _image(viewer, seed=2, name="b")  # another image of the same shape
    w._image.value = b
    viewer.dims.set_current_step(0, 3)
    _run(qtbot, w, wait_decode=False)
    assert w.results.slices == [3]  # image a's votes and tokens are gone
    cons_b = viewer.layers["b [arseg] consensus"]
    w._threshold.value = 0.05  # would write a's slice-2 consensus into b's layer if a's state survived
    assert cons_b.data[2].max() == 0
    np.testing.assert_array_equal(cons_b.data[3] > 0, w.results.votes[3] / 4 > 0.05)
    # same image, same settings: runs add up
    viewer.dims.set_current_step(0, 1)
    _run(qtbot, w, wait_decode=False)
    assert w.results.slices == [1, 3]
    # any other key part starts afresh (each run on a slice not run before)
    for z, change in ((4, "seed"), (0, "n"), (5, "target"), (2, "checkpoint")):
        if change == "seed":
            w._seed.value = 7
        elif change == "n":
            w._samples.value = 3
        elif change == "target":
            w._target.value = 2
        else:
            other = tmp_path / "copy.safetensors"  # same weights, another file: another checkpoint
            shutil.copy(arseg_tiny_checkpoint, other)
            shutil.copy(arseg_tiny_checkpoint.with_suffix(".json"), other.with_suffix(".json"))
            w._checkpoint.value = str(other)
            w._target.value = 2
        viewer.dims.set_current_step(0, z)
        _run(qtbot, w, wait_decode=False)
        assert w.results.slices == [z], change
    assert (w.results.n, w.results.target_class) == (3, 2)


def test_decoding_runs_off_the_gui_thread(make_napari_viewer_proxy, qtbot, arseg_tiny_checkpoint):
    """Scales and samples are decoded in a worker when a slice is shown; consensus and
    variability need no decoding at all."""
    viewer = make_napari_viewer_proxy()
    _image(viewer)
    w = _explorer(viewer, arseg_tiny_checkpoint)
    _run(qtbot, w, 1, 4)
    calls = []
    decode = w.predictor.decode_samples

    def spy(*a, **k):
        calls.append((threading.current_thread(), k.get("upto_scale")))
        return decode(*a, **k)

    w.predictor.decode_samples = spy
    viewer.dims.set_current_step(0, 3)  # show = consensus: nothing to decode
    qtbot.wait(200)
    assert calls == [] and w._decoder is None
    w._show.value = "scales"
    for z in (1, 3, 4):
        viewer.dims.set_current_step(0, z)
        # the votes arrive from the worker first, the overlay follows on the GUI thread's next turn
        qtbot.waitUntil(lambda z=z: w.results.scale_votes(z, 8) is not None
                        and f"slice {z}," in w.text_overlay().text, timeout=20000)
        np.testing.assert_array_equal(w._layer("scales").data[z] > 0, w.results.votes[z] / 4 > 0.5)
    assert calls and all(t is not threading.main_thread() for t, _ in calls)
    assert calls[0][1] == 8  # the scale shown first, then the others for the animation


def test_dock_fits_a_1000_pixel_screen_next_to_the_segment_dock(make_napari_viewer_proxy, arseg_tiny_checkpoint):
    from napari_genseg.ui.segment_widget import SegmentWidget

    viewer = make_napari_viewer_proxy()
    w = _explorer(viewer, arseg_tiny_checkpoint)
    seg = SegmentWidget(viewer)
    both = w.native.minimumSizeHint().height() + seg.native.minimumSizeHint().height()
    # 1000 px screen - title bar, menu, status bar and dock titles (~150 px)
    assert both <= 850, (w.native.minimumSizeHint().height(), seg.native.minimumSizeHint().height())


def test_arseg_engine_memory_contract(arseg_tiny_checkpoint):
    from napari_genseg.engine import run_to_end, run_volume
    from napari_genseg.models.checkpoints import load_checkpoint
    from napari_genseg.predictors import make_predictor
    from napari_genseg.volume import Volume

    ck = load_checkpoint(arseg_tiny_checkpoint)
    pred = make_predictor(ck, device="cpu", n_samples=16)
    vol = Volume(np.random.default_rng(0).normal(0, 100, (3, 256, 240)).astype(np.float32), (3.0, 1.0, 1.0))
    res = run_to_end(run_volume(pred, vol, batch_size=2))
    votes = np.stack([res.extras["votes"][z] for z in range(3)])
    tokens = np.stack([res.extras["tokens"][z] for z in range(3)])
    assert votes.dtype == np.uint8 and votes.shape == vol.shape and votes.max() <= 16
    assert tokens.dtype == np.int16 and tokens.shape[:2] == (3, 16)
    added = votes.nbytes + tokens.nbytes
    assert added <= 2 * res.labels.nbytes
    np.testing.assert_array_equal(res.labels > 0, votes / 16 > 0.5)


def test_a_run_that_fails_or_is_cancelled_before_its_first_slice_gives_the_previous_run_back(
        make_napari_viewer_proxy, qtbot, arseg_tiny_checkpoint, monkeypatch):
    """A second run with another seed used to drop the first run's samples, votes and
    variability as it started; when it then failed (or was cancelled) before its first slice
    they were gone. Now they come back; a first run that fails leaves no empty consensus layer."""
    import napari_genseg.ui.arseg_explorer as X

    viewer = make_napari_viewer_proxy()
    img = _image(viewer)
    w = _explorer(viewer, arseg_tiny_checkpoint)
    w._image.value = img
    viewer.dims.set_current_step(0, 2)

    def failing(*a, **k):
        raise RuntimeError("out of memory")
        yield  # a generator, like run_volume

    real = X.run_volume
    monkeypatch.setattr(X, "run_volume", failing)
    _run(qtbot, w)
    assert w._status.value.startswith("failed") and "ph [arseg] consensus" not in viewer.layers
    monkeypatch.setattr(X, "run_volume", real)
    _run(qtbot, w)
    first, votes = w.results, w.results.votes.copy()
    cons = viewer.layers["ph [arseg] consensus"]
    shown = cons.data.copy()
    w._show.value = "variability"
    var = w._layer("variability")
    var_before = np.asarray(var.data).copy()
    assert votes[2].any()
    w._seed.value = 9  # another run key: the results would be replaced
    monkeypatch.setattr(X, "run_volume", failing)
    _run(qtbot, w)
    assert w._status.value.startswith("failed")
    assert w.results is first and w.results.slices == [2]
    np.testing.assert_array_equal(w.results.votes, votes)
    np.testing.assert_array_equal(cons.data, shown)
    assert w._layer("variability") is var
    np.testing.assert_array_equal(var.data, var_before)
    assert [lay.name for lay in viewer.layers].count("ph [arseg] consensus") == 1
    # cancelled before its first slice: the same, and the status line says so
    gate = threading.Event()

    def held(*a, **k):
        gate.wait(10)
        return
        yield  # a generator that ends without a slice once released

    monkeypatch.setattr(X, "run_volume", held)
    w._seed.value = 11
    assert w.run() is not None
    w.cancel()
    gate.set()
    qtbot.waitUntil(lambda: w.worker is None, timeout=20000)
    assert w._status.value == "cancelled before the first slice; the previous results are kept"
    assert w.results is first and w._layer("variability") is var
