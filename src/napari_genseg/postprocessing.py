"""3-D post-processing of a label volume, declared per class in the checkpoint, with a report.

No torch, no napari: numpy and ``scipy.ndimage`` only.

Declaration (the checkpoint's JSON, key ``"postprocess"``; see ``models/checkpoints.py``)::

    "postprocess": {"liver":  {"single_component": true, "fill_holes": true, "side": "right"},
                    "spleen": {"single_component": true, "fill_holes": true, "side": "left"}}

Per declared class name:

* ``single_component`` -- the organ is one piece: keep its largest 3-D connected component, set
  the voxels of every other component to background (0);
* ``fill_holes`` -- background voxels fully enclosed by the class in 3-D become that class. Only
  background voxels are filled: a voxel of another class (a lesion inside the liver) is never
  overwritten;
* ``side`` -- ``"right"`` / ``"left"``: the side of the patient the organ lies on (used only for a
  plausibility flag, never to change voxels);
* ``large_fraction`` -- (default 0.1) a second component at least this fraction of the largest
  one is "large" (flag ``several_large_components``).

Classes without a declaration are never changed (they are still measured).

Connectivity: a class's components are **26-connected** (faces, edges and corners touch): a piece
that touches the organ only diagonally between two slices counts as part of the organ, so the
clean-up never cuts an organ into pieces that the model drew as touching; the holes are the
**6-connected** background regions that do not reach the border of the array (the usual dual pair
of digital topology; the same as ``scipy.ndimage.binary_fill_holes`` with its default structure).
A tube of background open at both ends (a vessel through the liver) is therefore not a hole, and
neither is a gap open at the first or last slice of the volume.

Plausibility flags (:class:`Flag`, volume-level; :func:`slice_flags` maps them to axial slices):

* ``wrong_side`` -- the organ's centroid (after clean-up) lies on the other side of the patient's
  midline than declared. Sides are decided in the patient frame: voxel centroids go through the
  volume's world affine (``Volume.display_affine_ras``: the display x axis points to the patient's
  left whatever the stored orientation of the file was, see ``volume.py`` / ``io/nifti.py``) and
  are compared with the midline, the left-right centre of the body (voxels above -300 HU of the
  CT) or, without a CT, the centre of the field of view;
* ``several_large_components`` -- a ``single_component`` organ had, before clean-up, a second
  3-D component at least ``large_fraction`` (10 %) of its largest one: the kept piece may be the
  wrong one;
* ``empty`` -- a declared organ has no voxel.

Volumes: voxel count x (sz * sy * sx) mm^3 / 1000 = mL.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from .errors import InputError
from .run_record import slice_ranges

__all__ = [
    "CONNECTIVITY",
    "HOLE_CONNECTIVITY",
    "LARGE_FRACTION",
    "BODY_HU",
    "ClassRule",
    "ClassReport",
    "Flag",
    "PostprocessReport",
    "PostprocessSpecError",
    "default_postprocess",
    "parse_postprocess",
    "postprocess",
    "measure",
    "slice_flags",
    "disabled_record",
]

#: connectivity of a class's 3-D components (26: faces, edges and corners)
CONNECTIVITY = 26
#: connectivity of the background when looking for holes (6: faces only)
HOLE_CONNECTIVITY = 6
#: a second component at least this fraction of the largest is "large"
LARGE_FRACTION = 0.10
#: voxels above this (HU) are the body when the midline is read off the CT
BODY_HU = -300.0

_SIDES = ("left", "right")
_KEYS = {"single_component", "fill_holes", "side", "large_fraction"}

#: declarations written for known organ names when a checkpoint is saved without its own block
#: (``default_postprocess``); every other class name stays undeclared (untouched)
_KNOWN_ORGANS: dict[str, dict] = {
    "liver": {"single_component": True, "fill_holes": True, "side": "right"},
    "spleen": {"single_component": True, "fill_holes": True, "side": "left"},
    "gallbladder": {"single_component": True, "fill_holes": True, "side": "right"},
    "stomach": {"single_component": True, "fill_holes": True, "side": "left"},
    "kidney_left": {"single_component": True, "fill_holes": True, "side": "left"},
    "kidney_right": {"single_component": True, "fill_holes": True, "side": "right"},
    "urinary_bladder": {"single_component": True, "fill_holes": True},
    "bladder": {"single_component": True, "fill_holes": True},
    "pancreas": {"single_component": True, "fill_holes": True},
    "heart": {"single_component": True, "fill_holes": True},
}


class PostprocessSpecError(InputError, ValueError):
    """A ``postprocess`` block that cannot be used (one line: the class and the bad entry)."""


@dataclass(frozen=True)
class ClassRule:
    """What is declared for one class (see the module doc)."""

    single_component: bool = False
    fill_holes: bool = False
    side: str | None = None
    large_fraction: float = LARGE_FRACTION

    def to_dict(self) -> dict:
        return asdict(self)


def default_postprocess(class_names: Iterable[str]) -> dict:
    """The declarations for the known organ names among ``class_names`` (liver: one piece, holes
    filled, right side; spleen: the same on the left; ...); ``{}`` when none is known."""
    return {str(n): dict(_KNOWN_ORGANS[str(n).lower()]) for n in class_names
            if str(n).lower() in _KNOWN_ORGANS}


def parse_postprocess(block: dict | None, class_names: Sequence[str]) -> dict[int, ClassRule]:
    """Class id -> :class:`ClassRule` for a checkpoint's ``postprocess`` block.

    Raises :class:`PostprocessSpecError` for a block that is not a mapping, a name that is not one
    of ``class_names`` (or is the background, id 0), an unknown key, a side other than
    left/right, or a ``large_fraction`` outside (0, 1]."""
    if not block:
        return {}
    if not isinstance(block, dict):
        raise PostprocessSpecError(f"postprocess must map class names to settings, not {type(block).__name__}")
    names = [str(n) for n in class_names]
    rules: dict[int, ClassRule] = {}
    for name, entry in block.items():
        if name not in names:
            raise PostprocessSpecError(f"postprocess declares {name!r}, which is not a class ({', '.join(names)})")
        cid = names.index(name)
        if cid == 0:
            raise PostprocessSpecError(f"postprocess cannot declare the background class {name!r}")
        if not isinstance(entry, dict):
            raise PostprocessSpecError(f"postprocess[{name!r}] must be a mapping of settings")
        extra = set(entry) - _KEYS
        if extra:
            raise PostprocessSpecError(f"postprocess[{name!r}]: unknown setting {sorted(extra)[0]!r} "
                                       f"(known: {', '.join(sorted(_KEYS))})")
        side = entry.get("side")
        if side is not None and side not in _SIDES:
            raise PostprocessSpecError(f"postprocess[{name!r}]: side must be 'left' or 'right', not {side!r}")
        frac = entry.get("large_fraction", LARGE_FRACTION)
        if not isinstance(frac, (int, float)) or isinstance(frac, bool) or not 0 < float(frac) <= 1:
            raise PostprocessSpecError(f"postprocess[{name!r}]: large_fraction must be in (0, 1], not {frac!r}")
        for key in ("single_component", "fill_holes"):
            if not isinstance(entry.get(key, False), bool):
                raise PostprocessSpecError(f"postprocess[{name!r}]: {key} must be true or false")
        rules[cid] = ClassRule(bool(entry.get("single_component", False)), bool(entry.get("fill_holes", False)),
                               side, float(frac))
    return rules


# ----------------------------------------------------------------------------- report
@dataclass
class Flag:
    """A plausibility finding: ``kind`` (wrong_side, several_large_components, empty), the class,
    a one-line ``message`` and the axial slices (z, display order) it concerns (may be empty)."""

    kind: str
    class_name: str
    message: str
    slices: list[int] = field(default_factory=list)


@dataclass
class ClassReport:
    """One class after post-processing. Volumes in mL, centroid in mm (patient LPS, (S, P, L)
    order like ``Volume.origin``); ``rule`` is the declaration (None = undeclared, untouched);
    ``removed_slices``: axial slices (z) that lost voxels to the single-component rule."""

    label: int
    name: str
    rule: dict | None
    voxels: int
    volume_ml: float
    components_before: int
    components_after: int
    removed_components: int = 0
    removed_voxels: int = 0
    removed_ml: float = 0.0
    filled_voxels: int = 0
    filled_ml: float = 0.0
    centroid_mm: list[float] | None = None
    side: str | None = None
    removed_slices: list[int] = field(default_factory=list)

    def line(self) -> str:
        """``liver: 1201.2 mL, 1 component (removed 26 components, 75.0 mL)`` (CLI, dock)."""
        comp = f"{self.components_after} component{'s' if self.components_after != 1 else ''}"
        text = f"{self.name}: {self.volume_ml:.1f} mL, {comp}"
        extra = []
        if self.removed_components:
            extra.append(f"removed {self.removed_components} component{'s' if self.removed_components != 1 else ''}, "
                         f"{self.removed_ml:.1f} mL")
        if self.filled_voxels:
            extra.append(f"filled holes {self.filled_ml:.1f} mL")
        return text + (f" ({'; '.join(extra)})" if extra else "")


@dataclass
class PostprocessReport:
    """What :func:`postprocess` did: settings, one :class:`ClassReport` per foreground class and
    the plausibility :class:`Flag` s. ``to_dict()`` is plain JSON (the sidecar's
    ``"postprocessing"``)."""

    enabled: bool
    spacing_mm: list[float]
    voxel_ml: float
    connectivity: int = CONNECTIVITY
    hole_connectivity: int = HOLE_CONNECTIVITY
    declared: dict = field(default_factory=dict)
    midline: dict = field(default_factory=dict)
    editable_slices: str | None = None
    classes: list[ClassReport] = field(default_factory=list)
    flags: list[Flag] = field(default_factory=list)

    def to_dict(self) -> dict:
        return _plain(asdict(self))

    def lines(self) -> list[str]:
        """One line per class (``ClassReport.line``)."""
        return [c.line() for c in self.classes]

    @property
    def warnings(self) -> list[str]:
        """The flags' messages, one line each."""
        return [f.message for f in self.flags]

    def by_name(self, name: str) -> ClassReport:
        """The report of class ``name`` (KeyError when it has none)."""
        for c in self.classes:
            if c.name == name:
                return c
        raise KeyError(name)


