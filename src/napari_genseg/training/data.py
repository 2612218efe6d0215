"""Training data: labelled volumes, patient-level splits and 2-D slice sampling with augmentation.

Sources (``parse_data_spec``):

* ``phantom:N`` / ``phantom:N@S`` / ``phantom:N@S/REGION``: N synthetic phantoms with seeds S..S+N-1
  (S = 0 by default) of the abdomen (default), ``pelvis`` or ``thorax`` (negatives: no liver/spleen);
  phantom labels are mapped onto the class names by name (``liver_lesion`` -> ``liver``).
* ``msd:DIR``: a Medical Segmentation Decathlon folder (``dataset.json`` with a ``training`` list,
  ``imagesTr/``, ``labelsTr/``); without ``dataset.json`` image/label files are paired by name.
* ``pairs:IMG,LBL[;IMG,LBL...]``: explicit NIfTI (or DICOM-folder) image/label pairs.
* ``image:IMG[!A:B[,C:D...]]``: one volume without labels (kind ``image``; only for tasks that
  need no labels, e.g. MARSeg stages 0-1), without its slices A..B-1 (and C..D-1 ...): e.g. the
  part of a longer scan that is also a labelled file whose hold-out must stay unseen.

NIfTI labels are mapped with a label map (``"5:1,1:2"`` = source id 5 -> class 1, 1 -> 2, every
other id -> background); without one the ids are kept (ids >= K become background).

Splits (``make_split``) are by case (deterministic seed) so no patient lands on both sides; a
source with a single case can instead hold out a contiguous block of slices with a gap of unused
slices on each side (``holdout="auto"`` = a centred block of 8 with a 2-slice gap).

Slices (``SliceDataset``) are brought onto the model grid with the same ``SliceGrid`` the engine
uses at inference, then augmented on that grid in torch: intensity (HU scale/shift, noise, gamma),
scale, rotation, elastic, and optional anterior-posterior flip. A left-right flip is never done:
the liver is on the patient's right and a model must learn that.

A data spec, label map or hold-out block that cannot be used raises :class:`DataSpecError` (an
``InputError``: one line, exit 2 in the CLI); :func:`check_data_specs` checks specs and their
files before any model is built.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..preprocessing import Normalization, SliceGrid, as_float_hu
from ..run_record import slice_ranges
from ..volume import Volume
from .config import DEFAULT_CLASSES

__all__ = [
    "Case",
    "parse_label_map",
    "apply_label_map",
    "parse_data_spec",
    "load_sources",
    "phantom_cases",
    "nifti_cases",
    "msd_pairs",
    "image_cases",
    "Split",
    "make_split",
    "slice_block_holdout",
    "Augment",
    "SliceDataset",
    "DEFAULT_CLASSES",
]

# ----------------------------------------------------------------------------- cases
class DataSpecError(InputError, ValueError):
    """A data spec, label map or hold-out choice that cannot be used (one-line message)."""


@dataclass
class Case:
    """One labelled volume: the CT as the project's ``Volume`` and its labels on the same voxels.

    ``volume`` carries the geometry (``data`` (z, y, x) HU, ``spacing`` (sz, sy, sx) mm, origin,
    source affine); nothing here re-derives it. ``labels`` are (z, y, x) uint8 class ids already
    mapped to the training classes. ``annotations``: per-class masks of several annotators where a
    source has them (class name -> (A, z, y, x) bool; the phantoms' ``liver_lesion``).
    Raises ``ValueError`` when labels or annotations do not match the volume's shape.
    """

    name: str
    volume: Volume
    labels: np.ndarray
    source: str  # the data spec it came from
    kind: str = "nifti"  # "nifti" | "phantom" | "image" (unlabelled: labels are all 0)
    meta: dict = field(default_factory=dict)
    annotations: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.labels.shape != self.volume.shape:
            raise ValueError(f"{self.name}: labels {self.labels.shape} do not match the image {self.volume.shape}")
        for k, a in self.annotations.items():
            if a.ndim != 4 or a.shape[1:] != self.volume.shape:
                raise ValueError(f"{self.name}: {k} annotations {a.shape} are not (A, *{self.volume.shape})")

    @property
    def image(self) -> np.ndarray:
        """(z, y, x) HU voxels of ``volume``."""
        return self.volume.data

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(sz, sy, sx) mm of ``volume``."""
        return self.volume.spacing

    @property
    def n_slices(self) -> int:
        return int(self.volume.shape[0])


def parse_label_map(spec) -> dict[int, int] | None:
    """"5:1,1:2" (or a dict) -> {5: 1, 1: 2}; None/"" -> None."""
    if spec is None or spec == "" or spec == {}:
        return None
    if isinstance(spec, dict):
        return {int(k): int(v) for k, v in spec.items()}
    out = {}
    for part in str(spec).replace(" ", "").split(","):
        if not part:
            continue
        a, _, b = part.partition(":")
        try:
            out[int(a)] = int(b)
        except ValueError:
            raise DataSpecError(f"label map entry {part!r} is not SRC:DST (integers)") from None
    return out


def apply_label_map(labels: np.ndarray, mapping: dict[int, int] | None, num_classes: int) -> np.ndarray:
    """Source label ids -> class ids (uint8). Float ids are checked like label files (rounded
    within 1e-3, else VolumeReadError), never truncated."""
    from ..io.labels import integer_label_ids

    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        labels = integer_label_ids(labels)
    if mapping is None:
        out = labels.astype(np.int64)
        out[(out < 0) | (out >= num_classes)] = 0
        return out.astype(np.uint8)
    lut = np.zeros(int(max(labels.max(initial=0), max(mapping, default=0))) + 1, np.uint8)
    for src, dst in mapping.items():
        if not 0 <= dst < num_classes:
            raise DataSpecError(f"label map target {dst} outside 0..{num_classes - 1}")
        if src >= 0:
            lut[src] = dst
    return lut[np.clip(labels, 0, None).astype(np.int64)]


def phantom_label_map(class_names) -> dict[int, int]:
    """Phantom label id -> class index, by name, over every region's classes (``TORSO_CLASSES``,
    whose first ids are the abdomen's ``PHANTOM_CLASSES``); names not trained map to background."""
    from ..phantom import PHANTOM_CLASSES
    from ..phantom_regions import TORSO_CLASSES

    names = list(class_names)
    out = {}
    for i, n in enumerate(TORSO_CLASSES):
        if n in names and i:
            out[i] = names.index(n)
    if "liver" in names and "liver_lesion" not in names:
        out[PHANTOM_CLASSES.index("liver_lesion")] = names.index("liver")
    return out


def phantom_cases(n: int, seed0: int = 0, class_names=DEFAULT_CLASSES, shape=(40, 160, 160),
                  spacing=(3.0, 2.2, 2.2), source: str | None = None, n_annotators: int | None = None,
                  region: str = "abdomen") -> list[Case]:
    """N synthetic phantoms (seeds ``seed0``..) with labels mapped by name (``phantom_label_map``).

    ``n_annotators`` (default: ``make_phantom``'s) simulated lesion annotators are kept as
    ``annotations["liver_lesion"]`` when that class is trained. ``region``: ``abdomen`` (default),
    ``pelvis`` or ``thorax`` (:mod:`napari_genseg.phantom_regions`: negatives without liver or spleen);
    cases are named ``phantom_SEED`` (abdomen) or ``phantom_REGION_SEED``.
    """
    from ..phantom import make_phantom

    lm = phantom_label_map(class_names)
    kw = {} if n_annotators is None or region != "abdomen" else {"n_annotators": int(n_annotators)}
    out = []
    for s in range(seed0, seed0 + n):
        p = make_phantom(seed=s, shape=tuple(shape), spacing=tuple(spacing), region=region, **kw)
        ann = {}
        if "liver_lesion" in class_names and p.lesion_annotations is not None and len(p.lesion_annotations):
            ann["liver_lesion"] = p.lesion_annotations
        out.append(Case(
            name=f"phantom_{s:04d}" if region == "abdomen" else f"phantom_{region}_{s:04d}",
            volume=p.to_volume(), labels=apply_label_map(p.labels, lm, len(class_names)),
            source=source or f"phantom:{n}@{seed0}", kind="phantom",
            meta={"seed": s, "shape": list(shape), "spacing": list(spacing), "region": region}, annotations=ann,
        ))
    return out


def _load(path):
    from ..io import load_volume

    return load_volume(path)


def nifti_cases(pairs, label_map=None, class_names=DEFAULT_CLASSES, source: str | None = None) -> list[Case]:
    """Image/label pairs -> Cases. Labels go through ``io.labels.labels_for_image`` (integer ids,
    same world grid as the image or resampled onto it with a warning); its warnings are issued as
    ``UserWarning`` and kept in ``Case.meta["label_warnings"]``. Raises VolumeReadError (an
    InputError) for non-integer ids or a label file that does not overlap its image."""
    import warnings

    from ..io.labels import labels_for_image

    out = []
    k = len(class_names)
    for img_p, lbl_p in pairs:
        img = _load(img_p)
        lbl, notes = labels_for_image(img, lbl_p)
        for n in notes:
            warnings.warn(n, stacklevel=2)
        name = re.sub(r"\.nii(\.gz)?$", "", Path(img_p).name)
        out.append(Case(
            name=name, volume=img, labels=apply_label_map(lbl, label_map, k),
            source=source or f"pairs:{img_p},{lbl_p}", kind="nifti",
            meta={"image": str(img_p), "label": str(lbl_p), "label_warnings": notes},
        ))
    return out


def image_cases(path, exclude=(), class_names=DEFAULT_CLASSES, source: str | None = None) -> list[Case]:
    """One unlabelled volume as a Case of kind ``image`` (labels all 0, ``meta["unlabelled"]``);
    ``exclude``: (a, b) slice blocks (b exclusive) recorded as ``meta["exclude"]``, which
    ``make_split`` leaves out of training and validation. Raises DataSpecError for a block outside
    the volume."""
    img = _load(path)
    n = int(img.shape[0])
    drop = []
    for a, b in exclude:
        if not 0 <= a < b <= n:
            raise DataSpecError(f"{path}: excluded slices {a}:{b} outside 0..{n}")
        drop += range(a, b)
    name = re.sub(r"\.nii(\.gz)?$", "", Path(path).name)
    return [Case(name=name, volume=img, labels=np.zeros(img.shape, np.uint8), source=source or f"image:{path}",
                 kind="image", meta={"image": str(path), "unlabelled": True, "exclude": sorted(set(drop))})]


def msd_pairs(root) -> list[tuple[str, str]]:
    """Image/label pairs of a Decathlon-layout folder."""
    root = Path(root)
    ds = root / "dataset.json"
    if ds.is_file():
        meta = json.loads(ds.read_text())
        pairs = []
        for item in meta.get("training", []):
            img = (root / item["image"]).resolve()
            lbl = (root / item["label"]).resolve()
            pairs.append((str(img), str(lbl)))
        if pairs:
            return pairs
    imgs = sorted(p for p in (root / "imagesTr").glob("*.nii*") if not p.name.startswith("._"))
    pairs = []
    for p in imgs:
        base = re.sub(r"_0000(\.nii(\.gz)?)$", r"\1", p.name)
        q = root / "labelsTr" / base
        if q.is_file():
            pairs.append((str(p), str(q)))
    if not pairs:
        raise DataSpecError(f"{root}: no imagesTr/labelsTr pairs found")
    return pairs


def parse_data_spec(spec: str) -> tuple[str, dict]:
    """-> (kind, args). Kinds: phantom, msd, pairs. Raises :class:`DataSpecError` for a spec of
    no known form (files are not opened; see :func:`check_data_specs`)."""
    spec = spec.strip()
    if spec.startswith("phantom:"):
        from ..phantom_regions import REGIONS

        rest, _, region = spec.split(":", 1)[1].partition("/")
        n, _, s = rest.partition("@")
        region = region or "abdomen"
        if region not in REGIONS:
            raise DataSpecError(f"data spec {spec!r}: phantom region must be one of {', '.join(REGIONS)}")
        try:
            return "phantom", {"n": int(n), "seed0": int(s) if s else 0, "region": region}
        except ValueError:
            raise DataSpecError(f"data spec {spec!r} is not phantom:N[@SEED][/REGION]") from None
    if spec.startswith("msd:"):
        return "msd", {"root": spec.split(":", 1)[1]}
    if spec.startswith("image:"):
        path, _, blocks = spec.split(":", 1)[1].partition("!")
        exclude = []
        for blk in (b for b in blocks.split(",") if b.strip()):
            a, sep, b = blk.partition(":")
            try:
                exclude.append((int(a), int(b)))
            except ValueError:
                raise DataSpecError(f"data spec {spec!r}: excluded block {blk!r} is not A:B (integers)") from None
        if not path.strip():
            raise DataSpecError(f"data spec {spec!r} is not image:PATH[!A:B]")
        return "image", {"path": path.strip(), "exclude": exclude}
    if spec.startswith("pairs:"):
        pairs = []
        for chunk in spec.split(":", 1)[1].split(";"):
            if not chunk.strip():
                continue
            parts = chunk.split(",")
            if len(parts) != 2:
                raise DataSpecError(f"pairs entry {chunk!r} is not IMG,LBL")
            pairs.append((parts[0].strip(), parts[1].strip()))
        return "pairs", {"pairs": pairs}
    p = Path(spec)
    if p.is_dir():
        return "msd", {"root": spec}
    raise DataSpecError(f"unknown data spec {spec!r} (phantom:N[@SEED][/REGION] | msd:DIR | pairs:IMG,LBL[;IMG,LBL]"
                        " | image:IMG[!A:B])")


def check_data_specs(specs, label_map=None) -> None:
    """Check data specs and a label map before any model is built: every spec parses, every
    ``pairs:`` file and ``msd:`` folder exists. Reads no volume. Raises :class:`DataSpecError`."""
    if isinstance(specs, str):
        specs = [specs]
    if not specs:
        raise DataSpecError("no training data given (--data phantom:N | msd:DIR | pairs:IMG,LBL)")
    parse_label_map(label_map)
    for spec in specs:
        kind, a = parse_data_spec(spec)
        paths = [Path(a["root"])] if kind == "msd" else [Path(a["path"])] if kind == "image" else [
            Path(p) for pair in a.get("pairs", []) for p in pair]
        for p in paths:
            if not p.exists():
                raise DataSpecError(f"{spec}: no such file or folder: {p}")


def load_sources(specs, label_map=None, class_names=DEFAULT_CLASSES, phantom_shape=(40, 160, 160),
                 phantom_spacing=(3.0, 2.2, 2.2), phantom_annotators: int | None = None) -> list[list[Case]]:
    """One list of cases per data spec (``phantom_annotators``: see ``phantom_cases``)."""
    if isinstance(specs, str):
        specs = [specs]
    lm = parse_label_map(label_map)
    out = []
    for spec in specs:
        kind, a = parse_data_spec(spec)
        if kind == "phantom":
            out.append(phantom_cases(a["n"], a["seed0"], class_names, phantom_shape, phantom_spacing, source=spec,
                                     n_annotators=phantom_annotators, region=a["region"]))
        elif kind == "msd":
            out.append(nifti_cases(msd_pairs(a["root"]), lm, class_names, source=spec))
        elif kind == "image":
            out.append(image_cases(a["path"], a["exclude"], class_names, source=spec))
        else:
            out.append(nifti_cases(a["pairs"], lm, class_names, source=spec))
    return out


# ----------------------------------------------------------------------------- splits
@dataclass
class Split:
    """Slices used for training / validation: lists of (case index, [z...])."""

    train: list[tuple[int, list[int]]]
    val: list[tuple[int, list[int]]]
    description: dict

    def to_dict(self, cases: list[Case]) -> dict:
        def d(items):
            return [{"case": cases[i].name, "source": cases[i].source, "slices": slice_ranges(zs)} for i, zs in items]

        return {"train": d(self.train), "val": d(self.val), **self.description}


def slice_block_holdout(n: int, block="auto", gap: int = 2, size: int = 8) -> tuple[list[int], list[int]]:
    """Train / validation slice indices of one volume: validation = a contiguous block
    (``"a:b"``, b exclusive, or ``"auto"`` = a centred block of ``size``), with ``gap`` slices on
    each side left out of both."""
    if block in (None, "", "auto"):
        size = min(size, max(1, n - 2 * gap - 2))
        a = (n - size) // 2
        b = a + size
    elif isinstance(block, (tuple, list)):
        a, b = int(block[0]), int(block[1])
    else:
        s = str(block)
        if ":" not in s:
            raise DataSpecError(f"hold-out block {block!r} is not 'a:b'")
        x, y = s.split(":", 1)
        try:
            a, b = int(x or 0), int(y) if y else n
        except ValueError:
            raise DataSpecError(f"hold-out block {block!r} is not 'a:b' (integers)") from None
    if not 0 <= a < b <= n:
        raise DataSpecError(f"hold-out block {a}:{b} outside 0..{n}")
    val = list(range(a, b))
    lo, hi = max(0, a - gap), min(n, b + gap)
    train = [z for z in range(n) if z < lo or z >= hi]
    if not train:
        raise DataSpecError("the hold-out block and its gaps leave no training slice")
    return train, val


def make_split(sources: list[list[Case]], val_fraction: float = 0.2, seed: int = 0,
               holdout="auto", holdout_gap: int = 2, holdout_size: int = 8) -> tuple[list[Case], Split]:
    """Flatten the sources and split them.

    A source with several cases is split by case: ``round(val_fraction * n)`` cases (at least 1 when
    ``val_fraction > 0`` and n > 1) chosen with ``seed``. A source with one case uses the slice-block
    hold-out (``holdout``; ``None``/"none" = train on all of it). A case's ``meta["exclude"]``
    slices (``image:`` specs) are in neither part.
    """
    cases: list[Case] = []
    train, val = [], []
    desc = {"val_fraction": val_fraction, "seed": seed, "holdout": holdout, "holdout_gap": holdout_gap,
            "strategy": []}
    for src in sources:
        idx0 = len(cases)
        cases.extend(src)
        n = len(src)
        if n == 1:
            c = src[0]
            if holdout in (None, "none", False):
                train.append((idx0, list(range(c.n_slices))))
                desc["strategy"].append({"source": c.source, "kind": "all-train"})
            else:
                tz, vz = slice_block_holdout(c.n_slices, holdout, holdout_gap, holdout_size)
                train.append((idx0, tz))
                val.append((idx0, vz))
                desc["strategy"].append({"source": c.source, "kind": "slice-block", "val": slice_ranges(vz),
                                         "gap": holdout_gap})
            continue
        order = sorted(range(n), key=lambda i: src[i].name)
        rng = np.random.default_rng(seed)
        perm = [order[i] for i in rng.permutation(n)]
        n_val = int(round(val_fraction * n))
        if val_fraction > 0 and n_val == 0:
            n_val = 1
        n_val = min(n_val, n - 1)
        vset = set(perm[:n_val])
        for i in range(n):
            (val if i in vset else train).append((idx0 + i, list(range(src[i].n_slices))))
        desc["strategy"].append({"source": src[0].source, "kind": "by-case", "n_val": n_val,
                                 "val_cases": sorted(src[i].name for i in vset)})

    def drop(items):
        out = []
        for ci, zs in items:
            ex = set(cases[ci].meta.get("exclude") or ())
            out.append((ci, [z for z in zs if z not in ex]) if ex else (ci, zs))
        return out

    train, val = drop(train), drop(val)
    for c in cases:
        if c.meta.get("exclude"):
            desc["strategy"].append({"source": c.source, "kind": "excluded", "slices": slice_ranges(c.meta["exclude"])})
    return cases, Split(train, val, desc)


# ----------------------------------------------------------------------------- augmentation
@dataclass
class Augment:
    """Random augmentation of one model-grid slice (HU image, labels).

    Probabilities ``p_*``; ranges are symmetric around identity. ``flip_ap`` (anterior-posterior)
    is off by default and a left-right flip does not exist on purpose (liver side matters).
    """

    p_intensity: float = 0.8
    hu_scale: float = 0.08  # image * U(1-s, 1+s)
    hu_shift: float = 20.0  # + U(-d, d) HU
    noise_hu: float = 15.0  # + N(0, U(0, sigma)) HU
    gamma: float = 0.3  # normalised ** exp(U(-g, g))
    p_spatial: float = 0.8
    scale: float = 0.2  # zoom U(1-s, 1+s)
    rotate_deg: float = 15.0
    translate: float = 0.05  # fraction of the grid
    p_elastic: float = 0.3
    elastic_px: float = 4.0  # displacement std in pixels (smooth field)
    flip_ap: float = 0.0  # probability of an anterior-posterior flip (off by default)

    @classmethod
    def none(cls) -> "Augment":
        return cls(p_intensity=0, p_spatial=0, p_elastic=0, flip_ap=0)

    @classmethod
    def from_options(cls, options: dict) -> "Augment | None":
        """A training config's ``augment`` mapping: field overrides, or ``{"off": true}`` -> None."""
        if options.get("off"):
            return None
        return cls(**{k: v for k, v in options.items() if k != "off"})

    def spatial(self, img: torch.Tensor, lab: torch.Tensor, g: torch.Generator, pad_hu: float = -1024.0):
        """img (1, S, S) HU float, lab (S, S) long -> same, transformed."""
        s = img.shape[-1]
        do_aff = _u(g) < self.p_spatial
        do_el = _u(g) < self.p_elastic
        do_flip = _u(g) < self.flip_ap
        if not (do_aff or do_el or do_flip):
            return img, lab
        theta = torch.eye(2, 3)
        if do_aff:
            z = 1.0 + _uu(g, -self.scale, self.scale)
            a = math.radians(_uu(g, -self.rotate_deg, self.rotate_deg))
            c, si = math.cos(a) / z, math.sin(a) / z
            theta = torch.tensor([[c, -si, 2 * _uu(g, -self.translate, self.translate)],
                                  [si, c, 2 * _uu(g, -self.translate, self.translate)]])
        if do_flip:
            theta[1] = -theta[1]  # output row y samples input row -y: anterior <-> posterior only
        grid = F.affine_grid(theta[None], (1, 1, s, s), align_corners=False)
        if do_el:
            cells = 5
            d = torch.randn((1, 2, cells, cells), generator=g) * (self.elastic_px * 2.0 / s)
            d = F.interpolate(d, size=(s, s), mode="bicubic", align_corners=True)
            grid = grid + d.permute(0, 2, 3, 1)
        # pad with air: shift HU so that zero padding = pad_hu
        out = F.grid_sample((img - pad_hu)[None], grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)[0] + pad_hu
        lo = F.grid_sample(lab[None, None].float(), grid, mode="nearest", padding_mode="zeros",
                           align_corners=False)[0, 0].long()
        return out, lo

    def intensity_hu(self, img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if not _u(g) < self.p_intensity:
            return img
        img = img * (1.0 + _uu(g, -self.hu_scale, self.hu_scale)) + _uu(g, -self.hu_shift, self.hu_shift)
        if self.noise_hu > 0:
            img = img + torch.randn(img.shape, generator=g) * (_u(g) * self.noise_hu)
        return img

    def gamma_norm(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """On the normalised [0, 1] input."""
        if self.gamma <= 0 or not _u(g) < self.p_intensity:
            return x
        return x.clamp(0, 1) ** math.exp(_uu(g, -self.gamma, self.gamma))


def _u(g) -> float:
    return float(torch.rand((), generator=g))


def _uu(g, a, b) -> float:
    return a + (b - a) * _u(g)


# ----------------------------------------------------------------------------- slice dataset
def augment_and_normalize(augment: "Augment | None", norm: Normalization, x: torch.Tensor, y: torch.Tensor,
                          g: torch.Generator | None):
    """One training item: spatial + HU-intensity augmentation, normalisation, then gamma on the
    normalised image (only for [0, 1]-range normalisations); plain normalisation without ``augment``."""
    if augment is None:
        return norm(x[None])[0], y
    x, y = augment.spatial(x, y, g, norm.pad_value_hu)
    x = augment.intensity_hu(x, g)
    x = norm(x[None])[0]
    if norm.kind in ("hu_window", "minmax"):  # gamma on [0, 1] (a [-1, 1] window goes there and back)
        lo, hi = (norm.out_min, norm.out_max) if norm.kind == "hu_window" else (0.0, 1.0)
        x = augment.gamma_norm((x - lo) / (hi - lo), g) * (hi - lo) + lo if (lo, hi) != (0.0, 1.0) \
            else augment.gamma_norm(x, g)
    return x, y


def to_grid(image_slices: np.ndarray, label_slices: np.ndarray, spacing_yx, grid: SliceGrid, pad_hu=-1024.0):
    """(n, H, W) HU + labels -> (n, 1, S, S) float HU, (n, S, S) long on the model grid
    (image exactly as the engine does; labels nearest-neighbour with the same geometry)."""
    x = torch.from_numpy(as_float_hu(image_slices))[:, None]
    x = grid.to_model(x, spacing_yx, pad_value=pad_hu)
    lab = torch.from_numpy(np.asarray(label_slices).astype(np.int64))[:, None].float()
    hw = tuple(lab.shape[-2:])
    sh = grid._scaled_hw(hw, spacing_yx)
    if sh != hw:
        lab = F.interpolate(lab, size=sh, mode="nearest-exact")
    if grid.mode == "spacing":
        from ..preprocessing import _center_fit

        lab = _center_fit(lab, grid.size, 0.0)
    return x, lab[:, 0].long()


class SliceDataset(torch.utils.data.Dataset):
    """2-D slices of ``cases`` on the model grid, cached once; ``repeats`` per case index
    oversamples a case (e.g. real slices). Items: (x (1, S, S) normalised float, y (S, S) long)."""

    def __init__(self, cases: list[Case], items: list[tuple[int, list[int]]], grid: SliceGrid,
                 norm: Normalization, augment: Augment | None = None, repeats: dict[int, int] | None = None,
                 seed: int = 0):
        self.grid, self.norm = grid, norm
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        xs, ys, index, self.origin = [], [], [], []
        repeats = repeats or {}
        pos = 0
        for ci, zs in items:
            c = cases[ci]
            if not zs:
                continue
            x, y = to_grid(c.image[zs], c.labels[zs], c.spacing[1:], grid, norm.pad_value_hu)
            xs.append(x)
            ys.append(y)
            for j, z in enumerate(zs):
                self.origin.append((c.name, z))
                index += [pos + j] * max(1, int(repeats.get(ci, 1)))
            pos += len(zs)
        self.x = torch.cat(xs) if xs else torch.zeros((0, 1, grid.size, grid.size))
        self.y = torch.cat(ys) if ys else torch.zeros((0, grid.size, grid.size), dtype=torch.long)
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i):
        j = self.index[i]
        g = None
        if self.augment is not None:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch * 100_003 + i) % (2**63))
        x, y = augment_and_normalize(self.augment, self.norm, self.x[j], self.y[j], g)
        return x.contiguous(), y.contiguous()
