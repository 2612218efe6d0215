"""The contract between the one training loop (``training/loop.py``) and a model family.

A ``Task`` is everything a family adds to a training run; the loop does the rest (device and
precision, DDP, data loader and its exact-resume sampler, optimiser recipe and schedule, time
budget, resume, checkpoint + provenance, progress, timed validation). In the order the loop asks:

1. ``build_model()`` -> ``ModelSpec`` (the registered config with the run's overrides),
   ``class_names`` and ``input_meta()`` (what the checkpoint JSON records for inference);
2. ``data()`` -> ``TaskData``: cases, split, the training dataset (items are tuples of tensors;
   ``set_epoch(epoch)`` re-draws its augmentation), a one-line description;
3. ``prepare(model, resuming)`` (e.g. load and freeze a previous stage), ``trainable_parameters``,
   ``train_mode`` (model.train() plus frozen parts in eval), ``objective(model)`` (the module DDP
   wraps);
4. ``loss(net, batch)`` -> (scalar loss, named float parts for the log), once per step;
5. ``validate(model)`` -> metrics with a ``"score"`` (higher is better: the best step is tracked
   on it) or None without validation data; only rank 0 validates;
6. ``provenance()`` extras, ``state_dict()`` / ``load_state_dict()`` for the train-state file.
   The provenance's ``trainer`` is the task's module.

Tasks are registered per family kind (``models.registry`` ``FamilyEntry.kind``) in
``training.tasks``; a new family adds a task, never a loop.
"""

from __future__ import annotations

import abc
import dataclasses
import sys
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ...device import autocast_context
from ...errors import one_line
from ...preprocessing import Normalization, SliceGrid
from ..config import TrainConfig
from ..data import Case, Split, load_sources, make_split
from ..distributed import Dist

__all__ = ["Task", "SliceTask", "RunContext", "TaskData", "ModelSpec", "build_registered_model"]


@dataclass
class RunContext:
    """What a task may know about the run it is part of."""

    device: torch.device
    precision: str  # "fp32" | "bf16" | "fp16" (device.resolve_precision)
    dist: Dist
    quiet: bool = False

    def autocast(self):
        """``torch.autocast`` for the run's precision on its device (a null context for fp32)."""
        return autocast_context(self.device, self.precision)

    def log(self, msg: str) -> None:
        """A line on stderr, from rank 0 only, unless quiet."""
        if self.dist.main and not self.quiet:
            print(msg, file=sys.stderr, flush=True)


@dataclass
class ModelSpec:
    """A built model with its registry entry (family, config name) and its config dataclass."""

    model: nn.Module
    entry: Any  # models.registry.ModelEntry
    config: Any


@dataclass
class TaskData:
    """A task's training data: all cases, their split, the training dataset, a log line."""

    cases: list[Case]
    split: Split
    train: torch.utils.data.Dataset
    description: str


def build_registered_model(cfg: TrainConfig, num_classes: int) -> ModelSpec:
    """``cfg.model`` from the registry with ``model_overrides``, ``num_classes`` and ``img_size``."""
    from ...models import registry

    entry = registry.get_entry(cfg.model)
    overrides = dict(cfg.model_overrides)
    overrides["num_classes"] = num_classes
    if cfg.img_size:
        overrides["img_size"] = int(cfg.img_size)
    config = dataclasses.replace(entry.config, **overrides)
    return ModelSpec(registry.get_family(entry.family).build(config), entry, config)


def load_init_weights(model: nn.Module, path, family: str):
    """Load the weights of the checkpoint at ``path`` into ``model`` (as fp32; fine-tuning or a
    previous stage). Raises ``CheckpointError`` (an InputError) for a missing file, another family,
    or parameters whose names or shapes differ (e.g. another class count). -> the loaded checkpoint."""
    from ...models.checkpoints import CheckpointError, load_checkpoint

    ck = load_checkpoint(path, expect_model=family)
    sd = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in ck.model.state_dict().items()}
    try:
        model.load_state_dict(sd)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: its weights do not fit this model ({one_line(exc)})") from None
    return ck