def disabled_record(declared: dict | None, reason: str) -> dict:
    """The sidecar's ``"postprocessing"`` when the step was switched off (``--no-postprocess``,
    the dock's unchecked "3-D clean-up"): what was declared and why nothing ran."""
    return {"enabled": False, "reason": reason, "declared": _plain(declared or {})}


def _plain(obj):
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ----------------------------------------------------------------------------- geometry
def _geometry(geometry) -> tuple[tuple[float, float, float], np.ndarray | None, np.ndarray | None]:
    """(spacing zyx, RAS affine of display voxel (x, y, z) or None, CT data or None)."""
    if hasattr(geometry, "spacing"):
        aff = getattr(geometry, "display_affine_ras", None)
        data = getattr(geometry, "data", None)
        return tuple(float(s) for s in geometry.spacing), (np.asarray(aff) if aff is not None else None), data
    sp = tuple(float(s) for s in geometry)
    if len(sp) != 3 or not all(s > 0 and math.isfinite(s) for s in sp):
        raise ValueError(f"spacing must be three positive numbers (z, y, x) in mm, got {geometry!r}")
    return sp, None, None


def _ras(aff: np.ndarray | None, spacing, zyx) -> np.ndarray:
    """RAS position (mm) of a display voxel position (z, y, x); without an affine the display
    convention alone (x -> patient left, y -> posterior, z -> superior, origin 0)."""
    z, y, x = (float(v) for v in zyx)
    if aff is None:
        sz, sy, sx = spacing
        return np.array([-x * sx, -y * sy, z * sz])
    return (aff @ np.array([x, y, z, 1.0]))[:3]


