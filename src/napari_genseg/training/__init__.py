"""Training, evaluation and data pipelines for napari-genseg segmentation models.

* :mod:`.data`     datasets (phantom, MSD layout, NIfTI pairs), splits, 2-D slice sampling + augmentation
* :mod:`.losses`   Boundary DoU loss (MSA²Net recipe) and Dice + cross-entropy
* :mod:`.loop`     the train loop (recipes ``paper`` / ``adamw``, AMP, resume, DDP)
* :mod:`.evaluate` checkpoint evaluation on labelled volumes (+ HU baseline rows)
* :mod:`.cli`      ``genseg train`` / ``genseg evaluate``

Imports are lazy so ``import napari_genseg.training`` stays cheap.
"""

__all__ = ["data", "losses", "loop", "evaluate", "cli"]
