"""Checkpoints: the project's own format, foreign ``.pth`` reading and load reports.

Own format: ``NAME.safetensors`` (weights) beside ``NAME.json`` (what to rebuild and how to feed it)::

    {"format": "napari-genseg-checkpoint", "version": 1,
     "model": "msa2net", "config_name": "msa2net_demo", "config": {...asdict(cfg)...},
     "class_names": ["background", "liver", "spleen"],
     "input": {"normalization": {"kind": "hu_window", "low": -125, "high": 275},
               "grid": "spacing" | "resize", "spacing_mm": [1.5, 1.5] | null},
     "body_region": "abdomen" | "thorax" | "head" | null,
     "postprocess": {"liver": {"single_component": true, "fill_holes": true, "side": "right"}, ...},
     "provenance": {...},
     "untrained": ["segmentor", ...]}          # only in files written by `genseg import --allow-partial`

``body_region`` is the anatomy the weights were trained on (the input check warns when a volume
does not show it); ``save_checkpoint`` derives it from the class names unless given, and files
without the key get the same derivation when loaded.

``postprocess`` declares the 3-D clean-up and plausibility checks per class name (see
:mod:`napari_genseg.postprocessing`; classes not named are never changed). ``save_checkpoint``
writes, unless given: the block of the file it overwrites (a retraining into the same path keeps a
hand-edited block, restricted to the classes that still exist), else the defaults for known organ
names (``postprocessing.default_postprocess``: liver right, spleen left, ...). A file without the
key declares nothing (no clean-up). A malformed block is refused at load (:class:`CheckpointError`).

Foreign ``.pth`` files are read only through ``torch.load(weights_only=True)``; their keys go
through the family's importer under the one key policy of :mod:`.key_mapping`. ``genseg import``
writes a checkpoint only when the load report is clean; with ``--allow-partial`` it writes it and
records the modules that kept random weights under ``"untrained"``, and every later load of that
file warns (:class:`UntrainedWeightsWarning`).

Shipped demo checkpoints (``msa2net_demo``, ``arseg_demo``) live in the repository's ``models/``;
the wheel carries copies in ``napari_genseg/models/shipped/`` (put there by ``setup.py``'s build
step), so a plain ``pip install`` has them (:func:`shipped_checkpoints_dir`).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import InputError
from . import registry
from .key_mapping import strip_prefixes

FORMAT = "napari-genseg-checkpoint"
VERSION = 1

__all__ = [
    "CheckpointError",
    "PartialImportError",
    "UntrainedWeightsWarning",
    "LoadReport",
    "Checkpoint",
    "strip_prefixes",
    "read_torch_state_dict",
    "load_state_dict_report",
    "untrained_modules",
    "save_checkpoint",
    "load_checkpoint",
    "resolve_model",
    "shipped_checkpoints_dir",
]


class CheckpointError(InputError, ValueError):
    """A checkpoint that cannot be used, with a one-line reason."""


class PartialImportError(CheckpointError):
    """An official checkpoint that does not fully fit the model (missing, unexpected or
    shape-mismatched keys): nothing was written. ``report`` holds the full :class:`LoadReport`."""

    def __init__(self, message: str, report: "LoadReport"):
        super().__init__(message)
        self.report = report


class UntrainedWeightsWarning(UserWarning):
    """A checkpoint written by ``genseg import --allow-partial``: some modules have random weights."""


@dataclass
class LoadReport:
    """What a load did with each key: loaded, remapped (official -> ours), missing (model keys the
    file lacks: they keep their initial, random values), unexpected (file keys the model lacks),
    shape_mismatch ((key, model shape, file shape)), plus the importer's notes."""

    loaded: list[str] = field(default_factory=list)
    remapped: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatch)

    def first_problem(self) -> str:
        """The first missing / unexpected / shape-mismatched key, as a short phrase ("" if none)."""
        if self.missing:
            return f"missing {self.missing[0]}"
        if self.unexpected:
            return f"unexpected {self.unexpected[0]}"
        if self.shape_mismatch:
            k, want, got = self.shape_mismatch[0]
            return f"{k}: model {tuple(want)}, checkpoint {tuple(got)}"
        return ""

    def summary(self) -> str:
        return (
            f"loaded {len(self.loaded)}, remapped {len(self.remapped)}, missing {len(self.missing)}, "
            f"unexpected {len(self.unexpected)}, shape mismatch {len(self.shape_mismatch)}"
        )

    def __str__(self) -> str:
        lines = [self.summary()]
        lines += [f"  note: {n}" for n in self.notes]
        for title, items in (("missing", self.missing), ("unexpected", self.unexpected)):
            for k in items[:20]:
                lines.append(f"  {title}: {k}")
            if len(items) > 20:
                lines.append(f"  ... {len(items) - 20} more {title}")
        for k, want, got in self.shape_mismatch[:20]:
            lines.append(f"  shape mismatch: {k} model {tuple(want)} checkpoint {tuple(got)}")
        return "\n".join(lines)


