"""AR-Seg explorer dock with the real (tiny, untrained) AR-Seg model: run, threshold, samples,
variability, scale animation, export, and the engine's memory contract."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gui


def _image(viewer):
    from napari_genseg.phantom import make_phantom
    from napari_genseg.ui.layers import image_layer_data
    from napari_genseg.volume import Volume

    ph = make_phantom(seed=1, shape=(6, 64, 64), spacing=(3.0, 2.0, 2.0))
    d, kw, _ = image_layer_data(Volume(ph.image, spacing=ph.spacing), "ph")
    return viewer.add_image(d, **kw)


def test_explorer_run_threshold_samples_scales_export(make_napari_viewer_proxy, qtbot, arseg_tiny_checkpoint, tmp_path):
    from napari_genseg.ui.arseg_explorer import ArSegExplorer

    viewer = make_napari_viewer_proxy()
    _image(viewer)
    w = ArSegExplorer(viewer)
    w._model.value = "arseg_tiny"
    w._checkpoint.value = str(arseg_tiny_checkpoint)
    w._device.value = "cpu"
    w._samples.value = 4
    w._scope.value = "range"
    w._start.value, w._stop.value = 1, 3
    viewer.dims.set_current_step(0, 2)
    assert w._target.choices == (1, 2) and w._target.value == 1  # "lesion", "organ" from the JSON
    w.reset_choices()  # napari does this on every layer change: the target list must survive
    assert w._target.choices == (1, 2)
    assert w.run() is not None
    qtbot.waitUntil(lambda: w.worker is None, timeout=60000)
    assert sorted(w.tokens) == [1, 2, 3] and w.tokens[2].shape[0] == 4
    cons = w._layer("consensus")
    expected = (w.votes[2] / 4 > 0.5)
    np.testing.assert_array_equal(cons.data[2] > 0, expected)
    # threshold slider updates the consensus live, as one undo step
    w._threshold.value = 0.2
    np.testing.assert_array_equal(cons.data[2] > 0, w.votes[2] / 4 > 0.2)
    cons.undo()
    np.testing.assert_array_equal(cons.data[2] > 0, expected)
    # variability in % of samples disagreeing
    var = w._layer("variability")
    v = w.votes[2].astype(float)
    np.testing.assert_array_equal(var.data[2], np.round(200 * np.minimum(v, 4 - v) / 4))
    # show toggles between the three layers
    w._show.value = "variability"
    assert var.visible and not cons.visible and not w._layer("sample").visible
    # samples decode on demand
    w._sample.value = 3
    assert "sample 3/4" in w._layer("sample").name
    # the scale animation steps 1..8 and loops
    w._scale.value = 1
    assert "scale 1/8" in w._layer("scale").name and "scale 1/8" in w.text_overlay().text
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
    np.testing.assert_allclose(prog[-1], w.votes[2] / 4, atol=1e-6)
    for name in ("scales.gif", "scales.png"):
        w._export_path.value = str(tmp_path / name)
        out = w.export()
        assert out is not None and out.stat().st_size > 0
    import imageio.v3 as iio

    assert iio.imread(tmp_path / "scales.gif", index=None).shape[0] == 8


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
