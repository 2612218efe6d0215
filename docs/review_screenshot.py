"""How docs/review_dock.png was made: the Review dock on the real abdominal CT of ../shared.

Run under Xvfb with the project's napari-shot helper (it opens the CT and docks "Review", then
executes this file with ``viewer`` in scope)::

    PYTHONPATH=src xvfb-run -a -s "-screen 0 1600x1000x24" python ../shared/bin/napari-shot \\
        --open ../shared/data/real/ct-abdomen/ct_abdomen_small.nii.gz --plugin napari-genseg \\
        --widget Review --run "exec(open('docs/review_screenshot.py').read())" --wait 200 \\
        --size 1600x1000 --out docs/review_dock.png

The reference layer is the TotalSegmentator labels of that CT mapped to the demo model's classes
(5 liver -> 1, 1 spleen -> 2); the mask is filled by "Compute uncertainty" (MSA²Net demo, 4 views).
"""

import numpy as np

from napari_genseg.io import read_nifti
from napari_genseg.ui._run import add_class_labels

img = viewer.layers[0]  # noqa: F821 (napari-shot's viewer)
ref_vol = read_nifti("../shared/data/real/ct-abdomen/ct_abdomen_small_labels.nii.gz")
names = ["background", "liver", "spleen"]
ref = add_class_labels(viewer, img, "reference (TotalSegmentator)", names, visible=False)  # noqa: F821
ref.data[:] = np.where(ref_vol.data == 5, 1, np.where(ref_vol.data == 1, 2, 0)).astype(np.uint8)
mask = add_class_labels(viewer, img, f"{img.name} [msa2net]", names)  # noqa: F821
_, w = viewer.window.add_plugin_dock_widget("napari-genseg", "Review")  # noqa: F821 (the docked one)
w._image.value, w._mask.value, w._reference.value = img, mask, ref
w._model.value, w._device.value, w._views.value = "msa2net", "cpu", 4
w._reader.value = "Dr. Example"


def _done():
    w.update_metrics()
    w.go_to_row(0)
    w._select_row(w.items[0].index)
    viewer.layers.selection.active = mask  # noqa: F821
    viewer.reset_view()  # noqa: F821


w.compute_uncertainty().finished.connect(_done)
