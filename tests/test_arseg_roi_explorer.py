"""The AR-Seg explorer's Box tab (region-of-interest mode): a rectangle drawn in a Shapes layer ->
samples, consensus, variability and scales shown on the box, the consensus pasted into a Labels
layer inside the box only, as one undo step."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gui


def _setup(viewer, ckpt):
    from napari_genseg.phantom import PHANTOM_CLASSES, make_phantom
    from napari_genseg.ui._run import add_class_labels
    from napari_genseg.ui.arseg_explorer import ArSegExplorer
    from napari_genseg.ui.layers import image_layer_data
    from napari_genseg.volume import Volume

    ph = make_phantom(seed=1, shape=(6, 64, 72), spacing=(3.0, 2.0, 1.6))
    d, kw, _ = image_layer_data(Volume(ph.image, spacing=ph.spacing), "ph")
    image = viewer.add_image(d, **kw)
    labels = add_class_labels(viewer, image, "ph labels", list(PHANTOM_CLASSES))
    labels.data[:] = ph.labels  # liver, spleen, ... and lesions (id 6) already there
    w = ArSegExplorer(viewer)
    w._image.value = image
    w._device.value = "cpu"
    w._samples.value = 3
    w.roi._checkpoint.value = str(ckpt)
    w.roi._paste_to.value = labels
    return w, image, labels


def test_run_in_box_pastes_inside_the_box_only_as_one_undo_step(make_napari_viewer_proxy, qtbot,
                                                                roi_everything_checkpoint):
    viewer = make_napari_viewer_proxy()
    w, image, labels = _setup(viewer, roi_everything_checkpoint)
    viewer.dims.set_current_step(0, 3)
    shapes = w.roi.draw_box()
    assert shapes.mode == "add_rectangle" and tuple(shapes.scale) == tuple(image.scale)
    # a rectangle in the image's data coordinates (the layers share scale and translate): pixel
    # centres y 11..27 and x 31..41 are inside it -> box 3:4, 11:28, 31:42 (17 x 11 voxels)
    shapes.add_rectangles(np.array([[3, 10.2, 30.4], [3, 10.2, 41.9], [3, 27.7, 41.9], [3, 27.7, 30.4]]))
    assert str(w.roi.current_box()) == "3:4,11:28,31:42"
    before = labels.data.copy()
    assert w.roi.run() is not None
    qtbot.waitUntil(lambda: w.roi.worker is None, timeout=60000)
    res = w.roi.result
    assert res is not None and str(res.box) == "3:4,11:28,31:42"
    changed = labels.data != before
    inside = np.zeros(before.shape, bool)
    inside[3:4, 11:28, 31:42] = True
    assert not changed[~inside].any()  # nothing outside the box moved
    # liver_lesion found by name (id 6) fills the box's background; the liver voxels (id 1, markers of
    # another label inside the box) are kept: a paste never overwrites other labels
    want = before.copy()
    want[inside & ((before == 0) | (before == 6))] = 6
    assert (before[inside] == 1).any() and (before[inside] == 0).any()
    np.testing.assert_array_equal(labels.data, want)
    # one undo step restores everything
    labels.undo()
    np.testing.assert_array_equal(labels.data, before)
    labels.redo()
    np.testing.assert_array_equal(labels.data, want)
    # results in place: small layers on the box, at the image's scale
    for key in ("consensus", "variability", "sample", "scales"):
        lay = w.roi._layers[key]
        assert lay.data.shape == (1, 17, 11), key
        np.testing.assert_allclose(lay.translate, np.asarray(image.translate) + np.array([3, 11, 31]) * image.scale)
        np.testing.assert_allclose(lay.scale, image.scale)
    assert w.roi._layers["variability"].data.max() == 0  # every sample agrees here
    assert {k for k, lay in w.roi._layers.items() if lay.visible} == {"variability"}
    w.roi._sample.value = 2
    assert w.roi._layers["sample"].name.endswith("sample 2/3") and w.roi._layers["sample"].visible
    w.roi._scale.value = 1
    assert w.roi._layers["scales"].name.endswith("scale 1/8") and w.roi._layers["scales"].visible
    w.roi.step_scale()
    assert w.roi._scale.value == 2


def test_run_in_box_refuses_without_a_box_or_with_a_whole_slice_checkpoint(make_napari_viewer_proxy, qtbot,
                                                                          roi_everything_checkpoint,
                                                                          arseg_tiny_checkpoint):
    viewer = make_napari_viewer_proxy()
    w, image, labels = _setup(viewer, roi_everything_checkpoint)
    before = labels.data.copy()
    w.roi.draw_box()
    assert w.roi.run() is None  # no rectangle yet
    w.roi._shapes.value.add_rectangles(np.array([[2, 5, 5], [2, 5, 20], [2, 20, 20], [2, 20, 5]]))
    w.roi._checkpoint.value = str(arseg_tiny_checkpoint)  # trained on whole slices
    assert w.roi.run() is None
    np.testing.assert_array_equal(labels.data, before)


def test_whole_slice_run_refuses_a_roi_checkpoint(make_napari_viewer_proxy, roi_everything_checkpoint):
    viewer = make_napari_viewer_proxy()
    w, image, labels = _setup(viewer, roi_everything_checkpoint)
    w._model.value = "arseg_tiny"
    w._checkpoint.value = str(roi_everything_checkpoint)
    assert w.run() is None and w.worker is None


def test_box_from_shape_takes_the_pixel_centres_inside_and_clips():
    from napari_genseg.roi import RoiError
    from napari_genseg.ui.arseg_roi import box_from_shape

    v = np.array([[4.2, -3.0, 60.5], [4.2, 9.0, 75.0], [3.9, 9.0, 60.5], [3.9, -3.0, 75.0]])
    b = box_from_shape(v, (6, 64, 72), current_z=0, half_depth=2)
    assert str(b) == "2:6,0:10,61:72"  # z 4 +- 2 clipped to 6, y -3..9 -> 0..9, x 60.5..75 -> 61..71
    assert str(box_from_shape(v[:, 1:], (6, 64, 72), current_z=1)) == "1:2,0:10,61:72"  # 2-D: current slice
    with pytest.raises(RoiError, match="no pixel"):
        box_from_shape(np.array([[0, 10.2, 10.2], [0, 10.8, 10.8]]), (6, 64, 72), 0)