class Task(abc.ABC):
    """One family's part of a training run (see the module docstring for the order of calls)."""

    #: how messages name this kind of training ("segmentation", "AR-Seg")
    title: ClassVar[str]
    #: the options dataclass (``TrainConfig`` or a subclass with the task's own fields)
    config_cls: ClassVar[type[TrainConfig]] = TrainConfig

    def __init__(self, cfg: TrainConfig, run: RunContext):
        self.cfg, self.run = cfg, run
        self.class_names = list(cfg.classes)

    # ---- model
    @abc.abstractmethod
    def build_model(self) -> ModelSpec:
        """Build the model (on the CPU, randomly initialised)."""

    @abc.abstractmethod
    def input_meta(self) -> dict:
        """The checkpoint's ``input`` entry (normalisation, grid) for inference."""

    def prepare(self, model: nn.Module, resuming: bool) -> None:
        """Before the optimiser exists: load what the task starts from (not when resuming)."""

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Parameters the optimiser updates; the loop freezes every other one."""
        return list(model.parameters())

    def train_mode(self, model: nn.Module) -> None:
        """Training mode (frozen parts may stay in eval mode)."""
        model.train()

    def objective(self, model: nn.Module) -> nn.Module:
        """The module that ``loss`` calls and DDP wraps (default: the model)."""
        return model

    # ---- data, loss, validation
    @abc.abstractmethod
    def data(self) -> TaskData:
        """Load the cases, split them, build the training dataset."""

    @abc.abstractmethod
    def loss(self, net: nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict[str, float]]:
        """One batch (tensors on the run's device) -> (fp32 scalar loss, named parts for the log)."""

    @abc.abstractmethod
    def validate(self, model: nn.Module) -> dict | None:
        """Metrics on the validation split with a float ``"score"`` (higher is better); None if no split."""

    # ---- provenance and resumable state
    def postprocess_block(self) -> dict | None:
        """The checkpoint's per-class post-processing declarations (None: ``save_checkpoint``'s
        default, i.e. the block of the file it overwrites or the organ defaults)."""
        return None

    def provenance(self) -> dict:
        """Extra checkpoint provenance; a ``"hyperparameters"`` mapping is merged into the loop's."""
        return {}

    def state_dict(self) -> dict:
        """Entries of the train-state file (tensors and plain types only)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Read back ``state_dict`` entries on resume; raise ``ValueError`` for an incompatible run."""


class SliceTask(Task):
    """A task whose model sees single slices on a ``SliceGrid`` after a ``Normalization`` (the
    engine's inference path): the checkpoint's ``input`` records both."""

    def slice_dataset(self, cases, split) -> "D.SliceDataset":
        """The training slices of ``split`` on the task's grid, augmented (``cfg.augment``) and
        oversampled per data spec or case kind (``cfg.repeat``). Raises DataSpecError when empty."""
        from .. import data as D

        cfg = self.cfg
        repeats = {}
        for ci, c in enumerate(cases):
            r = cfg.repeat.get(c.source, cfg.repeat.get(c.kind))
            if r:
                repeats[ci] = int(r)
        ds = D.SliceDataset(cases, split.train, self.grid, self.norm, D.Augment.from_options(cfg.augment), repeats,
                            seed=cfg.seed)
        if len(ds) == 0:
            raise D.DataSpecError("no training slices")
        return ds

    def set_input(self, img_size: int) -> None:
        """``norm`` from ``cfg.normalization``; ``grid`` of ``img_size`` in ``cfg.grid`` mode."""
        self.norm = Normalization.from_dict(self.cfg.normalization)
        self.grid = SliceGrid.create(int(img_size), self.cfg.grid, self.cfg.spacing_mm)

    def input_meta(self) -> dict:
        return {"normalization": self.norm.to_dict(), **self.grid.to_meta()}

    def split_sources(self, holdout, unlabelled_ok: bool = False, **kw) -> tuple[list[Case], Split]:
        """``cfg.data`` as cases (``data.load_sources``; ``kw`` e.g. ``phantom_annotators``), split by
        case with ``holdout`` for single-case sources (``data.make_split``). Unlabelled ``image:``
        sources raise ``DataSpecError`` unless ``unlabelled_ok`` (a task that needs no labels)."""
        from ..data import DataSpecError

        cfg = self.cfg
        sources = load_sources(cfg.data, cfg.label_map, self.class_names, tuple(cfg.phantom_shape),
                               tuple(cfg.phantom_spacing), **kw)
        if not unlabelled_ok:
            for src in sources:
                if any(c.kind == "image" for c in src):
                    raise DataSpecError(f"{src[0].source}: an unlabelled image cannot train {self.title} "
                                        f"(it needs labels)")
        return make_split(sources, cfg.val_fraction, cfg.seed, holdout, cfg.holdout_gap, cfg.holdout_size)
