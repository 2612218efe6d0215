"""Is this a CT in Hounsfield units? A check of the intensity distribution (numpy only).

A CT of a patient in HU has two landmarks (ICRU / Hounsfield's scale: air -1000 HU, water 0 HU):

* **air** around the body: a peak in -1100..-850 HU (noise spreads it; scanners clip at -1024);
* **soft tissue** in the body: the dominant value of the voxels above -500 HU lies in -150..150 HU
  (fat -120..-80, water 0, muscle/liver/blood 40..70);
* and between them a **continuum**: lung, fat edges and partial-volume voxels put at least 0.5 %
  of the voxels in -850..-250 HU. A derived map that borrows the CT scale (a perfusion rCBF map
  written with RescaleIntercept -1024: a constant background and values 0..200) has none.

Volumes cropped to the body (no air) pass when their lowest cluster is soft tissue. Voxels below
-1500 HU are treated as padding outside the reconstruction circle (PixelPaddingValue, -2000/-3024)
and left out. A volume that fails gets, where one exists, a suggested offset: the common storage
offsets (-1024, -1000, +1024, +1000), or the shift that puts its lowest cluster at air and its
next cluster ~1000 above at soft tissue, and only when the shifted volume passes the same check.

DICOM facts that say "not HU" on their own (DICOM PS3.3 C.7.6.16.2.11 Real World Value Mapping
with units other than HU; Image Type values of derived parametric maps such as PERFUSION/RCBF;
Modality other than CT) are read from the volume's metadata or its first DICOM header and
reported next to the distribution.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["HUCheck", "check_hu", "dicom_intensity_facts", "AIR_BAND", "TISSUE_BAND"]

AIR_BAND = (-1100.0, -850.0)
TISSUE_BAND = (-150.0, 150.0)
CONTINUUM_BAND = (-850.0, -250.0)
MIN_CONTINUUM = 0.005  # fraction of voxels
MIN_AIR = 0.01
MIN_TISSUE = 0.3  # fraction of the voxels above -500 HU that lie in TISSUE_BAND
PADDING_BELOW = -1500.0
COMMON_OFFSETS = (-1024.0, -1000.0, 1024.0, 1000.0)
MAX_SAMPLE = 2_000_000
MIN_DISTINCT = 32

#: Image Type (0008,0008) values of derived maps whose pixel values are not HU
NON_HU_IMAGE_TYPES = frozenset({
    "PERFUSION", "RCBF", "RCBV", "CBF", "CBV", "MTT", "TTP", "TMAX", "IODINE", "IODINE_MAP",
    "EFFECTIVE_ATOMIC_NUMBER", "ELECTRON_DENSITY", "FAT_FRACTION", "PERMEABILITY",
})


@dataclass
class HUCheck:
    """The verdict on one volume's intensities.

    ``ok``: the distribution looks like CT in HU. ``air_peak_hu`` / ``tissue_peak_hu``: the modes
    found (None when absent). ``fractions``: air, soft tissue (of body voxels), continuum and
    padding fractions. ``suggested_offset``: HU to add so that the volume passes (None when no
    shift does). ``facts``: DICOM attributes that bear on the units. ``message``: one line for
    users when not ok (None when ok).
    """

    ok: bool
    air_peak_hu: float | None
    tissue_peak_hu: float | None
    fractions: dict = field(default_factory=dict)
    value_range: tuple[float, float] = (0.0, 0.0)
    suggested_offset: float | None = None
    facts: dict = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    message: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["value_range"] = list(self.value_range)
        return d


def _sample(data: np.ndarray) -> np.ndarray:
    flat = np.asarray(data).reshape(-1)
    step = max(1, flat.size // MAX_SAMPLE)
    v = flat[::step].astype(np.float32, copy=False)
    return v[np.isfinite(v)]


def _mode(v: np.ndarray, lo: float, hi: float, bin_hu: float = 10.0) -> float | None:
    """Centre of the most populated 10 HU bin of ``v`` in [lo, hi) after a 5-bin smoothing."""
    if hi - lo < bin_hu:
        return None
    sel = v[(v >= lo) & (v < hi)]
    if sel.size == 0:
        return None
    edges = np.arange(lo, hi + bin_hu, bin_hu)
    h, _ = np.histogram(sel, bins=edges)
    h = np.convolve(h, np.array([1, 2, 3, 2, 1], float), mode="same")
    i = int(np.argmax(h))
    return float(edges[i] + bin_hu / 2)


def _frac(v: np.ndarray, lo: float, hi: float) -> float:
    return float(np.mean((v >= lo) & (v <= hi))) if v.size else 0.0


def _classify(v: np.ndarray) -> tuple[bool, float | None, float | None, dict, list[str]]:
    """(ok, air peak, tissue peak, fractions, reasons) for padding-free finite values ``v``."""
    reasons: list[str] = []
    air = _frac(v, *AIR_BAND)
    cont = _frac(v, *CONTINUUM_BAND)
    body = v[v > -500.0]
    tissue = _frac(body, *TISSUE_BAND)
    fr = {"air": round(air, 4), "continuum": round(cont, 4), "tissue_of_body": round(tissue, 4)}
    p2 = float(np.percentile(v, 2))
    low = _mode(v, p2 - 100.0, p2 + 400.0)
    tissue_peak = _mode(body, -500.0, 400.0) if body.size else None
    air_peak = low if (low is not None and AIR_BAND[0] <= low <= AIR_BAND[1] and air >= MIN_AIR) else None
    tissue_ok = tissue_peak is not None and TISSUE_BAND[0] <= tissue_peak <= TISSUE_BAND[1] and tissue >= MIN_TISSUE
    if air_peak is not None:
        ok = tissue_ok and cont >= MIN_CONTINUUM
        if not tissue_ok:
            where = "no voxels above -500" if tissue_peak is None else f"{tissue_peak:.0f}"
            reasons.append(f"soft tissue peaks at {where}, not in {TISSUE_BAND[0]:.0f}..{TISSUE_BAND[1]:.0f} HU")
        if cont < MIN_CONTINUUM:
            reasons.append(f"no values between air and soft tissue ({100 * cont:.2f} % of voxels in "
                           f"{CONTINUUM_BAND[0]:.0f}..{CONTINUUM_BAND[1]:.0f} HU; a CT has lung, fat and "
                           f"partial-volume voxels there)")
        return ok, air_peak, tissue_peak, fr, reasons
    below_air = _frac(v, -np.inf, AIR_BAND[0])
    if low is not None and -200.0 <= low <= 200.0 and _frac(v, -np.inf, AIR_BAND[1]) < MIN_AIR and tissue_ok:
        pair = _shifted_pair(v, low)
        if pair is None:
            return True, None, tissue_peak, {**fr, "note": "no air in the volume (cropped to the body?)"}, reasons
        reasons.append(f"air sits at {low:.0f} and soft tissue at {pair:.0f}, about 1000 higher: "
                       f"stored pixel values without the offset to HU")
        return False, None, tissue_peak, fr, reasons
    where = f"{low:.0f}" if low is not None else "?"
    reasons.append(f"no air peak near -1000 HU (lowest cluster at {where}"
                   + (f", {100 * below_air:.1f} % of voxels below -1100" if below_air > 0.01 else "") + ")")
    if tissue_peak is not None and not TISSUE_BAND[0] <= tissue_peak <= TISSUE_BAND[1]:
        reasons.append(f"body voxels peak at {tissue_peak:.0f}")
    return False, None, tissue_peak, fr, reasons


def _shifted_pair(v: np.ndarray, low: float) -> float | None:
    """The centre of a cluster 700..1400 above ``low`` that holds >= 15 % of the voxels (the
    soft tissue of a CT whose air ``low`` sits near 0: stored values without the offset)."""
    high = _mode(v, low + 700.0, low + 1400.0)
    if high is None or _frac(v, high - 150.0, high + 150.0) < 0.15:
        return None
    return high


def _suggest(v: np.ndarray) -> float | None:
    """An offset (HU) that makes ``v`` pass: a common storage offset first, else the shift that
    puts the lowest cluster at -1000 and the cluster ~1000 above it at 40 HU."""
    for off in COMMON_OFFSETS:
        if _classify(v + off)[0]:
            return off
    p2 = float(np.percentile(v, 2))
    low = _mode(v, p2 - 100.0, p2 + 400.0)
    if low is None:
        return None
    high = _shifted_pair(v, low)
    if high is None:
        return None
    est = float(np.round(((-1000.0 - low) + (40.0 - high)) / 2.0, -1))
    return est if _classify(v + est)[0] else None


def _first_dicom_file(vol) -> Path | None:
    meta = getattr(vol, "meta", {}) or {}
    files = meta.get("files_in_order") or []
    if files:
        return Path(files[0])
    src = getattr(vol, "source_path", None)
    if not src:
        return None
    p = Path(src)
    if p.is_file():
        name = p.name.lower()
        return None if name.endswith((".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")) else p
    if p.is_dir() and str(meta.get("format", "")).lower().startswith("dicom"):
        for q in sorted(p.rglob("*")):
            if q.is_file() and q.name.upper() != "DICOMDIR":
                return q
    return None


def _find(ds, keyword: str):
    """``keyword`` at the top level or in the first item of the shared / per-frame functional
    groups (Enhanced CT keeps rescale and real-world value mapping there)."""
    if keyword in ds:
        return ds.get(keyword)
    for seq_name in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        seq = ds.get(seq_name)
        if not seq:
            continue
        for grp in seq[0]:
            if grp.keyword == keyword:
                return grp.value
            if grp.VR == "SQ" and grp.value:
                item = grp.value[0]
                if keyword in item:
                    return item.get(keyword)
    return None


def dicom_intensity_facts(vol) -> dict:
    """DICOM attributes that tell the units of the pixel values of ``vol``: Modality, Image Type,
    Rescale Type (0028,1054), Rescale Intercept/Slope, and the units of a Real World Value Mapping
    (0040,9096). Taken from ``vol.meta`` when the reader stored them, else from the first DICOM
    file of the series (header only). Empty for non-DICOM volumes or unreadable headers."""
    meta = getattr(vol, "meta", {}) or {}
    facts = {k: meta[k] for k in ("modality", "image_type", "rescale_type", "units") if meta.get(k)}
    path = _first_dicom_file(vol)
    if path is None:
        return facts
    try:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:
        return facts
    if ds.get("Modality"):
        facts.setdefault("modality", str(ds.Modality))
    it = ds.get("ImageType") or _find(ds, "FrameType")
    if it:
        facts.setdefault("image_type", [str(x) for x in (it if not isinstance(it, str) else [it])])
    rt = _find(ds, "RescaleType")
    if rt:
        facts.setdefault("rescale_type", str(rt))
    for kw, key in (("RescaleIntercept", "rescale_intercept"), ("RescaleSlope", "rescale_slope")):
        val = _find(ds, kw)
        if val is not None and key not in facts:
            facts[key] = float(val)
    rwvm = _find(ds, "RealWorldValueMappingSequence")
    if rwvm:
        units = rwvm[0].get("MeasurementUnitsCodeSequence")
        if units:
            facts.setdefault("units", str(units[0].get("CodeMeaning") or units[0].get("CodeValue")))
        expl = rwvm[0].get("LUTExplanation")
        if expl:
            facts.setdefault("units_explanation", str(expl))
    return facts


def _facts_against_hu(facts: dict) -> list[str]:
    out = []
    mod = facts.get("modality")
    if mod and mod != "CT":
        out.append(f"Modality is {mod}, not CT")
    types = {str(t).upper() for t in facts.get("image_type") or []}
    derived = sorted(types & NON_HU_IMAGE_TYPES)
    if derived:
        out.append(f"Image Type says {'/'.join(derived)} (a derived map)")
    units = facts.get("units")
    if units and units.strip().lower() not in ("hu", "hounsfield unit", "hounsfield units", "[hnsf'u]"):
        out.append(f"Real World Value Mapping gives the values in {units}")
    return out


def check_hu(data: np.ndarray, facts: dict | None = None) -> HUCheck:
    """Check that ``data`` (any shape, values as read: HU after rescale) looks like a CT in HU.

    ``facts`` (from :func:`dicom_intensity_facts`) can fail the check on their own (a non-CT
    modality, a derived map, real-world units other than HU). Returns an :class:`HUCheck`; never
    raises for odd data (empty or non-finite data give ok=False with a reason).
    """
    facts = dict(facts or {})
    v = _sample(data)
    if v.size == 0:
        return HUCheck(False, None, None, reasons=["no finite voxel"], facts=facts,
                       message="intensities are not CT in HU: no finite voxel")
    vrange = (float(v.min()), float(v.max()))
    pad = float(np.mean(v < PADDING_BELOW))
    inside = v[v >= PADDING_BELOW]
    reasons: list[str] = []
    n_distinct = int(np.unique(v[:200_000]).size)
    if inside.size == 0 or n_distinct < MIN_DISTINCT:
        reasons.append(f"only {n_distinct} distinct values (a label map or mask?)" if inside.size
                       else "every voxel is below -1500 (padding)")
        ok, air, tis, fr = False, None, None, {}
    else:
        ok, air, tis, fr, rs = _classify(inside)
        reasons += rs
    fr["padding"] = round(pad, 4)
    against = _facts_against_hu(facts)
    reasons = against + reasons
    ok = ok and not against
    suggested = None
    if not ok and inside.size and n_distinct >= MIN_DISTINCT and not against:
        suggested = _suggest(inside)
    message = None
    if not ok:
        message = "intensities do not look like CT in HU: " + "; ".join(reasons)
        rt = facts.get("rescale_type")
        if rt and rt.upper() != "HU":
            message += (f" (Rescale Type {rt}, intercept {facts.get('rescale_intercept', '?'):g})"
                        if isinstance(facts.get("rescale_intercept"), float) else f" (Rescale Type {rt})")
        if suggested is not None:
            message += f"; adding {suggested:+g} HU gives a CT-like distribution"
    return HUCheck(ok=ok, air_peak_hu=air, tissue_peak_hu=tis, fractions=fr, value_range=vrange,
                   suggested_offset=suggested, facts=facts, reasons=reasons, message=message)
