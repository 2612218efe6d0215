"""Model registry: a plain dict of named configurations, filled by explicit imports.

A *family* (``msa2net``, ``marseg``, ``arseg``) owns a config dataclass and a builder.
A *config name* (``msa2net_paper``, ``msa2net_demo`` ...) is one registered instance of that
family's config. A family name resolves to its shipped demo checkpoint when one exists (see
``napari_genseg.models.checkpoints.resolve_model``), otherwise to its default config.

Configs are flat dataclasses whose fields are JSON-able; ``config_to_dict`` / ``config_from_dict``
round-trip them so every checkpoint rebuilds the architecture it was saved from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.nn as nn

from ..errors import InputError

__all__ = [
    "UnknownModelError",
    "ModelEntry",
    "FamilyEntry",
    "register_family",
    "register_config",
    "get_entry",
    "get_family",
    "list_configs",
    "list_families",
    "create_model",
    "config_to_dict",
    "config_from_dict",
    "count_parameters",
]


class UnknownModelError(InputError, KeyError):
    """A model, family or config name that is not registered (a user's option: ``--model``, the
    dock's model box, a checkpoint JSON's ``model``). A ``KeyError`` whose ``str`` is the plain
    one-line message (no quotes)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class FamilyEntry:
    name: str
    config_cls: type
    build: Callable[[Any], nn.Module]
    default_config: str
    description: str = ""
    #: ``state_dict -> (config_overrides, state_dict, notes)``: maps an official checkpoint's keys
    #: onto ours (pure function; no I/O).
    import_official: Callable[[dict], tuple[dict, dict, list[str]]] | None = None
    #: "segmentation" (forward -> logits), "arseg" (two-stage training) or "marseg" (stages 0-2):
    #: the training task (``training.tasks.TASKS``); which predictor serves
    #: the family is napari_genseg.predictors.PREDICTORS' business, not this field's
    kind: str = "segmentation"


@dataclass(frozen=True)
class ModelEntry:
    family: str
    name: str
    config: Any
    description: str = ""
    paper: bool = False
    #: expected parameter count (for the table and tests), when known from the paper/spec
    expected_params: int | None = None
    extra: dict = field(default_factory=dict)


_FAMILIES: dict[str, FamilyEntry] = {}
_CONFIGS: dict[str, ModelEntry] = {}
_LOADED = False


def register_family(
    name: str,
    config_cls: type,
    build: Callable[[Any], nn.Module],
    default_config: str,
    description: str = "",
    import_official=None,
    kind: str = "segmentation",
) -> FamilyEntry:
    if name in _FAMILIES:
        raise ValueError(f"model family {name!r} is already registered")
    entry = FamilyEntry(name, config_cls, build, default_config, description, import_official, kind)
    _FAMILIES[name] = entry
    return entry


def register_config(
    family: str,
    name: str,
    config: Any,
    description: str = "",
    paper: bool = False,
    expected_params: int | None = None,
) -> ModelEntry:
    if family not in _FAMILIES:
        raise ValueError(f"unknown model family {family!r}; register it first")
    if name in _CONFIGS or name in _FAMILIES and name != family:
        raise ValueError(f"model config {name!r} is already registered")
    if not isinstance(config, _FAMILIES[family].config_cls):
        raise TypeError(f"config for {name!r} must be a {_FAMILIES[family].config_cls.__name__}")
    entry = ModelEntry(family, name, config, description, paper, expected_params)
    _CONFIGS[name] = entry
    return entry


def _ensure_loaded() -> None:
    """Import the model packages (explicit imports fill the registry)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import importlib

    for mod in ("msa2net", "arseg", "marseg"):
        try:
            importlib.import_module(f"napari_genseg.models.{mod}")
        except ModuleNotFoundError as exc:  # a family not implemented yet
            if exc.name != f"napari_genseg.models.{mod}":
                raise


def list_families() -> list[FamilyEntry]:
    _ensure_loaded()
    return list(_FAMILIES.values())


def list_configs(family: str | None = None) -> list[ModelEntry]:
    _ensure_loaded()
    return [e for e in _CONFIGS.values() if family is None or e.family == family]


def get_family(name: str) -> FamilyEntry:
    """The registered family ``name``; raises :class:`UnknownModelError` (a KeyError) otherwise."""
    _ensure_loaded()
    try:
        return _FAMILIES[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; known: {', '.join(sorted(_FAMILIES)) or '(none)'}"
        ) from None


def get_entry(name: str) -> ModelEntry:
    """A config name, or a family name (its default config); raises :class:`UnknownModelError`
    (a KeyError) for anything else."""
    _ensure_loaded()
    if name in _CONFIGS:
        return _CONFIGS[name]
    if name in _FAMILIES:
        return _CONFIGS[_FAMILIES[name].default_config]
    known = sorted(set(_CONFIGS) | set(_FAMILIES))
    raise UnknownModelError(f"unknown model or config {name!r}; known: {', '.join(known) or '(none)'}")


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(family: str, data: dict) -> Any:
    cls = get_family(family).config_cls
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{family} config has unknown fields: {', '.join(sorted(unknown))}")
    return cls(**data)


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered configuration (``overrides`` replace config fields)."""
    entry = get_entry(name)
    cfg = dataclasses.replace(entry.config, **overrides) if overrides else entry.config
    return get_family(entry.family).build(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