def _midline(image, aff, spacing, shape) -> dict:
    """The patient's left-right midline as an R coordinate (mm): the centre of the body (CT
    voxels above ``BODY_HU``, sampled every 2nd slice and 4th pixel) or of the field of view."""
    cx = None
    source = "field_of_view"
    if image is not None and np.asarray(image).shape == tuple(shape):
        sub = np.asarray(image)[::2, ::4, ::4]
        body = sub > BODY_HU
        if body.any() and not body.all():
            xs = np.nonzero(body)[2].astype(np.float64) * 4.0
            cx = float(xs.mean())
            source = "body"
    if cx is None:
        cx = (shape[2] - 1) / 2.0
    r = _ras(aff, spacing, ((shape[0] - 1) / 2.0, (shape[1] - 1) / 2.0, cx))[0]
    return {"source": source, "r_mm": float(r), "x_index": cx}


def _structure(conn: int) -> np.ndarray:
    from scipy import ndimage as ndi

    return ndi.generate_binary_structure(3, 3 if conn == 26 else 1)


def _crop(mask: np.ndarray):
    """Bounding box (slices) of ``mask`` grown by one voxel (clipped at the array)."""
    idx = [np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != ax)))[0] for ax in range(3)]
    return tuple(slice(max(int(i[0]) - 1, 0), min(int(i[-1]) + 2, n)) for i, n in zip(idx, mask.shape))


