"""Segment dock: input-check warnings as napari notifications before a run, the HU offset field,
and the run record that the napari writer puts into the mask's JSON sidecar."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gui
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def abdomen_checkpoint(tmp_path):
    from _doubles import ThresholdConfig, ThresholdNet, register_double

    from napari_genseg.models.checkpoints import save_checkpoint

    register_double()
    cfg = ThresholdConfig()
    return save_checkpoint(
        tmp_path / "abd.safetensors", ThresholdNet(cfg), "testdouble", "testdouble_small", cfg,
        ["background", "soft", "dense"],
        {"normalization": {"kind": "hu_window", "low": -200.0, "high": 200.0}, "grid": "resize"},
        body_region="abdomen",
    )


def _widget(viewer, ckpt):
    from napari_genseg.ui.segment_widget import SegmentWidget

    w = SegmentWidget(viewer)
    w._model.value = "testdouble"
    w._checkpoint.value = str(ckpt)
    w._device.value = "cpu"
    w._batch.value = 32
    return w


def _head_viewer(make_napari_viewer_proxy, shared_data, monkeypatch):
    import napari.utils.notifications as nn

    from napari_genseg.ui._io import _read

    shown = []
    monkeypatch.setattr(nn, "show_warning", shown.append)
    viewer = make_napari_viewer_proxy()
    data, kw, _ = _read(str(shared_data / "dicom-ct-head"))[0]
    viewer.add_image(data, **kw)
    shown.clear()
    return viewer, shown


def test_head_series_hu_warning_in_napari_before_the_run(make_napari_viewer_proxy, qtbot, shared_data,
                                                         double_checkpoint, monkeypatch):
    viewer, shown = _head_viewer(make_napari_viewer_proxy, shared_data, monkeypatch)
    w = _widget(viewer, double_checkpoint)
    assert w.run() is not None
    assert any("not look like CT in HU" in m and "set 'HU offset' to -1024" in m for m in shown)
    qtbot.waitUntil(lambda: w.worker is None, timeout=30000)


def test_head_series_region_warning_hu_offset_and_sidecar(make_napari_viewer_proxy, qtbot, shared_data,
                                                          abdomen_checkpoint, tmp_path, monkeypatch):
    from napari_genseg.ui._io import write_labels

    viewer, shown = _head_viewer(make_napari_viewer_proxy, shared_data, monkeypatch)
    w = _widget(viewer, abdomen_checkpoint)
    assert w.run() is not None
    assert any("does not look like the abdomen" in m and "head/neck" in m for m in shown)
    qtbot.waitUntil(lambda: w.worker is None, timeout=30000)

    shown.clear()
    w._hu_offset.value = -1024
    assert w.run() is not None
    qtbot.waitUntil(lambda: w.worker is None, timeout=30000)
    assert not any("not look like CT in HU" in m for m in shown)
    assert any("head/neck" in m for m in shown)

    lab = viewer.layers[-1]
    out = write_labels(str(tmp_path / "head_mask.nii.gz"), lab.data, {"metadata": lab.metadata,
                                                                       "scale": lab.scale,
                                                                       "translate": lab.translate})
    side = json.loads((tmp_path / "head_mask.json").read_text())
    assert out == [str(tmp_path / "head_mask.nii.gz")]
    assert side["model"]["body_region"] == "abdomen" and side["input_checks"]["hu_offset"] == -1024
    assert side["inference"]["precision"] == "fp32" and "edits made in napari" in side["written_by"]


def test_painted_layer_gets_a_sidecar_without_a_model(tmp_path):
    from napari_genseg.ui._io import write_labels

    lab = np.zeros((3, 4, 5), np.uint8)
    lab[1, 2, 3] = 1
    write_labels(str(tmp_path / "p.nii.gz"), lab, {"metadata": {}, "scale": (2.0, 1.0, 1.0),
                                                   "translate": (0.0, 0.0, 0.0)})
    side = json.loads((tmp_path / "p.json").read_text())
    assert side["model"] is None and "no model run" in side["written_by"]
