"""Training, evaluation and data pipelines for napari-genseg segmentation models.

* :mod:`.config`      ``TrainConfig`` (the options every family shares) and the train-state path
* :mod:`.data`        datasets (phantom, MSD layout, NIfTI pairs) as ``Case`` (a ``Volume`` + labels),
  splits, 2-D slice sampling + augmentation
* :mod:`.losses`      Boundary DoU loss (MSA²Net recipe) and Dice + cross-entropy
* :mod:`.loop`        the one train loop (AMP, time budget, exact resume, DDP, checkpoints)
* :mod:`.tasks`       what each model family adds to it (segmentation, AR-Seg stages 1/2)
* :mod:`.optim`, :mod:`.sampler`, :mod:`.distributed`, :mod:`.resume`, :mod:`.provenance`: the
  loop's recipes and schedules, epoch order, DDP collectives, RNG/train-state file, provenance
* :mod:`.evaluate`    checkpoint evaluation on labelled volumes (+ HU baseline rows)
* :mod:`.cli`         ``genseg train`` / ``genseg evaluate``

Imports are lazy so ``import napari_genseg.training`` stays cheap.
"""

__all__ = ["config", "data", "losses", "loop", "tasks", "optim", "sampler", "distributed", "resume", "provenance",
           "evaluate", "cli"]
