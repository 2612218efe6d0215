"""The Segment dock runs MARSeg: its family and configs are in the model list, a stage-2
checkpoint segments through the dock exactly as through its predictor, a stage-1 checkpoint is
refused in one line."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from napari_genseg.volume import Volume

pytestmark = pytest.mark.gui


@pytest.fixture
def notes(monkeypatch):
    from napari.utils.notifications import notification_manager

    got = []
    monkeypatch.setattr(notification_manager, "dispatch", got.append)
    return got


def _checkpoint(path, module="segmentation"):
    from napari_genseg.models import registry
    from napari_genseg.models.checkpoints import save_checkpoint
    from napari_genseg.training.tasks.marseg import MARSEG_NORMALIZATION

    torch.manual_seed(0)
    cfg = dataclasses.replace(registry.get_entry("marseg_tiny").config, module=module)
    model = registry.get_family("marseg").build(cfg)
    return save_checkpoint(path, model, "marseg", "marseg_tiny", cfg, ["background", "liver", "spleen"],
                           {"normalization": MARSEG_NORMALIZATION, "grid": "resize", "channels": 3})


def test_segment_dock_runs_a_marseg_checkpoint(make_napari_viewer_proxy, qtbot, tmp_path, notes):
    from napari_genseg.engine import run_to_end, run_volume
    from napari_genseg.models.checkpoints import load_checkpoint
    from napari_genseg.predictors import make_predictor
    from napari_genseg.ui.layers import image_layer_data
    from napari_genseg.ui.segment_widget import SegmentWidget

    rng = np.random.default_rng(1)
    vol = Volume(rng.integers(-200, 300, (4, 40, 40)).astype(np.int16), spacing=(3.0, 2.0, 2.0))
    viewer = make_napari_viewer_proxy()
    d, kw, _ = image_layer_data(vol, "ct")
    viewer.add_image(d, **kw)
    w = SegmentWidget(viewer)
    assert {"marseg", "marseg_demo", "marseg_tiny", "marseg_paper"} <= set(w._model.choices)
    # a stage-1 (MAR pre-training) checkpoint has no segmentation head: one line, nothing created
    w._model.value = "marseg_tiny"
    w._checkpoint.value = str(_checkpoint(tmp_path / "s1.safetensors", "pretrain"))
    w._device.value = "cpu"
    assert w.run() is None or qtbot.waitUntil(lambda: w.worker is None, timeout=20000) is None
    assert notes and "stage-1 (pretrain) checkpoint" in notes[-1].message and "\n" not in notes[-1].message
    assert [layer.name for layer in viewer.layers] == ["ct"]
    ck = _checkpoint(tmp_path / "s2.safetensors")
    w._checkpoint.value = str(ck)
    assert w.run() is not None
    qtbot.waitUntil(lambda: w.worker is None, timeout=30000)
    lab = viewer.layers["ct [marseg]"]
    want = run_to_end(run_volume(make_predictor(load_checkpoint(ck), device="cpu", precision="fp32"),
                                 vol, batch_size=4)).labels
    assert lab.data.shape == vol.shape
    np.testing.assert_array_equal(np.asarray(lab.data), want)
    assert list(lab.features["class"]) == ["background", "liver", "spleen"]