def read_torch_state_dict(path: str | os.PathLike, allow_namespace: bool = False) -> dict:
    """Read a foreign ``.pth`` safely (``weights_only=True``), unwrap common containers
    (``model``, ``state_dict``, ``model_state_dict``, ``net``) and strip wrapper prefixes
    (``module.``, ``_orig_mod.``). Raises :class:`CheckpointError` for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    safe = []
    if allow_namespace:
        import argparse

        safe.append(argparse.Namespace)
    try:
        with torch.serialization.safe_globals(safe):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncation, non-torch files
        raise CheckpointError(f"cannot read {path.name} as a PyTorch state dict: {exc}") from exc
    for key in ("model", "state_dict", "model_state_dict", "net"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path.name} does not hold a state dict of tensors")
    try:
        return strip_prefixes(obj)
    except ValueError as exc:  # two keys collapse onto one name
        raise CheckpointError(f"{path.name}: {exc}") from None


def load_state_dict_report(model: nn.Module, sd: dict, strict: bool = False) -> LoadReport:
    """Copy every key whose name and shape match; report the rest.

    Raises :class:`CheckpointError` (one line: the counts and the first offending key) when
    ``strict`` and the report is not clean; nothing is loaded then."""
    own = model.state_dict()
    report = LoadReport()
    to_load = {}
    for k, v in sd.items():
        if k not in own:
            report.unexpected.append(k)
        elif tuple(own[k].shape) != tuple(v.shape):
            report.shape_mismatch.append((k, tuple(own[k].shape), tuple(v.shape)))
        else:
            to_load[k] = v
            report.loaded.append(k)
    report.missing = [k for k in own if k not in sd]
    if strict and not report.ok:
        raise CheckpointError(f"checkpoint does not fit the model: {report.summary()} ({report.first_problem()})")
    model.load_state_dict(to_load, strict=False)
    return report


def untrained_modules(model: nn.Module, keys) -> list[str]:
    """The smallest description of which parts of ``model`` the state-dict ``keys`` cover:
    the top-most modules all of whose entries are in ``keys``, plus single keys of modules
    that are only partly covered. Sorted. Used to record which modules kept random weights.

    Example: every ``segmentor.*`` key and ``vq.post_quant_conv.bias`` -> ``["segmentor",
    "vq.post_quant_conv.bias"]``."""
    keys = set(keys)
    own = list(model.state_dict())
    per_module: dict[str, list[str]] = {}
    for k in own:
        parts = k.split(".")
        for i in range(1, len(parts)):
            per_module.setdefault(".".join(parts[:i]), []).append(k)
    fully = {m for m, ks in per_module.items() if all(k in keys for k in ks)}
    out = set()
    for k in keys:
        parts = k.split(".")
        top = next((".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in fully), None)
        out.add(top or k)
    return sorted(out)


@dataclass
class Checkpoint:
    """A loaded checkpoint: the built model plus what the engine needs to feed it."""

    model: nn.Module
    family: str
    config_name: str
    config: Any
    class_names: list[str]
    input: dict
    provenance: dict
    path: Path | None
    report: LoadReport
    #: modules left with random weights (``genseg import --allow-partial``); empty for a full checkpoint
    untrained: list[str] = field(default_factory=list)
    #: the anatomy the weights were trained on ("abdomen", "thorax", "head"; None = unknown)
    body_region: str | None = None
    #: per-class 3-D post-processing declarations (``postprocessing.py``; {} = none)
    postprocess: dict = field(default_factory=dict)

    @property
    def meta(self) -> dict:
        return {
            "model": self.family,
            "config_name": self.config_name,
            "class_names": self.class_names,
            "input": self.input,
            "body_region": self.body_region,
            "postprocess": dict(self.postprocess),
            "provenance": self.provenance,
            "path": str(self.path) if self.path else None,
            "untrained": list(self.untrained),
        }


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    from ..io.atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    family: str,
    config_name: str,
    config: Any,
    class_names: list[str],
    input: dict,
    provenance: dict | None = None,
    half: bool = False,
    untrained: list[str] | None = None,
    body_region: str | None = None,
    postprocess: dict | None = None,
) -> Path:
    """Write ``path`` (.safetensors) and its ``.json`` sidecar atomically. ``untrained`` names
    modules that kept random weights (recorded under ``"untrained"``; loading then warns).
    ``body_region``: the anatomy trained on (default: derived from ``class_names``, e.g.
    liver/spleen -> "abdomen"). ``postprocess``: per-class clean-up declarations (default: the
    block of the JSON being overwritten, for the classes still present, else the defaults of
    ``postprocessing.default_postprocess``). Raises :class:`CheckpointError` for a malformed
    ``postprocess``."""
    from ..checks.body_region import region_for_classes

    from safetensors.torch import save as st_save

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    sd = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        if half and v.is_floating_point():
            v = v.half()
        sd[k] = v
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": family,
        "config_name": config_name,
        "config": registry.config_to_dict(config),
        "class_names": list(class_names),
        "input": input,
        "body_region": body_region if body_region is not None else region_for_classes(class_names),
        "postprocess": _postprocess_block(path, class_names, postprocess),
        "provenance": provenance or {},
    }
    if untrained:
        meta["untrained"] = list(untrained)
    _atomic_write_bytes(path, st_save(sd, metadata={"format": FORMAT}))
    _atomic_write_bytes(path.with_suffix(".json"), json.dumps(meta, indent=2).encode())
    return path


def _postprocess_block(path: Path, class_names, given: dict | None) -> dict:
    """The ``postprocess`` block to write (see ``save_checkpoint``), validated."""
    from ..postprocessing import PostprocessSpecError, default_postprocess, parse_postprocess

    block = given
    if block is None:
        old = path.with_suffix(".json")
        try:
            prev = json.loads(old.read_text()).get("postprocess") if old.is_file() else None
        except (OSError, ValueError, AttributeError):
            prev = None
        if isinstance(prev, dict):
            block = {k: v for k, v in prev.items() if k in list(class_names)}
        else:
            block = default_postprocess(class_names)
    try:
        parse_postprocess(block, class_names)
    except PostprocessSpecError as exc:
        raise CheckpointError(f"{path.name}: {exc}") from None
    return json.loads(json.dumps(block))


def _read_meta(path: Path) -> dict:
    side = path.with_suffix(".json")
    if not side.is_file():
        raise CheckpointError(f"{path.name}: config file {side.name} is missing beside it")
    try:
        meta = json.loads(side.read_text())
    except Exception as exc:
        raise CheckpointError(f"{side.name} is not valid JSON: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{side.name} is not a napari-genseg checkpoint config")
    return meta


class _LazyCheckpoint(Checkpoint):
    """A :class:`Checkpoint` whose model is built and its weights loaded (strictly) on the first
    read of ``model`` or ``report``: a run on an exported model (ONNX Runtime, OpenVINO) whose
    export is already cached never builds the torch model (MSA²Net's imports timm: ~3 s)."""

    def __init__(self, build, **fields):
        self.__dict__["_build"] = build
        super().__init__(model=None, report=None, **fields)

    @property
    def model(self):
        if self.__dict__.get("_model") is None:
            if self.__dict__.get("_error") is not None:  # a failed build is not retried
                raise self.__dict__["_error"]
            try:
                self.__dict__["_model"], self.__dict__["_report"] = self._build()
            except CheckpointError as exc:
                self.__dict__["_error"] = exc
                raise
        return self.__dict__["_model"]

    @model.setter
    def model(self, value):
        self.__dict__["_model"] = value

    @property
    def report(self):
        self.model  # noqa: B018 -- the report comes with the load
        return self.__dict__["_report"]

    @report.setter
    def report(self, value):
        self.__dict__["_report"] = value

    @property
    def built(self) -> bool:
        """Whether the torch model exists yet."""
        return self.__dict__.get("_model") is not None

    def __repr__(self) -> str:  # never builds the model
        return (f"Checkpoint({self.family}/{self.config_name}, path={self.path}, "
                f"model={'built' if self.built else 'not built yet'})")


def _check_class_names(path: Path, family: str, cfg, names) -> None:
    """The JSON's ``class_names`` must fit the model's classes: exactly ``num_classes`` names for a
    segmentation model (it outputs every class); for an AR-Seg model (``kind == "arseg"``: classes
    are conditioning targets, one mask per run) background plus 1..``num_classes`` targets, each
    with its class embedding. Stage checkpoints that do not segment (MARSeg ``module`` other than
    "segmentation") are not checked. Raises :class:`CheckpointError` (one line) otherwise: a
    mismatch used to give unnamed labels, or targets without an embedding."""
    n = getattr(cfg, "num_classes", None)
    if not isinstance(n, int) or getattr(cfg, "module", "segmentation") != "segmentation":
        return
    side = path.with_suffix(".json").name
    if registry.get_family(family).kind == "arseg":
        if not 2 <= len(names) <= n + 1:
            raise CheckpointError(f"{side}: {len(names)} class names for an AR-Seg model with {n} target "
                                  f"classes (background + 1..{n} targets)")
    elif len(names) != n:
        raise CheckpointError(f"{side}: {len(names)} class names for a model with {n} classes")


def load_checkpoint(
    path: str | os.PathLike, expect_model: str | None = None, device: str | torch.device = "cpu",
    lazy: bool = False,
) -> Checkpoint:
    """Rebuild the model from the JSON config and load its weights (strict names and shapes).

    ``lazy=True``: the config and JSON are read and checked now, the model is built and its
    weights loaded on the first read of ``model`` or ``report`` (for runtimes that need only the
    cached export; ``export.cached_onnx`` builds it when it must export). The errors are the same,
    raised then.

    Raises :class:`CheckpointError` for a missing or unreadable file, a foreign config, a family
    other than ``expect_model`` or weights that do not fit. A file written by ``genseg import
    --allow-partial`` loads with an :class:`UntrainedWeightsWarning` naming its untrained modules."""
    path = Path(path)
    if path.suffix == ".json":
        path = path.with_suffix(".safetensors")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    meta = _read_meta(path)
    family = meta["model"]
    if expect_model is not None and family != expect_model:
        raise CheckpointError(
            f"{path.name} is a {family} checkpoint, not {expect_model}; choose the matching model"
        )
    try:
        cfg = registry.config_from_dict(family, meta["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path.name}: invalid {family} config: {exc}") from exc
    _check_class_names(path, family, cfg, meta.get("class_names", []))

    def build():
        from safetensors.torch import load_file

        try:
            model = registry.get_family(family).build(cfg)
        except (ValueError, TypeError) as exc:  # settings each valid alone that do not fit together
            raise CheckpointError(f"{path.with_suffix('.json').name}: its config does not build a {family} "
                                  f"model: {exc}") from None
        try:
            sd = load_file(str(path))
        except Exception as exc:
            raise CheckpointError(f"cannot read weights {path.name}: {exc}") from exc
        own = model.state_dict()
        sd = {k: (v.to(own[k].dtype) if k in own else v) for k, v in sd.items()}
        report = load_state_dict_report(model, sd, strict=True)
        return model.eval().to(device), report

    untrained = [str(m) for m in meta.get("untrained") or []]
    if untrained:
        warnings.warn(
            f"{path.name} was imported with --allow-partial: {', '.join(untrained[:6])}"
            f"{' ...' if len(untrained) > 6 else ''} kept random weights; its masks are not meaningful "
            f"until those modules are trained",
            UntrainedWeightsWarning, stacklevel=2,
        )
    from ..checks.body_region import region_for_classes
    from ..postprocessing import PostprocessSpecError, parse_postprocess

    postprocess = meta.get("postprocess") or {}
    try:
        parse_postprocess(postprocess, meta.get("class_names", []))
    except PostprocessSpecError as exc:
        raise CheckpointError(f"{path.with_suffix('.json').name}: {exc}") from None
    fields = dict(
        family=family,
        config_name=meta.get("config_name", family),
        config=cfg,
        class_names=list(meta.get("class_names", [])),
        input=meta.get("input", {}),
        provenance=meta.get("provenance", {}),
        path=path,
        untrained=untrained,
        body_region=meta.get("body_region", region_for_classes(meta.get("class_names", []))),
        postprocess=dict(postprocess),
    )
    if lazy:
        return _LazyCheckpoint(build, **fields)
    model, report = build()
    return Checkpoint(model=model, report=report, **fields)


#: where the wheel carries the demo checkpoints (copied from the repository's models/ at build time)
PACKAGED_DIR = Path(__file__).resolve().parent / "shipped"


def shipped_checkpoints_dir() -> Path:
    """Where the demo checkpoints are read from, first match wins: ``GENSEG_MODELS_DIR``; the
    installed package's ``napari_genseg/models/shipped/`` (a wheel install); the repository's
    ``models/`` (a checkout or editable install: src/napari_genseg/models -> repo root)."""
    env = os.environ.get("GENSEG_MODELS_DIR")
    if env:
        return Path(env)
    if PACKAGED_DIR.is_dir():
        return PACKAGED_DIR
    return Path(__file__).resolve().parents[3] / "models"


def shipped_checkpoint(family: str) -> Path | None:
    p = shipped_checkpoints_dir() / f"{family}_demo.safetensors"
    return p if p.is_file() else None


#: stage of a training module that does not segment (``config.module``: MARSeg stages 0 and 1)
_NON_SEGMENTING = {"autoencoder": 0, "pretrain": 1}


def require_segmentation_model(ck: Checkpoint) -> Checkpoint:
    """``ck`` itself when its model segments; ``CheckpointError`` (one line) for the checkpoint of
    a training stage that does not (MARSeg stage 0 KL autoencoder, stage 1 MAR pre-training)."""
    module = getattr(ck.config, "module", "segmentation")
    if module in _NON_SEGMENTING:
        name = ck.path.name if ck.path else "this checkpoint"
        raise CheckpointError(
            f"{name} is a MARSeg stage-{_NON_SEGMENTING[module]} ({module}) checkpoint, not a segmentation "
            f"model; fine-tune it first: genseg train --model {ck.config_name} --stage 2 --init FILE")
    return ck


def resolve_model(
    name: str, checkpoint: str | os.PathLike | None = None, device="cpu", lazy: bool = False
) -> Checkpoint:
    """``name`` = family or config name. With ``checkpoint`` load that file (it must be of the
    same family and segment: see ``require_segmentation_model``); a bare family name loads its
    shipped demo checkpoint when one exists; a config name without checkpoint is refused
    (untrained weights would give meaningless masks). ``lazy``: as ``load_checkpoint``'s."""
    if checkpoint is not None:
        entry = registry.get_entry(name)
        return require_segmentation_model(load_checkpoint(checkpoint, expect_model=entry.family, device=device,
                                                          lazy=lazy))
    if name in {f.name for f in registry.list_families()}:
        ck = shipped_checkpoint(name)
        if ck is not None:
            return load_checkpoint(ck, expect_model=name, device=device, lazy=lazy)
        raise CheckpointError(
            f"model {name!r} has no shipped demo checkpoint; pass --checkpoint FILE "
            f"(see `genseg models`)"
        )
    registry.get_entry(name)  # raises for unknown names
    raise CheckpointError(
        f"config {name!r} needs trained weights: pass a checkpoint (own format or imported with "
        f"`genseg import`)"
    )


#: how the official code of each family feeds its model (used for imported checkpoints)
OFFICIAL_INPUTS = {
    # TransUNet lineage: HU clip [-125, 275] -> [0, 1], then (x - 0.5) / 0.5 in the MSA²Net code
    "msa2net": {"normalization": {"kind": "hu_window", "low": -125.0, "high": 275.0,
                                  "out_min": -1.0, "out_max": 1.0}, "grid": "resize"},
    # SAM / MedSAM: per-image min-max to [0, 1]
    "arseg": {"normalization": {"kind": "minmax"}, "grid": "resize"},
    # MARSeg: 3 identical channels in [-1, 1] after an organ-specific HU window whose values are
    # not published; the abdominal soft-tissue window [-125, 275] is used (the engine repeats the
    # slice to the config's in_chans = 3)
    "marseg": {"normalization": {"kind": "hu_window", "low": -125.0, "high": 275.0,
                                 "out_min": -1.0, "out_max": 1.0}, "grid": "resize"},
}


def import_official_checkpoint(
    family: str,
    src: str | os.PathLike,
    out: str | os.PathLike,
    class_names: list[str] | None = None,
    input: dict | None = None,
    allow_partial: bool = False,
) -> tuple[Path, LoadReport]:
    """Read an official ``.pth`` (weights_only), map its keys with the family's importer, build
    the matching configuration, load with a report and save in the project format.

    Writes only when the report is clean; otherwise raises :class:`PartialImportError` (with the
    report) and writes nothing. With ``allow_partial`` it writes anyway and records the modules
    that kept random weights under ``"untrained"`` in the JSON (see :func:`untrained_modules`).
    Raises :class:`CheckpointError` for an unreadable or foreign file or wrong class names."""
    import dataclasses

    fam = registry.get_family(family)
    if fam.import_official is None:
        raise CheckpointError(f"{family} has no official-checkpoint importer")
    sd = read_torch_state_dict(src, allow_namespace=(family == "marseg"))
    try:
        overrides, mapped, notes = fam.import_official(sd)
    except CheckpointError as exc:
        raise CheckpointError(f"{Path(src).name}: {exc}") from exc
    input = input or OFFICIAL_INPUTS.get(family)
    entry = registry.get_entry(family)
    try:  # the config read off the file's tensor shapes is validated in __post_init__
        cfg = dataclasses.replace(entry.config, **overrides)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{Path(src).name}: its tensor shapes describe no valid {family} model: {exc}") from exc
    n = getattr(cfg, "num_classes", 0)
    names = list(class_names) if class_names else [f"class{i}" for i in range(n)]
    if n and len(names) != n:
        raise CheckpointError(f"{len(names)} class names given for a {n}-class checkpoint")
    model = fam.build(cfg)
    report = load_state_dict_report(model, mapped)
    report.notes += list(notes)
    untrained: list[str] = []
    if not report.ok:
        if not allow_partial:
            raise PartialImportError(
                f"{Path(src).name} does not fully fit {family} ({report.summary()}); nothing written "
                f"(--allow-partial writes it with the untrained modules recorded)", report)
        untrained = untrained_modules(model, report.missing + [k for k, _, _ in report.shape_mismatch])
    path = save_checkpoint(
        out, model, family, f"{entry.name}_imported", cfg, names,
        input or {"normalization": {"kind": "hu_window", "low": -125.0, "high": 275.0}, "grid": "resize"},
        provenance={"imported_from": str(Path(src).name), "report": report.summary(), "notes": notes,
                    "unexpected_ignored": report.unexpected[:50]},
        untrained=untrained,
    )
    return path, report


def peek_class_names(name: str, checkpoint: str | os.PathLike | None = None) -> list[str]:
    """Class names of the checkpoint ``resolve_model`` would load, from its JSON only (cheap)."""
    path = Path(checkpoint) if checkpoint else None
    if path is None and name in {f.name for f in registry.list_families()}:
        path = shipped_checkpoint(name)
    if path is None:
        return []
    try:
        return list(_read_meta(path.with_suffix(".safetensors")).get("class_names", []))
    except CheckpointError:
        return []