def _label(mask: np.ndarray, structure: np.ndarray):
    """``scipy.ndimage.label`` into uint16 (half of scipy's default int32 over a whole CT), int32
    only when the mask has more than 65535 components."""
    from scipy import ndimage as ndi

    try:
        return ndi.label(mask, structure=structure, output=np.uint16)
    except RuntimeError:  # "insufficient bit-depth in requested output type"
        return ndi.label(mask, structure=structure, output=np.int32)


def _centroid(mask: np.ndarray) -> tuple[float, float, float]:
    """Mean (z, y, x) voxel index of a non-empty ``mask``, from its per-axis projections (no
    ``np.nonzero``: 24 bytes per voxel of the class)."""
    n = float(np.count_nonzero(mask))
    out = []
    for ax in range(3):
        counts = np.count_nonzero(mask, axis=tuple(a for a in range(3) if a != ax))
        out.append(float(np.dot(counts.astype(np.float64), np.arange(mask.shape[ax], dtype=np.float64))) / n)
    return tuple(out)


def _sizes(lab: np.ndarray, n: int) -> np.ndarray:
    """Voxel count of components 1..n of a label array, slab by slab (``np.bincount`` casts its
    input to int64: 8 bytes per voxel of the whole crop at once)."""
    sizes = np.zeros(n + 1, np.int64)
    if n:
        step = max(1, (1 << 16) // max(1, lab[0].size))  # <= one slice or 64k voxels at once
        for z in range(0, lab.shape[0], step):
            sizes += np.bincount(lab[z : z + step].ravel(), minlength=n + 1)
    return sizes[1:]


def _components(mask: np.ndarray | list):
    """(label array over the crop, crop, sizes (index k-1 = component k)) of ``mask``.

    ``mask`` may come in a one-element list, which is emptied once the crop is copied out: the
    whole-volume mask is then gone before the component labels are made."""
    holder = mask if isinstance(mask, list) else None
    if holder is not None:
        mask = holder.pop()
    box = _crop(mask)
    sub = np.ascontiguousarray(mask[box])
    mask = None  # noqa: F841 (frees a handed-over mask)
    lab, n = _label(sub, _structure(CONNECTIVITY))
    sub = None
    sizes = _sizes(lab, n)
    return lab, box, sizes


def _holes(mask: np.ndarray | list) -> tuple[np.ndarray, tuple]:
    """Background voxels enclosed by ``mask`` in 3-D (6-connected background not reaching the
    array border), over the crop of ``mask`` (returned with it). ``mask`` in a one-element list
    is dropped once its crop is taken (see :func:`_components`)."""
    if isinstance(mask, list):
        mask = mask.pop()
    box = _crop(mask)
    outside_mask = ~mask[box]
    mask = None
    bg, n = _label(outside_mask, _structure(HOLE_CONNECTIVITY))
    if n == 0:
        return np.zeros(outside_mask.shape, bool), box
    outside_mask = None
    # background regions touching the crop's faces reach the outside: the crop has a one-voxel
    # margin of background (or is the array border itself)
    outside = np.zeros(n + 1, bool)
    for ax in range(3):
        for end in (0, -1):
            face = np.take(bg, end, axis=ax)
            outside[np.unique(face)] = True
    outside[0] = True  # the mask itself
    return ~outside[bg], box


def _big_slices(lab: np.ndarray, ids: list[int], offset: int = 0) -> list[int]:
    """Slices (z + ``offset``) holding any of the components ``ids`` of ``lab``: a connected
    component covers every slice between its first and last, so its bounding box is enough
    (``scipy.ndimage.find_objects``; ``np.isin`` made label-array-sized temporaries)."""
    from scipy import ndimage as ndi

    boxes = ndi.find_objects(lab, max_label=max(ids))
    zs = {z for k in ids if boxes[k - 1] is not None for z in range(boxes[k - 1][0].start, boxes[k - 1][0].stop)}
    return [z + offset for z in sorted(zs)]


def _z_list(mask_z: np.ndarray, offset: int = 0) -> list[int]:
    return [int(z) + offset for z in np.nonzero(mask_z)[0]]


# ----------------------------------------------------------------------------- main
def postprocess(
    labels: np.ndarray,
    class_names: Sequence[str],
    spec: dict | None,
    geometry: Any,
    editable_slices: Iterable[int] | None = None,
    image: np.ndarray | None = None,
    in_place: bool = False,
) -> tuple[np.ndarray, PostprocessReport]:
    """Clean up ``labels`` per the declarations of ``spec`` and report every class.

    Args:
        labels: (z, y, x) integer class ids (display convention of ``volume.py``); not modified (unless ``in_place``).
        class_names: names of the class ids (id 0 = background).
        spec: the checkpoint's ``postprocess`` block (class name -> settings, see module doc);
            None or {} changes nothing (every class is still measured).
        geometry: the :class:`~napari_genseg.volume.Volume` the labels belong to (spacing, world
            frame; its CT voxels give the body midline), or a (sz, sy, sx) spacing in mm.
        editable_slices: axial slices (z) that may change (a dock run over a range of slices);
            components and holes are still found in the whole volume, but voxels on other slices
            are never changed. None = every slice.
        image: the CT (HU, same shape) for the midline, when ``geometry`` is a spacing or its data
            is not the CT.

        in_place: clean ``labels`` itself (returned) instead of a copy: a caller that drops the
            raw labels (the CLI) saves one label volume.

    Returns:
        (new labels of the same shape and dtype, :class:`PostprocessReport`).

    Raises:
        PostprocessSpecError: a bad ``spec`` (see :func:`parse_postprocess`).
        ValueError: labels that are not 3-D, or a spacing that is not three positive numbers.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be 3-D (z, y, x), got shape {labels.shape}")
    rules = parse_postprocess(spec, class_names)
    spacing, aff, data = _geometry(geometry)
    if image is None:
        image = data
    voxel_ml = float(np.prod(spacing)) / 1000.0
    out = labels if in_place else labels.copy()
    editable = None
    if editable_slices is not None:
        editable = np.zeros(labels.shape[0], bool)
        zs = [int(z) for z in editable_slices]
        editable[[z for z in zs if 0 <= z < labels.shape[0]]] = True
    mid = _midline(image, aff, spacing, labels.shape)
    report = PostprocessReport(
        enabled=True, spacing_mm=list(spacing), voxel_ml=voxel_ml,
        declared={str(class_names[c]): r.to_dict() for c, r in rules.items()}, midline=mid,
        editable_slices=slice_ranges(np.nonzero(editable)[0]) if editable is not None else None,
    )
    n_ids = max(len(class_names), int(labels.max(initial=0)) + 1)
    reps: dict[int, ClassReport] = {}
    # pass 1: every class is measured; single-component organs lose their other components
    for cid in range(1, n_ids):
        mask = lab = drop = None  # the last class's whole-volume arrays go before the next ones come
        name = str(class_names[cid]) if cid < len(class_names) else f"class{cid}"
        rule = rules.get(cid)
        rep = reps[cid] = ClassReport(label=cid, name=name, rule=rule.to_dict() if rule else None, voxels=0,
                                      volume_ml=0.0, components_before=0, components_after=0)
        mask = labels == cid
        if not mask.any():
            continue
        holder, mask = [mask], None
        lab, box, sizes = _components(holder)  # the whole-volume mask goes before labelling
        rep.components_before = rep.components_after = int(sizes.size)
        if rule is None or not rule.single_component or sizes.size < 2:
            continue
        order = np.argsort(sizes, kind="stable")[::-1]
        largest = int(sizes[order[0]])
        drop = lab > 0
        np.not_equal(lab, int(order[0]) + 1, out=drop, where=drop)  # in place: no third array
        if editable is not None:
            drop &= editable[box[0]][:, None, None]
        out[box][drop] = 0
        rep.removed_components = int(np.unique(lab[drop]).size)
        rep.removed_voxels = int(drop.sum())
        rep.removed_slices = _z_list(drop.any(axis=(1, 2)), box[0].start)
        big = [int(k) + 1 for k in order[1:] if sizes[k] >= rule.large_fraction * largest]
        if big:
            second = int(sizes[order[1]])
            report.flags.append(Flag(
                "several_large_components", name,
                f"{name}: {len(big) + 1} large 3-D components before clean-up (the second is "
                f"{100.0 * second / largest:.0f} % of the largest, >= {100.0 * rule.large_fraction:.0f} %): "
                f"the kept one may be the wrong one",
                _big_slices(lab, big, box[0].start)))
    mask = lab = drop = None
    # pass 2: holes (after every removal, so a removed stray inside an organ's hole is filled too)
    for cid, rule in sorted(rules.items()):
        holes = sub = fill = None
        if not rule.fill_holes or cid not in reps or not (out == cid).any():
            continue
        holes, hbox = _holes([out == cid])
        sub = out[hbox]  # a view: writes land in ``out``
        fill = holes & (sub == 0)
        if editable is not None:
            fill &= editable[hbox[0]][:, None, None]
        sub[fill] = cid
        reps[cid].filled_voxels = int(fill.sum())
    holes = sub = fill = None
    # pass 3: what is left, where it lies, and the flags
    for cid, rep in reps.items():
        final = None
        rule = rules.get(cid)
        final = out == cid
        rep.voxels = int(final.sum())
        rep.volume_ml = round(rep.voxels * voxel_ml, 6)
        rep.removed_ml = round(rep.removed_voxels * voxel_ml, 6)
        rep.filled_ml = round(rep.filled_voxels * voxel_ml, 6)
        if rep.voxels:
            if rule is not None and (rep.removed_voxels or rep.filled_voxels):
                rep.components_after = int(_components(final)[2].size)  # ``final`` is used below
            cz, cy, cx = _centroid(final)
            ras = _ras(aff, spacing, (cz, cy, cx))
            rep.centroid_mm = [float(ras[2]), float(-ras[1]), float(-ras[0])]  # (S, P, L)
            rep.side = "right" if ras[0] > mid["r_mm"] else "left"
            if rule is not None and rule.side and rep.side != rule.side:
                off = abs(float(ras[0]) - mid["r_mm"])
                report.flags.append(Flag(
                    "wrong_side", rep.name,
                    f"{rep.name}: lies on the patient's {rep.side} (centroid {off:.0f} mm {rep.side} of the "
                    f"midline), expected {rule.side}", _z_list(final.any(axis=(1, 2)))))
        else:
            rep.components_after = 0
            if rule is not None:
                report.flags.append(Flag("empty", rep.name, f"{rep.name}: empty (no voxel)", []))
        report.classes.append(rep)
    return out, report


def measure(labels: np.ndarray, class_names: Sequence[str], geometry: Any) -> PostprocessReport:
    """Volumes and component counts of every class without changing anything (no declaration):
    ``postprocess(labels, class_names, None, geometry)[1]`` with ``enabled`` False."""
    _, rep = postprocess(labels, class_names, None, geometry)
    rep.enabled = False
    return rep


def slice_flags(labels: np.ndarray, report: PostprocessReport | dict) -> dict[int, list[str]]:
    """Axial slice z -> short reasons to look at it, for a review of ``labels`` (the labels as they
    are now, e.g. after the user's edits) against a :class:`PostprocessReport` (or its dict).

    * ``"<class>: stray component removed"`` on slices that lost voxels to the single-component
      rule (``ClassReport.removed_slices``);
    * ``"<class>: second large component"`` on slices of the other large components of a
      ``several_large_components`` flag;
    * ``"<class>: on the wrong side"`` on every slice where ``labels`` still holds that class
      (found in ``labels`` now, so a class the user has since erased is no longer listed).

    Volume-level flags without slices (``empty``) are in ``report.flags``. Slices outside
    ``labels`` are dropped; reasons per slice are sorted and unique."""
    rep = report.to_dict() if hasattr(report, "to_dict") else report
    labels = np.asarray(labels)
    n = labels.shape[0]
    out: dict[int, set[str]] = {}

    def add(zs, text):
        for z in zs:
            if 0 <= int(z) < n:
                out.setdefault(int(z), set()).add(text)

    ids = {c["name"]: c["label"] for c in rep.get("classes", [])}
    for c in rep.get("classes", []):
        add(c.get("removed_slices", []), f"{c['name']}: stray component removed")
    for f in rep.get("flags", []):
        if f["kind"] == "several_large_components":
            add(f.get("slices", []), f"{f['class_name']}: second large component")
        elif f["kind"] == "wrong_side" and f["class_name"] in ids:
            present = np.nonzero((labels == ids[f["class_name"]]).any(axis=(1, 2)))[0]
            add(present, f"{f['class_name']}: on the wrong side")
    return {z: sorted(v) for z, v in sorted(out.items())}
