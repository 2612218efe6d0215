"""The Segment dock's run reads the CT once, batch by batch: no copy of the volume per slice
(issue #12, "Memory for full-size CT"). A counting ndarray subclass stands in for the volume the
dock builds from the layer and counts every element copied out of it."""

from __future__ import annotations

import numpy as np
import pytest

from napari_genseg.volume import Volume

pytestmark = pytest.mark.gui


class CountingArray(np.ndarray):
    """An ndarray that counts the elements of every copy made from it (indexing that is not a
    view, ``copy``, ``astype``); copies come back as plain ndarrays (not counted again)."""

    copies: list[int] = []

    def __getitem__(self, key):
        out = super().__getitem__(key)
        if isinstance(out, np.ndarray) and out.size and not np.may_share_memory(out, self):
            CountingArray.copies.append(out.size)
            return out.view(np.ndarray)
        return out

    def copy(self, order="C"):
        CountingArray.copies.append(self.size)
        return np.ndarray.copy(self.view(np.ndarray), order)

    def astype(self, dtype, *args, **kwargs):
        out = np.ndarray.astype(self.view(np.ndarray), dtype, *args, **kwargs)
        if not np.may_share_memory(out, self):
            CountingArray.copies.append(self.size)
        return out


def test_dock_run_copies_each_slice_once_not_the_volume(make_napari_viewer_proxy, qtbot, double_checkpoint,
                                                         monkeypatch):
    import napari_genseg.ui.segment_widget as sw
    from napari_genseg.ui.layers import image_layer_data

    z, hw = 24, 48
    data = np.full((z, hw, hw), -1000, np.int16)
    data[:, 10:38, 10:38] = 40
    data[:, 20:26, 20:26] = 900
    viewer = make_napari_viewer_proxy()
    d, kw, _ = image_layer_data(Volume(data, spacing=(3.0, 1.0, 1.0)), "ct")
    viewer.add_image(d, **kw)
    real = sw.volume_from_layer

    def counting_volume(*args, **kwargs):
        vol = real(*args, **kwargs)
        vol.data = np.asarray(vol.data).view(CountingArray)
        return vol

    monkeypatch.setattr(sw, "volume_from_layer", counting_volume)
    CountingArray.copies = []
    w = sw.SegmentWidget(viewer)
    w._model.value = "testdouble"
    w._checkpoint.value = str(double_checkpoint)
    w._device.value = "cpu"
    w._batch.value = 4
    assert w.run() is not None
    qtbot.waitUntil(lambda: w.worker is None, timeout=20000)
    lab = viewer.layers["ct [testdouble]"]
    assert lab.data[5, 22, 22] == 2 and lab.data[5, 12, 12] == 1  # the run happened
    copies = CountingArray.copies
    # the engine's batches: every slice once (6 batches of 4 slices), nothing of the volume's size
    assert sum(copies) <= 1.25 * data.size, copies
    assert max(copies) <= 4 * hw * hw, copies
    assert len([c for c in copies if c == 4 * hw * hw]) == z // 4
