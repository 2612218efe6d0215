"""The options of a training run (``TrainConfig``) and where its resumable state lives.

A family's task may extend ``TrainConfig`` with options of its own (``tasks.arseg.ArSegTrainConfig``:
stage, init checkpoint, item sampling); ``genseg train`` flags and config files (YAML/JSON) fill the
same fields. Unknown options raise ``ValueError`` naming them (never silently dropped).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError

__all__ = ["TrainConfig", "train_state_path", "DEFAULT_CLASSES"]

#: class names of the default segmentation run (label ids 0..2)
DEFAULT_CLASSES = ("background", "liver", "spleen")


class TrainOptionError(InputError, ValueError):
    """A training option (flag, config file entry or value) that cannot be used (one line)."""


@dataclass
class TrainConfig:
    """Options shared by every family's training (see ``genseg train --help`` for each flag).

    Units: ``spacing_mm`` / ``phantom_spacing`` in mm ((z, y, x) for the phantom), minutes for the
    time limits. ``steps`` counts optimiser steps over all ranks together (one step = one batch per
    rank).
    """

    model: str = "msa2net_demo"
    data: list = field(default_factory=lambda: ["phantom:8"])
    label_map: str | None = None
    classes: list = field(default_factory=lambda: list(DEFAULT_CLASSES))
    recipe: str = "adamw"  # "paper" | "adamw"
    loss: str | None = None  # segmentation: default by recipe (paper -> bdou, adamw -> dice_ce)
    schedule: str | None = None  # adamw: "cosine" | "poly" | "constant"; paper: poly
    epochs: int | None = None
    steps: int | None = None  # total optimizer steps (wins over epochs)
    batch_size: int = 8
    lr: float | None = None  # default by recipe
    weight_decay: float | None = None
    warmup_steps: int = 0
    #: clip the gradient norm (None = no clipping); non-finite steps are always skipped
    grad_clip: float | None = None
    val_fraction: float = 0.2
    holdout_slices: str | None = "auto"  # single-case sources: "a:b" | "auto" | "none"
    holdout_gap: int = 2
    holdout_size: int = 8
    repeat: dict = field(default_factory=dict)  # data spec -> oversampling factor of its train slices
    grid: str = "spacing"  # "spacing" | "resize"
    spacing_mm: float | None = None  # in-plane target spacing (grid "spacing"); default 384 mm / img_size
    img_size: int | None = None  # default: the model config's
    normalization: dict = field(default_factory=lambda: {"kind": "hu_window", "low": -125.0, "high": 275.0})
    augment: dict = field(default_factory=dict)  # Augment fields; {"off": true} disables
    phantom_shape: list = field(default_factory=lambda: [40, 160, 160])
    phantom_spacing: list = field(default_factory=lambda: [3.0, 2.2, 2.2])
    out: str = "checkpoints/model.safetensors"
    resume: str | None = None
    #: start from the weights of this checkpoint (fine-tuning; same family and class count);
    #: AR-Seg stage 2 reads its stage-1 VQ from it. Ignored when resuming.
    init: str | None = None
    device: str = "auto"
    precision: str = "auto"  # auto | fp32 | fp16 | bf16 (device.resolve_precision)
    seed: int = 0
    workers: int = 0
    val_every: int = 0  # steps; 0 = once per epoch (and at the end)
    save_every: int = 0  # steps; 0 = at every validation
    half: bool = False  # save fp16 weights (the .train.pt then keeps fp32 weights for an exact resume)
    threads: int | None = None
    max_minutes: float | None = None  # stop early (cleanly, saving) after this wall time
    #: train for this many minutes of wall time: the lr schedule runs on the elapsed-time fraction
    #: (robust to a shared, variably loaded machine); ``steps`` (if set) is then only a cap
    time_budget_minutes: float | None = None
    quiet: bool = False
    model_overrides: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Options from a mapping (``-`` or ``_`` in names); raises ``ValueError`` for unknown names."""
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k.replace("-", "_"): v for k, v in d.items()}
        unknown = set(d) - names
        if unknown:
            raise TrainOptionError(f"unknown training option(s): {', '.join(sorted(unknown))}")
        if isinstance(d.get("data"), str):
            d["data"] = [d["data"]]
        if isinstance(d.get("classes"), str):
            d["classes"] = [c for c in d["classes"].replace(",", " ").split() if c]
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def train_state_path(ckpt: str | os.PathLike) -> Path:
    """``NAME.train.pt`` beside the checkpoint ``NAME.safetensors`` (or ``NAME.json``)."""
    p = Path(ckpt)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".train.pt")
