"""How docs/arseg_roi.png was made: the AR-Seg explorer's Box tab (region-of-interest mode) on a
liver lesion of an unseen phantom (seed 1003), with the variability map on the box.

Run under Xvfb with the project's napari-shot helper (it docks the AR-Seg explorer, then executes
this file with ``viewer`` in scope)::

    PYTHONPATH=src xvfb-run -a -s "-screen 0 1600x1000x24" python ../shared/bin/napari-shot \\
        --plugin napari-genseg --widget "AR-Seg explorer" \\
        --run "exec(open('docs/arseg_roi_screenshot.py').read())" --wait 60 --size 1600x1000 \\
        --out docs/arseg_roi.png

The box is what a reader would draw: the bounding box of the 4 simulated annotators' lesion masks
on the slice of the largest lesion section, plus 6 mm. The model is ``models/arseg_roi_demo``
(``GENSEG_ROI_CKPT`` overrides it), N = 16. The consensus is pasted into ``ph [arseg] consensus``
(shown as an outline), the annotators' majority (the phantom's lesion label) is the cyan outline.
"""

import os

import numpy as np

from napari.utils.colormaps import DirectLabelColormap
from scipy import ndimage as ndi

from napari_genseg.phantom import LESION, make_phantom
from napari_genseg.ui.layers import image_layer_data
from napari_genseg.volume import Volume

ph = make_phantom(seed=1003, shape=(40, 224, 224), spacing=(3.0, 1.5, 1.5))
d, kw, _ = image_layer_data(Volume(ph.image, spacing=ph.spacing), "ph")
kw["contrast_limits"] = (-40, 220)  # a liver window: lesions ~70 HU in a ~105 HU liver
img = viewer.add_image(d, **kw)  # noqa: F821 (napari-shot's viewer)
union = ph.lesion_annotations.any(0)
z = int(np.argmax(union.sum((1, 2))))
# the largest component of that slice
lab, n = ndi.label(union[z])
big = np.argmax(np.bincount(lab.ravel())[1:]) + 1
ys, xs = np.where(lab == big)
m = int(np.ceil(6.0 / 1.5))
y0, y1, x0, x1 = ys.min() - m, ys.max() + 1 + m, xs.min() - m, xs.max() + 1 + m
truth = viewer.add_labels((ph.labels == LESION).astype(np.uint8), name="annotators' majority (phantom label)",  # noqa: F821
                          scale=img.scale, translate=img.translate, opacity=1.0)
truth.contour = 1
truth.colormap = DirectLabelColormap(color_dict={None: "transparent", 0: "transparent", 1: "cyan"})
_, w = viewer.window.add_plugin_dock_widget("napari-genseg", "AR-Seg explorer")  # noqa: F821
w._image.value = img
w._device.value, w._samples.value = "cpu", 16
w._tabs.setCurrentIndex(3)
viewer.dims.set_current_step(0, z)  # noqa: F821
shapes = w.roi.draw_box()
shapes.add_rectangles(np.array([[z, y0 - 0.5, x0 - 0.5], [z, y0 - 0.5, x1 - 0.5], [z, y1 - 0.5, x1 - 0.5],
                                [z, y1 - 0.5, x0 - 0.5]]))
shapes.mode = "pan_zoom"
w.roi._checkpoint.value = os.environ.get("GENSEG_ROI_CKPT", "models/arseg_roi_demo.safetensors")


def _done():
    cons = viewer.layers["ph [arseg] consensus"]  # noqa: F821
    cons.contour = 1
    cons.opacity = 1.0
    w.roi._show.value = "variability"
    w.roi._layers["variability"].opacity = 0.55  # the lesion stays visible under the map
    viewer.layers.move(viewer.layers.index(truth), len(viewer.layers))  # noqa: F821 (outline on top)
    sy, sx = img.scale[1], img.scale[2]
    viewer.camera.center = (z * img.scale[0], (y0 + y1) / 2 * sy, (x0 + x1) / 2 * sx)  # noqa: F821
    viewer.camera.zoom = 5.0  # noqa: F821
    viewer.layers.selection.active = img  # noqa: F821


w.roi.run().finished.connect(_done)
