"""Does the volume contain the body region a checkpoint was trained on? A per-slice rule.

The rule (documented in the README; thresholds from adult CT anatomy, checked on the shared CTs):

1. Every slice (at most 64, evenly spread) is brought to about 3 mm pixels by striding.
2. **Body outline**: connected components (8-connected) of voxels above -300 HU, each of at least
   20 cm²; the largest, holes filled (scipy.ndimage), is the outline. No component -> no body.
3. **Thorax**: air below -400 HU fills at least 25 % of the outline (lungs).
4. **Head/neck**: an outline smaller than 400 cm² (an adult head is 120-250 cm², an adult abdomen
   500-1200 cm²) with at least 4 % of it bone (>= 300 HU; the skull ring is 10-30 %).
5. **Limbs**: two components of comparable size (the second at least 40 % of the largest) and
   neither bigger than 400 cm² (legs, arms held apart).
6. Otherwise **abdomen** (abdomen or pelvis: a large outline without lungs).

A checkpoint records the region it was trained on (``body_region`` in its JSON: "abdomen",
"thorax" or "head"). The check warns when fewer than 10 % of the slices with a body show that
region. It needs HU: the caller passes the offset that makes the intensities HU (or skips it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = ["REGIONS", "RegionCheck", "slice_regions", "check_body_region", "region_for_classes"]

REGIONS = ("head", "thorax", "abdomen")
LABELS = ("head/neck", "thorax", "abdomen", "limbs")
BODY_HU = -300.0
LUNG_HU = -400.0
BONE_HU = 300.0
MIN_COMPONENT_CM2 = 20.0
HEAD_MAX_CM2 = 400.0
HEAD_MIN_BONE = 0.04
THORAX_MIN_AIR = 0.25
LIMB_RATIO = 0.4
MIN_REGION_FRACTION = 0.10
MAX_SLICES = 64
TARGET_MM = 3.0

#: class name -> body region (TotalSegmentator-style names); used when a checkpoint does not say
_ORGAN_REGION = {
    "liver": "abdomen", "liver_lesion": "abdomen", "spleen": "abdomen", "kidney": "abdomen",
    "kidney_left": "abdomen", "kidney_right": "abdomen", "pancreas": "abdomen",
    "gallbladder": "abdomen", "stomach": "abdomen", "duodenum": "abdomen", "adrenal_gland": "abdomen",
    "inferior_vena_cava": "abdomen", "portal_vein": "abdomen", "bowel": "abdomen", "colon": "abdomen",
    "small_bowel": "abdomen", "urinary_bladder": "abdomen", "bladder": "abdomen",
    "lung": "thorax", "lungs": "thorax", "lung_left": "thorax", "lung_right": "thorax", "heart": "thorax",
    "esophagus": "thorax", "trachea": "thorax",
    "brain": "head", "skull": "head",
}


def region_for_classes(class_names) -> str | None:
    """The body region of a list of class names: the region most foreground classes belong to
    ("abdomen" for liver + spleen), or None when no name is known (e.g. ``class1``)."""
    votes: dict[str, int] = {}
    for name in class_names:
        reg = _ORGAN_REGION.get(str(name).lower())
        if reg:
            votes[reg] = votes.get(reg, 0) + 1
    if not votes:
        return None
    return max(sorted(votes), key=lambda r: votes[r])


def _classify_slice(s: np.ndarray, px_cm2: float) -> str | None:
    from scipy import ndimage as ndi

    body = s > BODY_HU
    lab, n = ndi.label(body, structure=np.ones((3, 3), bool))
    if n == 0:
        return None
    sizes = np.bincount(lab.ravel())[1:] * px_cm2
    big = np.sort(sizes[sizes >= MIN_COMPONENT_CM2])[::-1]
    if big.size == 0:
        return None
    k = int(np.argmax(sizes)) + 1
    outline = ndi.binary_fill_holes(lab == k)
    area = float(outline.sum()) * px_cm2
    inside = s[outline]
    air = float(np.mean(inside < LUNG_HU))
    bone = float(np.mean(inside >= BONE_HU))
    if air >= THORAX_MIN_AIR:
        return "thorax"
    if big.size >= 2 and big[1] >= LIMB_RATIO * big[0] and big[0] < HEAD_MAX_CM2:
        return "limbs"
    if area < HEAD_MAX_CM2 and bone >= HEAD_MIN_BONE:
        return "head/neck"
    return "abdomen"


def slice_regions(data: np.ndarray, spacing: tuple[float, float, float], offset: float = 0.0,
                  max_slices: int = MAX_SLICES) -> dict[int, str | None]:
    """Slice index -> "head/neck" | "thorax" | "abdomen" | "limbs" | None (no body) for up to
    ``max_slices`` evenly spread slices of a (z, y, x) volume in HU (after adding ``offset``);
    ``spacing`` (sz, sy, sx) in mm."""
    nz = data.shape[0]
    zs = np.unique(np.linspace(0, nz - 1, min(nz, max_slices)).round().astype(int))
    sy, sx = float(spacing[1]), float(spacing[2])
    ky = max(1, int(TARGET_MM // sy)) if sy > 0 else 1
    kx = max(1, int(TARGET_MM // sx)) if sx > 0 else 1
    px_cm2 = (sy * ky) * (sx * kx) / 100.0
    out = {}
    for z in zs:
        s = np.asarray(data[int(z), ::ky, ::kx], dtype=np.float32) + offset
        out[int(z)] = _classify_slice(s, px_cm2)
    return out


@dataclass
class RegionCheck:
    """``expected``: the checkpoint's region; ``counts``: slices per label (``none`` = no body);
    ``ok``: the expected region is shown by at least 10 % of the body slices (True when nothing is
    expected); ``message``: one line when not ok; ``offset``: HU added before classifying."""

    expected: str | None
    counts: dict = field(default_factory=dict)
    n_checked: int = 0
    ok: bool = True
    offset: float = 0.0
    message: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        parts = [f"{k} {v}" for k, v in self.counts.items() if v]
        return f"{', '.join(parts)} of {self.n_checked} slices checked" if parts else "no slice checked"


def check_body_region(data: np.ndarray, spacing, expected: str | None, offset: float = 0.0) -> RegionCheck:
    """Classify the slices of ``data`` (z, y, x HU + ``offset``) and compare with ``expected``
    ("abdomen" | "thorax" | "head" | None). Raises ValueError for an unknown region name."""
    if expected is not None and expected not in REGIONS:
        raise ValueError(f"unknown body region {expected!r} (one of {', '.join(REGIONS)})")
    per = slice_regions(data, spacing, offset)
    counts = {lab: 0 for lab in LABELS}
    counts["none"] = 0
    for lab in per.values():
        counts[lab or "none"] += 1
    chk = RegionCheck(expected=expected, counts=counts, n_checked=len(per), offset=float(offset))
    if expected is None:
        return chk
    n_body = len(per) - counts["none"]
    want = "head/neck" if expected == "head" else expected
    if n_body == 0 or counts[want] < MIN_REGION_FRACTION * n_body:
        chk.ok = False
        chk.message = (f"the volume does not look like the {expected} the model was trained on: "
                       f"{chk.summary()} (body-region rule: see README)")
    return chk
