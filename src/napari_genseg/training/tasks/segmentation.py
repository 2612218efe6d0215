"""Slice-wise semantic segmentation (MSA²Net and every family of kind "segmentation").

* Model: the registered config with ``num_classes = len(classes)`` (background = 0).
* Data: ``data.load_sources`` + ``data.make_split`` (by case; a single-case source holds out a slice
  block, ``holdout_slices``), ``data.SliceDataset`` on the model grid (the engine's ``SliceGrid``),
  ``repeat`` oversamples a data spec's (or a kind's) training slices.
* Loss on the logits (fp32): ``loss`` or the recipe's default (paper: Boundary DoU, MSA²Net;
  adamw: Dice + CE). Items: (x (1, S, S) normalised, y (S, S) class ids).
* Validation: Dice / IoU / HD95 per class on the held-out slices through the inference predictor
  (same normalisation, grid and logits mapping back onto the slice's own pixels); score = mean
  foreground Dice.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from ...preprocessing import Normalization, SliceGrid
from .. import data as D
from ..losses import make_loss
from .base import ModelSpec, SliceTask, TaskData, build_registered_model, load_init_weights

__all__ = ["SegmentationTask", "validate_slices"]


@torch.no_grad()
def validate_slices(model: nn.Module, cases: list[D.Case], items, class_names, norm: Normalization,
                    grid: SliceGrid, device: torch.device, batch_size: int = 8, in_chans: int = 1) -> dict:
    """Dice/IoU/HD95 (``metrics.evaluate_labels``) per class on the slices ``items`` ((case index,
    [z...]) pairs) through the inference path; -> {"score", "dice", "mean_dice", "per_case"}.
    A class absent from a case's reference scores Dice 1 when the model leaves it empty and 0
    when it marks any voxel (not the TransUNet rule, which rewards such false positives)."""
    from ...predictors import SegmentationPredictor
    from ...metrics import evaluate_labels

    was_training = model.training
    pred = SegmentationPredictor(model, class_names, norm, grid, device=device, precision="fp32",
                                 in_chans=in_chans)
    classes = {i: n for i, n in enumerate(class_names) if i}
    per_case = {}
    for ci, zs in items:
        c = cases[ci]
        labs = []
        for s in range(0, len(zs), batch_size):
            pred.set_image(c.image[zs[s:s + batch_size]], c.spacing[1:])
            labs.append(pred.predict()["labels"])
        out, ref = np.concatenate(labs), c.labels[zs]
        per_case[c.name] = evaluate_labels(out, ref, c.spacing, classes)
        for k, n in classes.items():
            # a class absent from the reference (a negative case: pelvis/thorax phantom): the
            # TransUNet convention of evaluate_labels scores a false positive 1 and an empty
            # prediction 0; validation scores what is right here: 1 when empty, else 0
            if not (ref == k).any():
                per_case[c.name][n]["dice"] = 0.0 if (out == k).any() else 1.0
    model.train(was_training)
    mean = {}
    for n in classes.values():
        vals = [m[n]["dice"] for m in per_case.values()]
        mean[n] = float(np.mean(vals)) if vals else float("nan")
    fg = [v for v in mean.values() if not math.isnan(v)]
    dice = float(np.mean(fg)) if fg else float("nan")
    return {"score": dice, "dice": dice, "mean_dice": mean, "per_case": per_case}


class SegmentationTask(SliceTask):
    """Per-pixel classes from one slice (``model(x) -> (B, K, S, S)`` logits)."""

    title = "segmentation"

    def build_model(self) -> ModelSpec:
        self.spec = build_registered_model(self.cfg, len(self.class_names))
        mcfg = self.spec.config
        self.in_chans = int(getattr(mcfg, "in_chans", 1))
        self.set_input(mcfg.img_size)
        self.loss_name = self.cfg.loss or ("bdou" if self.cfg.recipe == "paper" else "dice_ce")
        self.criterion = make_loss(self.loss_name).to(self.run.device)
        return self.spec

    def prepare(self, model, resuming: bool) -> None:
        """Fine-tuning: start from ``cfg.init``'s weights (same family and classes); not when resuming."""
        self.init_meta = None
        if resuming or not self.cfg.init:
            return
        ck = load_init_weights(model, self.cfg.init, self.spec.entry.family)
        if list(ck.class_names) == self.class_names and ck.postprocess:
            self._init_postprocess = dict(ck.postprocess)  # fine-tuning keeps the clean-up declared
        if list(ck.class_names) != self.class_names:
            self.run.log(f"note: init checkpoint classes {ck.class_names} != {self.class_names}")
        prov = ck.provenance if isinstance(getattr(ck, "provenance", None), dict) else {}
        self.init_meta = {"path": str(self.cfg.init), "git_commit": prov.get("git_commit"),
                          "steps": prov.get("steps"), "script": prov.get("script")}
        self.run.log(f"fine-tuning from {self.cfg.init}")

    def postprocess_block(self) -> dict | None:
        return getattr(self, "_init_postprocess", None)

    def data(self) -> TaskData:
        cfg = self.cfg
        cases, split = self.split_sources(cfg.holdout_slices)
        ds = self.slice_dataset(cases, split)
        self.cases, self.split = cases, split
        n_train = sum(len(z) for _, z in split.train)
        n_val = sum(len(z) for _, z in split.val)
        return TaskData(cases, split, ds, f"{len(ds)} train items ({n_train} slices), {n_val} val slices")

    def loss(self, net, batch):
        xb, yb = batch
        if self.in_chans != 1:
            xb = xb.expand(-1, self.in_chans, -1, -1)
        with self.run.autocast():
            logits = net(xb)
        return self.criterion(logits.float(), yb), {}

    def validate(self, model):
        if not self.split.val:
            return None
        return validate_slices(model, self.cases, self.split.val, self.class_names, self.norm, self.grid,
                               self.run.device, self.cfg.batch_size, self.in_chans)

    def provenance(self) -> dict:
        return {"loss": self.loss_name, "init": getattr(self, "init_meta", None),
                "hyperparameters": {"repeat": self.cfg.repeat}}
