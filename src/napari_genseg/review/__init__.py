"""Review of a segmentation by a reader (no napari, no Qt; the dock is ``ui/review_dock.py``).

* ``queue``: per-slice signals, the ranked queue, per-slice status and the progress line;
* ``uncertainty``: the uncertainty volume of a mask from class votes (TTA views or AR-Seg samples),
  and model agreement (other models' results as the votes);
* ``report``: volume metrics against a reference, or per-class volume and HU without one; CSV;
* ``autosave``: content hash of an image, atomic autosave of mask + review state and its restore;
* ``log``: the Save action: mask on the source geometry + ``<name>.review.json``;
* ``training_export``: "Add to training set": a Decathlon-layout case for ``genseg train``.
"""
