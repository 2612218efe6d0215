"""Training tasks: what each model family adds to the one training loop (see ``base.Task``).

``TASKS`` maps a family's kind (``models.registry`` ``FamilyEntry.kind``) to its task class:
``segmentation`` (MSA²Net and any per-pixel classifier), ``arseg`` (AR-Seg stages 1 and 2) and
``marseg`` (MARSeg stages 0, 1 and 2).
A new family registers its task here (``register_task``), never a copy of the loop.
"""

from __future__ import annotations

import dataclasses

from ..config import TrainConfig, TrainOptionError

from .arseg import ArSegTask, ArSegTrainConfig
from .base import ModelSpec, RunContext, Task, TaskData
from .marseg import MarSegTask, MarSegTrainConfig
from .segmentation import SegmentationTask

__all__ = ["TASKS", "register_task", "task_for", "config_from_dict", "Task", "RunContext", "TaskData",
           "ModelSpec", "ArSegTrainConfig", "MarSegTrainConfig"]

#: family kind -> task class
TASKS: dict[str, type[Task]] = {}


def register_task(kind: str, task: type[Task]) -> None:
    """Train families of ``kind`` with ``task``; raises ``ValueError`` for a kind registered twice."""
    if kind in TASKS:
        raise ValueError(f"a training task for {kind!r} models is already registered")
    TASKS[kind] = task


register_task("segmentation", SegmentationTask)
register_task("arseg", ArSegTask)
register_task("marseg", MarSegTask)


def task_for(model: str) -> type[Task]:
    """The task that trains the registered config ``model``. Raises ``TrainOptionError`` for an unknown
    config name or a family without a training task."""
    from ...models import registry

    try:
        kind = registry.get_family(registry.get_entry(model).family).kind
    except KeyError as exc:
        raise TrainOptionError(str(exc).strip("'\"")) from None
    if kind not in TASKS:
        raise TrainOptionError(f"{model}: {kind} models have no training task")
    return TASKS[kind]


def config_from_dict(d: dict) -> TrainConfig:
    """Options -> the config class of the task of ``d["model"]`` (default ``TrainConfig.model``).

    Raises ``ValueError`` for unknown options, naming the tasks whose config has them.
    """
    model = d.get("model") or TrainConfig.model
    cls = task_for(model).config_cls
    names = {f.name for f in dataclasses.fields(cls)}
    foreign = sorted(k for k in (k_.replace("-", "_") for k_ in d) if k not in names)
    owners = sorted({t.title for t in TASKS.values() if foreign and set(foreign) <= {
        f.name for f in dataclasses.fields(t.config_cls)}})
    if foreign and owners:
        raise TrainOptionError(f"{', '.join(foreign)}: not an option for {model}; it is for {' / '.join(owners)} models")
    return cls.from_dict(d)
