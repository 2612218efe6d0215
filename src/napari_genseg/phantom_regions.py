"""Synthetic pelvis and thorax CT phantoms: the rest of the torso around the abdomen phantom.

They exist as *negatives* for the liver/spleen demo models (issue #8 §9): on a real
abdomen-pelvis CT an abdomen-only training set marks the urinary bladder, the gluteal muscles and
bowel as liver or spleen, and the heart is the other large soft-tissue organ a model may confuse
with them. Neither phantom contains liver or spleen.

Axis convention, affine, HU table and image formation are those of :mod:`napari_genseg.phantom`
(arrays ``(z, y, x)``; ``x`` toward the patient's LEFT, ``y`` toward POSTERIOR, ``z`` toward
SUPERIOR; ``affine = diag(-sx, -sy, sz)`` + translation, volume centre at RAS 0).

``region="pelvis"`` (femoral heads up to the iliac crests): thick subcutaneous fat, gluteal
muscles (posterior-lateral, 55 HU), iliopsoas, sacrum and iliac wings (upper slices), acetabula,
femoral heads and pubic symphysis (lower slices), urinary bladder (anterior midline; urine
5-20 HU, wall 40 HU), rectum/sigmoid with gas (posterior to the bladder), small-bowel loops
(upper pelvis), external iliac arteries and veins, and in about a third of the seeds a metal
hip prosthesis (3000 HU) in place of one femoral head, as in the project's real pelvis CT.

``region="thorax"`` (above the diaphragm): lungs (-850 HU) with vessels, heart (blood pool
40 HU native / 150 HU contrast-enhanced, myocardium 45 / 110 HU, pericardial fat), descending
aorta, vertebrae, sternum, ribs around the whole wall, pectoral muscles.

Labels: :data:`TORSO_CLASSES` = the abdomen classes + ``urinary_bladder`` (7), ``lung`` (8),
``heart`` (9), ``bowel`` (10). The training data maps labels by name, so a liver/spleen
model sees all of these as background.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .phantom import (
    _HU, BONE, PHANTOM_CLASSES, Phantom, _blob, _Grid, _Painter, _smooth_noise, _superellipse, phantom_affine,
)

__all__ = ["TORSO_CLASSES", "REGIONS", "make_region_phantom"]

TORSO_CLASSES: tuple[str, ...] = PHANTOM_CLASSES + ("urinary_bladder", "lung", "heart", "bowel")
BLADDER, LUNG, HEART, BOWEL = 7, 8, 9, 10
REGIONS = ("abdomen", "pelvis", "thorax")

# heart attenuation per phase: (blood pool, myocardium)
_HEART_HU = {"portal_venous": (150.0, 110.0), "native": (40.0, 45.0)}


def _body(g, rng, P, ratio, fat_range, wall_range):
    """Body outline, subcutaneous fat, muscular wall, visceral fat; returns geometry helpers."""
    nz, ny, nx = g.shape
    sz, sy, sx = g.spacing
    fov_y, fov_x = ny * sy, nx * sx
    U = lambda: rng.uniform(-1.0, 1.0)  # noqa: E731
    Bx = min(0.45 * fov_x * (1 + 0.04 * U()), 0.47 * fov_x)
    By = min(Bx * rng.uniform(*ratio), 0.44 * fov_y)
    cy0, cx0 = 0.02 * fov_y * U(), 0.015 * fov_x * U()
    Y2, X2 = g.y[:, None], g.x[None, :]
    zscale = 1.0 + 0.03 * np.sin(g.z / Bx * 2.0 + rng.uniform(0, 6.28))
    wobble = 0.025 * _smooth_noise(rng, (1, ny, nx), cells=5)[0]
    yy = np.where(Y2 > cy0, (Y2 - cy0) * 1.08, (Y2 - cy0)) + cy0
    r_body = _superellipse(yy, X2, cy0, cx0, By, Bx, rng.uniform(2.2, 2.6)) + wobble
    fat_t, wall_t = rng.uniform(*fat_range), rng.uniform(*wall_range)
    zs = zscale[:, None, None]
    body = r_body[None] < zs ** 2
    inner = r_body[None] < (zs * (1 - fat_t)) ** 2
    cavity = r_body[None] < (zs * (1 - fat_t - wall_t)) ** 2
    full = (slice(None),) * 3
    P.paint(full, body, -100.0)
    P.paint(full, inner & ~cavity, 55.0)
    P.paint(full, cavity, -95.0 + 8.0 * _smooth_noise(rng, g.shape, cells=6))
    P.paint(full, body & ~(r_body[None] < (zs * 0.985) ** 2), 30.0)
    return dict(Bx=Bx, By=By, cy0=cy0, cx0=cx0, b=Bx, body=body, inner=inner, cavity=cavity,
                px=lambda u: cx0 + u * Bx, py=lambda v: cy0 + v * By, fat_t=fat_t, wall_t=wall_t, zscale=zscale)


def _spine(g, rng, P, geo, lab_bone=True):
    """Vertebral bodies with discs, canal and posterior elements (labelled bone)."""
    b, py, px = geo["b"], geo["py"], geo["px"]
    Y2, X2 = g.y[:, None], g.x[None, :]
    vb_c = (py(rng.uniform(0.22, 0.3)), px(0.0))
    vb_r = 0.13 * b * rng.uniform(0.93, 1.07)
    period = 0.19 * b
    in_disc = ((g.z - rng.uniform(0, period)) % period) < 0.05 * b
    d = np.hypot(Y2 - vb_c[0], (X2 - vb_c[1]) / 1.12)
    vb, canc = d < vb_r, d < vb_r - max(2.0, 0.015 * b)
    canal_c = vb_c[0] + vb_r + 0.06 * b
    canal = np.hypot(Y2 - canal_c, X2 - vb_c[1]) < 0.055 * b
    arch = (np.hypot(Y2 - canal_c, X2 - vb_c[1]) < 0.09 * b) & ~canal & (Y2 > vb_c[0] + vb_r * 0.8)
    spinous = (np.abs(X2 - vb_c[1]) < 0.025 * b) & (Y2 > canal_c) & (Y2 < canal_c + 0.26 * b)
    cort, canc_hu = rng.uniform(700, 900), rng.uniform(220, 280)
    for k in range(g.shape[0]):
        if in_disc[k]:
            P.hu[k][vb] = 85.0
            P.hu[k][canal] = 15.0
            continue
        post = (arch | spinous) & geo["inner"][k]
        P.hu[k][vb] = cort
        P.hu[k][canc] = canc_hu
        P.hu[k][post] = cort * 0.8
        P.hu[k][canal] = 15.0
        if lab_bone:
            P.lab[k][vb | post] = BONE
    return vb_c, vb_r


def _bone_blob(P, g, rng, sl, f, cavity_or_body, cortical=(650.0, 850.0), marrow=(180.0, 280.0)):
    """Cortical shell + cancellous core of a blob, labelled bone."""
    if sl is None:
        return
    inside = (f < 1) & cavity_or_body[sl]
    P.paint(sl, inside, rng.uniform(*cortical), BONE)
    P.paint(sl, inside & (f < 0.6), rng.uniform(*marrow))


def _gut(g, rng, P, sl, f, cavity, wall_hu, wall_frac=0.6, gas_p=0.5):
    """Bowel loop: wall, fluid lumen, gas rising anteriorly; labelled bowel."""
    if sl is None:
        return
    inside = (f < 1) & cavity[sl]
    lumen = (f < wall_frac) & inside
    P.paint(sl, inside, wall_hu, BOWEL)
    P.paint(sl, lumen, rng.uniform(10, 30))
    if rng.random() < gas_p and lumen.any():
        ys = np.nonzero(lumen.any(axis=(0, 2)))[0]
        yv = g.y[sl[1]]
        level = yv[ys[0]] + rng.uniform(0.2, 0.6) * (yv[ys[-1]] - yv[ys[0]])
        P.paint(sl, lumen & (yv[None, :, None] < level), -1000.0)


def _pelvis(g, rng, P, H):
    geo = _body(g, rng, P, ratio=(0.66, 0.76), fat_range=(0.12, 0.2), wall_range=(0.04, 0.06))
    b, py, px, cavity, inner, body = geo["b"], geo["py"], geo["px"], geo["cavity"], geo["inner"], geo["body"]
    Y3, X3 = g.y[None, :, None], g.x[None, None, :]
    zlo, zhi = float(g.z[0]), float(g.z[-1])
    span = max(zhi - zlo, 1e-3)
    t = ((g.z - zlo) / span)[:, None, None]  # 0 at the hips, 1 at the iliac crests
    # gluteal muscles: large, posterior-lateral, bigger toward the hips
    for side in (-1, 1):
        ry = (0.3 - 0.08 * t) * geo["By"]
        rx = (0.32 - 0.1 * t) * geo["Bx"]
        cy, cx = py(0.5), px(side * (0.5 + 0.05 * t))
        m = ((Y3 - cy) / ry) ** 2 + ((X3 - cx) / rx) ** 2 < 1
        P.paint((slice(None),) * 3, m & inner, 55.0 + 4 * rng.uniform(-1, 1))
    # iliopsoas (anterior to the iliac wings)
    for side in (-1, 1):
        m = ((Y3 - py(-0.02)) / (0.12 * b)) ** 2 + ((X3 - px(side * 0.42)) / (0.1 * b)) ** 2 < 1
        P.paint((slice(None),) * 3, m & cavity, 55.0)
    # spine only in the upper third (L5); sacrum below it
    vb_c, vb_r = _spine(g, rng, P, geo)
    low = g.z < zlo + 0.66 * span
    P.hu[low] = np.where(P.lab[low] == BONE, -95.0, P.hu[low])
    P.lab[low] = np.where(P.lab[low] == BONE, 0, P.lab[low])
    # sacrum: posterior midline plate, curving posteriorly toward the hips
    for k in np.nonzero(low)[0]:
        tk = float(t[k, 0, 0])
        cy = py(0.3 + 0.15 * (1 - tk))
        m = ((Y3[0] - cy) / (0.08 * b)) ** 2 + ((X3[0] - px(0)) / ((0.15 + 0.08 * tk) * b)) ** 2 < 1
        if tk > 0.15:
            P.paint((slice(k, k + 1), slice(None), slice(None)), m[None] & inner[k:k + 1], 600.0, BONE)
            P.paint((slice(k, k + 1), slice(None), slice(None)),
                    (((Y3[0] - cy) / (0.05 * b)) ** 2 + ((X3[0] - px(0)) / ((0.1 + 0.06 * tk) * b)) ** 2 < 1)[None]
                    & inner[k:k + 1], 240.0)
    # iliac wings: curved plates from the sacroiliac joints sweeping antero-laterally (upper pelvis)
    for side in (-1, 1):
        for k in range(g.shape[0]):
            tk = float(t[k, 0, 0])
            if tk < 0.35:
                continue
            s = np.linspace(0.0, 1.0, 40)
            ys = py(0.3 - 0.45 * s - 0.1 * s * s)
            xs = px(side * (0.2 + 0.42 * s * (0.6 + 0.4 * tk)))
            wing = np.zeros(g.shape[1:], bool)
            th = max(0.025 * b, 1.2 * g.spacing[2])
            for yy, xx in zip(ys, xs):
                wing |= (Y3[0] - yy) ** 2 + (X3[0] - xx) ** 2 < th ** 2
            wing &= inner[k]
            P.hu[k][wing] = rng.uniform(550, 750)
            P.lab[k][wing] = BONE
    # acetabula + femoral heads (lower pelvis); a metal prosthesis in about a third of the seeds
    prosthesis_side = int(rng.choice([-1, 1])) if rng.random() < 0.35 else 0
    for side in (-1, 1):
        c = (zlo + 0.12 * span, py(0.05), px(side * 0.55))
        sl, f = _blob(g, rng, c, (0.13 * b, 0.12 * b, 0.12 * b), noise=0.05)
        if side == prosthesis_side and sl is not None:
            P.paint(sl, (f < 1) & body[sl], 3000.0, BONE)
        else:
            _bone_blob(P, g, rng, sl, f, body)
        c2 = (zlo + 0.3 * span, py(0.1), px(side * 0.5))
        sl2, f2 = _blob(g, rng, c2, (0.12 * b, 0.15 * b, 0.08 * b), noise=0.1)
        _bone_blob(P, g, rng, sl2, f2, inner)
    # pubic symphysis (anterior, lowest slices)
    sl, f = _blob(g, rng, (zlo + 0.05 * span, py(-0.6), px(0.0)), (0.12 * b, 0.07 * b, 0.25 * b), noise=0.1)
    _bone_blob(P, g, rng, sl, f, inner)
    # external iliac vessels
    for side in (-1, 1):
        for dx, hu, r in ((0.0, H["aorta"], 0.035), (0.07, H["ivc"], 0.04)):
            m = ((Y3 - py(-0.1)) ** 2 + (X3 - px(side * (0.3 + dx))) ** 2) < (r * b) ** 2
            P.paint((slice(None),) * 3, np.broadcast_to(m, g.shape) & cavity, hu)
    # urinary bladder: anterior midline, lower two thirds; urine + thin wall
    c = (zlo + rng.uniform(0.25, 0.4) * span, py(-0.35 + 0.05 * rng.uniform(-1, 1)), px(0.03 * rng.uniform(-1, 1)))
    semi = (rng.uniform(0.2, 0.3) * b, rng.uniform(0.17, 0.24) * b, rng.uniform(0.22, 0.3) * b)
    sl, f = _blob(g, rng, c, semi, noise=0.08)
    if sl is not None:
        bl = (f < 1) & cavity[sl] & (P.lab[sl] != BONE)
        P.paint(sl, bl, 40.0, BLADDER)
        P.paint(sl, bl & (f < 0.8), rng.uniform(5.0, 20.0))
    # rectum / sigmoid: posterior to the bladder, anterior to the sacrum
    c = (zlo + 0.45 * span, py(0.12), px(0.05 * rng.uniform(-1, 1)))
    sl, f = _blob(g, rng, c, (0.55 * span, 0.08 * b, 0.09 * b), noise=0.2, cells=4)
    if sl is not None:
        _gut(g, rng, P, sl, f, cavity & (P.lab != BONE) & (P.lab != BLADDER), H["wall"], gas_p=0.7)
    # small-bowel loops in the upper pelvis
    for _ in range(int(rng.integers(6, 11))):
        c = (zlo + rng.uniform(0.5, 1.0) * span, py(rng.uniform(-0.55, 0.05)), px(rng.uniform(-0.4, 0.4)))
        sl, f = _blob(g, rng, c, (rng.uniform(0.05, 0.1) * b,) * 3, noise=0.25, cells=3)
        if sl is not None:
            _gut(g, rng, P, sl, f, cavity & ~np.isin(P.lab, (BONE, BLADDER)), H["wall"], wall_frac=0.5, gas_p=0.3)
    return dict(body_half_width_mm=float(geo["Bx"]), prosthesis_side=prosthesis_side)


def _thorax(g, rng, P, H, phase):
    geo = _body(g, rng, P, ratio=(0.62, 0.72), fat_range=(0.05, 0.1), wall_range=(0.06, 0.08))
    b, py, px, cavity, inner = geo["b"], geo["py"], geo["px"], geo["cavity"], geo["inner"]
    Y2, X2 = g.y[:, None], g.x[None, :]
    vb_c, vb_r = _spine(g, rng, P, geo)
    # lungs: most of the cavity on both sides of the mediastinum
    med_half = rng.uniform(0.14, 0.2) * geo["Bx"]
    lung = np.zeros(g.shape, bool)
    for side in (-1, 1):
        c = (0.0, py(0.0), px(side * 0.5))
        sl, f = _blob(g, rng, c, (2.0 * b, 0.85 * geo["By"], 0.48 * geo["Bx"]), noise=0.08, cells=4)
        if sl is not None:
            m = np.zeros(g.shape, bool)
            m[sl] = f < 1
            lung |= m & cavity & (side * (g.x[None, None, :] - px(0)) > med_half)
    lung &= P.lab != BONE
    P.paint((slice(None),) * 3, lung, -850.0 + 25.0 * _smooth_noise(rng, g.shape, 6), LUNG)
    # pulmonary vessels: thin bright tubes inside the lungs
    n1, n2 = _smooth_noise(rng, g.shape, 6), _smooth_noise(rng, g.shape, 6)
    ves = (np.abs(n1) < 0.06) & (np.abs(n2) < 0.1) & ndi.binary_erosion(lung, iterations=2)
    P.paint((slice(None),) * 3, ves, rng.uniform(30.0, 120.0))
    # heart: anterior, left of the midline, pericardial fat around it
    blood, myo = _HEART_HU[phase]
    c = (float(g.z[0]) + rng.uniform(0.2, 0.4) * (float(g.z[-1]) - float(g.z[0])), py(-0.25), px(0.12))
    semi = (rng.uniform(0.35, 0.45) * b, rng.uniform(0.3, 0.38) * geo["By"], rng.uniform(0.28, 0.34) * b)
    sl, f = _blob(g, rng, c, semi, rot_deg=rng.uniform(-35, -15), noise=0.08)
    if sl is not None:
        region = cavity[sl] & (P.lab[sl] != BONE)
        P.paint(sl, (f < 1.25) & region, -90.0, 0)
        heart = (f < 1) & region
        P.paint(sl, heart, myo, HEART)
        P.paint(sl, heart & (f < 0.6), blood)
    # descending aorta (left of the spine) and sternum (anterior midline)
    m = np.hypot(Y2 - (vb_c[0] - 0.02 * b), X2 - (vb_c[1] + vb_r + 0.06 * b)) < 0.06 * b
    P.paint((slice(None),) * 3, np.broadcast_to(m, g.shape) & cavity, H["aorta"])
    st = ((Y2 - py(-0.9)) / (0.04 * b)) ** 2 + ((X2 - px(0)) / (0.1 * b)) ** 2 < 1
    P.paint((slice(None),) * 3, np.broadcast_to(st, g.shape) & geo["body"], rng.uniform(500, 700), BONE)
    # pectoral muscles (anterior-lateral, outside the ribs)
    for side in (-1, 1):
        m = ((Y2 - py(-0.8)) / (0.12 * geo["By"])) ** 2 + ((X2 - px(side * 0.42)) / (0.3 * geo["Bx"])) ** 2 < 1
        P.paint((slice(None),) * 3, np.broadcast_to(m, g.shape) & geo["body"] & ~inner, 55.0)
    # ribs: cross-sections around the whole wall on every slice
    ring = 1 - geo["fat_t"] - geo["wall_t"] * 0.5
    rib_r = max(0.03 * b, 1.2 * min(g.spacing[1:]))
    for k in range(g.shape[0]):
        phase_k = rng.uniform(0, 0.3)
        for side in (-1, 1):
            for ang in np.arange(0.35 + phase_k, 2.8, 0.38):
                cy = geo["cy0"] + np.cos(ang) * geo["By"] * ring * geo["zscale"][k]
                cx = geo["cx0"] + side * np.sin(ang) * geo["Bx"] * ring * geo["zscale"][k]
                if cy > geo["cy0"]:
                    cy = geo["cy0"] + (cy - geo["cy0"]) / 1.08
                rib = (Y2 - cy) ** 2 + (X2 - cx) ** 2 < rib_r ** 2
                P.hu[k][rib] = rng.uniform(600, 800)
                P.lab[k][rib] = BONE
    return dict(body_half_width_mm=float(geo["Bx"]))


def make_region_phantom(
    seed: int = 0,
    region: str = "pelvis",
    shape: tuple[int, int, int] = (40, 160, 160),
    spacing: tuple[float, float, float] = (3.0, 1.5, 1.5),
    noise_hu: float = 15.0,
    *,
    phase: str = "portal_venous",
) -> Phantom:
    """A deterministic pelvis or thorax CT phantom (see module docstring).

    Args:
        seed: random seed; the same seed gives the same volume.
        region: ``"pelvis"`` or ``"thorax"`` (``"abdomen"`` is :func:`napari_genseg.phantom.make_phantom`).
        shape: ``(z, y, x)`` voxels; spacing ``(sz, sy, sx)`` in mm.
        noise_hu: standard deviation of the additive Gaussian noise (HU).
        phase: ``"portal_venous"`` or ``"native"`` (enhancement of vessels, bowel wall and heart).

    Returns:
        :class:`~napari_genseg.phantom.Phantom` with ``class_names = TORSO_CLASSES``, int16 HU image
        clipped to [-1024, 3071], no lesion annotations; ``meta["region"]`` names the region.

    Raises:
        ValueError: unknown region or phase, or shape/spacing not 3-D.
    """
    if region not in ("pelvis", "thorax"):
        raise ValueError(f"region must be 'pelvis' or 'thorax' (abdomen: make_phantom), not {region!r}")
    if phase not in _HU:
        raise ValueError(f"phase must be one of {sorted(_HU)}")
    if len(shape) != 3 or len(spacing) != 3:
        raise ValueError("shape and spacing must be (z, y, x)")
    # a seed stream of its own per region, so seed 0 of each region is a different patient
    rng = np.random.default_rng([int(seed), REGIONS.index(region)])
    g = _Grid(shape, spacing)
    P = _Painter(g)
    H = _HU[phase]
    extra = _pelvis(g, rng, P, H) if region == "pelvis" else _thorax(g, rng, P, H, phase)
    img = ndi.gaussian_filter(P.hu, sigma=(0.4, 0.6, 0.6), mode="nearest")
    if noise_hu > 0:
        img += rng.standard_normal(g.shape, dtype=np.float32) * np.float32(noise_hu)
    img = np.clip(np.rint(img), -1024, 3071).astype(np.int16)
    meta = dict(seed=int(seed), region=region, phase=phase, noise_hu=float(noise_hu), **extra)
    return Phantom(image=img, labels=P.lab, spacing=tuple(float(s) for s in g.spacing),
                   affine=phantom_affine(g.shape, g.spacing), class_names=TORSO_CLASSES,
                   lesion_annotations=None, meta=meta)
