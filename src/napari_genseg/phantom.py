"""Deterministic synthetic abdomen CT phantom (HU) with labels and multi-annotator lesion masks.

Axis convention (the project's): arrays are ``(z, y, x)``; ``x`` index increases toward the
patient's LEFT (liver at low ``x``, spleen at high ``x``), ``y`` increases toward POSTERIOR
(anterior abdominal wall at row 0, spine at high ``y``), ``z`` increases toward SUPERIOR.
``spacing = (sz, sy, sx)`` in mm; ``affine = diag(-sx, -sy, sz)`` (+ translation) maps voxel
indices ``(i=x, j=y, k=z)`` to RAS mm (nibabel convention); the volume centre maps to RAS (0,0,0).

Anatomy (positions relative to the body outline, sizes scaled with the body width, shapes jittered
by seed with smooth random fields): skin/subcutaneous fat, muscular wall, visceral fat, liver
(right, with a left lobe reaching across the midline anteriorly, hepatic/portal vessel tree,
gallbladder), spleen (left posterior), kidneys (posterior, perirenal fat, cortex/medulla, sinus fat,
right kidney lower than left), aorta, IVC, pancreas, stomach with an air-fluid level, colon and small
bowel with gas, vertebral column (bodies, discs, canal, posterior elements), paraspinal and psoas
muscles, ribs, lung bases at the top, and 1-4 hypodense liver lesions.

Attenuation (HU) used, ``phase="portal_venous"`` (default; typical values ~70 s after contrast)::

    air -1000, lung -850, fat -100 (subcutaneous) / -95 (visceral), muscle 55
    liver 105 +- 8, hepatic & portal veins 170, lesions liver - 30..40 (about 70)
    spleen 118 +- 6 (slightly above liver, as in portal venous phase)
    kidney cortex 175, medulla 150, renal sinus fat -80, aorta 165, IVC 140, pancreas 95
    stomach / bowel wall 80, fluid contents 15-25, gas -1000, gallbladder 10
    bone: cortical 700-900, cancellous (vertebral body) 220-280, rib marrow 250, disc 85, canal 15

``phase="native"`` (non-contrast): liver 58, spleen 46, kidney 32/28, vessels 42, pancreas 40,
bowel wall 40, lesions liver - 30 (bone/fat/air unchanged).

Labels (``PHANTOM_CLASSES`` indices): 0 background, 1 liver (incl. intrahepatic vessels),
2 spleen, 3 kidney_right, 4 kidney_left, 5 bone (vertebrae incl. posterior elements, ribs; not
discs), 6 liver_lesion. The lesion label is the strict-majority consensus (mean > 0.5) of the
simulated annotators (or the true lesion when ``n_annotators == 0``), restricted to the liver.

Image formation: piecewise-constant tissue map -> mild Gaussian blur (partial volume,
sigma ~0.6 voxel in-plane) -> additive white Gaussian noise (``noise_hu``) -> int16, clipped to
[-1024, 3071].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

__all__ = ["PHANTOM_CLASSES", "Phantom", "make_phantom", "phantom_sample_data", "phantom_affine"]

PHANTOM_CLASSES: tuple[str, ...] = (
    "background",
    "liver",
    "spleen",
    "kidney_right",
    "kidney_left",
    "bone",
    "liver_lesion",
)
BG, LIVER, SPLEEN, KID_R, KID_L, BONE, LESION = range(7)


@dataclass
class Phantom:
    image: np.ndarray  # (z, y, x) int16 HU
    labels: np.ndarray  # (z, y, x) uint8, ids = PHANTOM_CLASSES indices
    spacing: tuple[float, float, float]  # (sz, sy, sx) mm
    affine: np.ndarray  # (4, 4) float64, voxel (x, y, z) -> RAS mm
    class_names: tuple[str, ...] = PHANTOM_CLASSES
    lesion_annotations: np.ndarray | None = None  # (A, z, y, x) bool
    meta: dict = field(default_factory=dict)

    def to_volume(self):
        """The CT as the project's ``Volume`` (the one Phantom -> Volume conversion).

        ``image`` is already in the display axes (z, y, x) = (S, P, L); ``affine`` maps the NIfTI
        voxel order (x, y, z) to RAS, so the array goes through ``io.nifti.volume_from_array`` in
        that order and the Volume gets the same spacing, origin, source affine and orientation as
        the phantom written to NIfTI and read back. Labels share the geometry:
        ``ph.to_volume().with_data(ph.labels)``.
        """
        from .io.nifti import volume_from_array  # lazy: this module imports only numpy/scipy

        return volume_from_array(np.transpose(self.image, (2, 1, 0)), self.affine,
                                 meta={"format": "phantom", "phantom": dict(self.meta)})


_HU = {
    "portal_venous": dict(
        liver=105.0, liver_sd=8.0, vessel=170.0, spleen=118.0, spleen_sd=6.0,
        kid_cortex=175.0, kid_medulla=150.0, aorta=165.0, ivc=140.0, pancreas=95.0,
        wall=80.0, lesion_drop=(30.0, 40.0),
    ),
    "native": dict(
        liver=58.0, liver_sd=5.0, vessel=42.0, spleen=46.0, spleen_sd=4.0,
        kid_cortex=32.0, kid_medulla=28.0, aorta=42.0, ivc=40.0, pancreas=40.0,
        wall=40.0, lesion_drop=(25.0, 35.0),
    ),
}


def phantom_affine(shape, spacing) -> np.ndarray:
    """RAS affine ``diag(-sx, -sy, sz)`` for voxel ``(x, y, z)``; the volume centre maps to 0."""
    nz, ny, nx = shape
    sz, sy, sx = spacing
    aff = np.diag([-sx, -sy, sz, 1.0]).astype(np.float64)
    aff[:3, 3] = [sx * (nx - 1) / 2.0, sy * (ny - 1) / 2.0, -sz * (nz - 1) / 2.0]
    return aff


# ------------------------------------------------------------------------------------------------
# small geometry helpers (all coordinates in mm relative to the volume centre;
# X toward patient left, Y toward posterior, Z toward superior)
# ------------------------------------------------------------------------------------------------
class _Grid:
    def __init__(self, shape, spacing):
        self.shape = tuple(int(s) for s in shape)
        self.spacing = tuple(float(s) for s in spacing)
        nz, ny, nx = self.shape
        sz, sy, sx = self.spacing
        self.z = ((np.arange(nz) - (nz - 1) / 2.0) * sz).astype(np.float32)
        self.y = ((np.arange(ny) - (ny - 1) / 2.0) * sy).astype(np.float32)
        self.x = ((np.arange(nx) - (nx - 1) / 2.0) * sx).astype(np.float32)

    def box(self, center, half):
        """Index slices covering centre +- half (mm, per axis z, y, x), clipped; None if empty."""
        sl = []
        for c, h, coords, s in zip(center, half, (self.z, self.y, self.x), self.spacing):
            lo = int(np.floor((c - h - coords[0]) / s))
            hi = int(np.ceil((c + h - coords[0]) / s)) + 1
            lo, hi = max(lo, 0), min(hi, len(coords))
            if hi <= lo:
                return None
            sl.append(slice(lo, hi))
        return tuple(sl)

    def coords(self, sl):
        return (
            self.z[sl[0]][:, None, None],
            self.y[sl[1]][None, :, None],
            self.x[sl[2]][None, None, :],
        )


def _bspline_matrix(n: int, c: int) -> np.ndarray:
    """(n, c) cubic B-spline interpolation weights from c coarse nodes to n fine samples."""
    t = np.linspace(1.0, c - 2.0, n) if n > 1 else np.array([(c - 1) / 2.0])
    x = np.abs(t[:, None] - np.arange(c)[None, :])
    w = np.where(x < 1, 2.0 / 3.0 - x**2 + 0.5 * x**3, np.where(x < 2, (2.0 - x) ** 3 / 6.0, 0.0))
    return w.astype(np.float32)


def _smooth_noise(rng, shape, cells=4):
    """Smooth random field with unit std on ``shape``: a coarse random grid (about ``cells``
    nodes per axis) upsampled separably with cubic B-splines (fast: three small matmuls)."""
    shape = tuple(int(s) for s in shape)
    cs = tuple(max(2, min(cells, s)) + 2 for s in shape)
    out = rng.standard_normal(cs).astype(np.float32)
    for ax, (n, c) in enumerate(zip(shape, cs)):
        w = _bspline_matrix(n, c)
        out = np.moveaxis(np.tensordot(w, np.moveaxis(out, ax, 0), axes=(1, 0)), 0, ax)
    sd = float(out.std())
    return out / sd if sd > 1e-6 else out


class _Painter:
    """Paints HU / label values into the volumes; later calls overwrite earlier ones."""

    def __init__(self, grid: _Grid):
        self.g = grid
        self.hu = np.full(grid.shape, -1000.0, np.float32)
        self.lab = np.zeros(grid.shape, np.uint8)

    def paint(self, sl, mask, hu, label=None):
        if sl is None or not mask.any():
            return
        h = self.hu[sl]
        if np.ndim(hu) == 0:
            h[mask] = hu
        else:
            h[mask] = np.broadcast_to(hu, mask.shape)[mask]
        if label is not None:
            self.lab[sl][mask] = label


def _blob(grid, rng, center, semi, rot_deg=0.0, noise=0.15, cells=4, pad=1.3, tilt_deg=0.0):
    """Ellipsoid implicit field ``f`` (<1 inside) perturbed by smooth noise, on a crop.

    ``center``/``semi`` in mm as (z, y, x); ``rot_deg`` rotates in the axial (y, x) plane,
    ``tilt_deg`` in the coronal (z, x) plane. Returns ``(slices, f)`` or ``(None, None)``.
    """
    half = [s * pad for s in semi]
    if rot_deg and tilt_deg:
        half = [max(half)] * 3
    elif rot_deg:
        half[1] = half[2] = max(half[1], half[2])
    elif tilt_deg:
        half[0] = half[2] = max(half[0], half[2])
    sl = grid.box(center, half)
    if sl is None:
        return None, None
    Z, Y, X = grid.coords(sl)
    dz, dy, dx = Z - center[0], Y - center[1], X - center[2]
    if rot_deg:
        t = np.deg2rad(rot_deg)
        c, s = np.float32(np.cos(t)), np.float32(np.sin(t))
        dx, dy = c * dx + s * dy, -s * dx + c * dy
    if tilt_deg:
        t = np.deg2rad(tilt_deg)
        c, s = np.float32(np.cos(t)), np.float32(np.sin(t))
        dx, dz = c * dx + s * dz, -s * dx + c * dz
    f = (dz / semi[0]) ** 2 + (dy / semi[1]) ** 2 + (dx / semi[2]) ** 2
    f = np.broadcast_to(f, tuple(s.stop - s.start for s in sl)).astype(np.float32)
    if noise:
        f = f + noise * _smooth_noise(rng, f.shape, cells)
    return sl, f


def _superellipse(y, x, cy, cx, ay, ax, p):
    return (np.abs((y - cy) / ay) ** p + np.abs((x - cx) / ax) ** p) ** (2.0 / p)


# ------------------------------------------------------------------------------------------------
# the phantom
# ------------------------------------------------------------------------------------------------
def make_phantom(
    seed: int = 0,
    shape: tuple[int, int, int] = (40, 160, 160),
    spacing: tuple[float, float, float] = (3.0, 1.5, 1.5),
    n_annotators: int = 4,
    noise_hu: float = 15.0,
    *,
    phase: str = "portal_venous",
    region: str = "abdomen",
) -> Phantom:
    """Build a synthetic abdomen CT (see module docstring). Deterministic for a given ``seed``.

    ``region="pelvis"`` or ``"thorax"`` builds the neighbouring part of the torso instead
    (:func:`napari_genseg.phantom_regions.make_region_phantom`; no liver or spleen, labels in
    ``TORSO_CLASSES``; ``n_annotators`` is ignored there). Raises ValueError for an unknown
    region or phase.
    """
    if region != "abdomen":
        from .phantom_regions import make_region_phantom

        return make_region_phantom(seed, region, shape, spacing, noise_hu, phase=phase)
    if phase not in _HU:
        raise ValueError(f"phase must be one of {sorted(_HU)}")
    if len(shape) != 3 or len(spacing) != 3:
        raise ValueError("shape and spacing must be (z, y, x)")
    H = _HU[phase]
    rng = np.random.default_rng(seed)
    g = _Grid(shape, spacing)
    P = _Painter(g)
    nz, ny, nx = g.shape
    sz, sy, sx = g.spacing
    fov_y, fov_x = ny * sy, nx * sx
    U = lambda: rng.uniform(-1.0, 1.0)  # noqa: E731

    # ---- body outline (same axial outline on every slice, slowly varying in size) -------------
    Bx = min(0.45 * fov_x * (1 + 0.04 * U()), 0.47 * fov_x)
    By = min(Bx * rng.uniform(0.74, 0.82), 0.44 * fov_y)
    cy0 = 0.02 * fov_y * U()
    cx0 = 0.015 * fov_x * U()
    b = Bx  # isotropic size unit (adult body half-width ~ 170 mm)
    px = lambda u: cx0 + u * Bx  # noqa: E731  position helpers (normalised body coords)
    py = lambda v: cy0 + v * By  # noqa: E731
    pz = lambda w: w * b  # noqa: E731

    Y2 = g.y[:, None]
    X2 = g.x[None, :]
    zscale = 1.0 + 0.03 * np.sin(g.z / b * 2.0 + rng.uniform(0, 6.28))  # slow girth change
    wobble = 0.025 * _smooth_noise(rng, (1, ny, nx), cells=5)[0]
    p_exp = rng.uniform(2.2, 2.6)
    # posterior flattening: stretch the posterior half a little less
    yy = np.where(Y2 > cy0, (Y2 - cy0) * 1.08, (Y2 - cy0)) + cy0
    r_body = _superellipse(yy, X2, cy0, cx0, By, Bx, p_exp) + wobble  # (ny, nx), 1 at skin
    fat_t = rng.uniform(0.08, 0.16)  # subcutaneous fat thickness (fraction of body radius)
    wall_t = rng.uniform(0.05, 0.07)
    body3 = r_body[None] < zscale[:, None, None] ** 2
    inner_wall = r_body[None] < (zscale[:, None, None] * (1 - fat_t)) ** 2
    cavity = r_body[None] < (zscale[:, None, None] * (1 - fat_t - wall_t)) ** 2
    full = (slice(None),) * 3
    P.paint(full, body3, -100.0)
    P.paint(full, inner_wall & ~cavity, 55.0)
    vis_fat = -95.0 + 8.0 * _smooth_noise(rng, g.shape, cells=6)
    P.paint(full, cavity, vis_fat)
    # skin: thin brighter rim
    skin = body3 & ~(r_body[None] < (zscale[:, None, None] * 0.985) ** 2)
    P.paint(full, skin, 30.0)

    Z3, Y3, X3 = g.z[:, None, None], g.y[None, :, None], g.x[None, None, :]

    # ---- lung bases (top of the volume, posterior-lateral) ----------------------------------
    z_top = g.z[-1]
    for side in (-1, 1):
        c = (z_top + rng.uniform(0.05, 0.2) * b, py(0.25), px(side * 0.5))
        sl, f = _blob(g, rng, c, (0.28 * b, 0.38 * By, 0.33 * Bx), noise=0.1)
        if sl is not None:
            P.paint(sl, (f < 1) & cavity[sl], -850.0)

    # ---- spine and paraspinal muscles ---------------------------------------------------------
    vb_c = (py(rng.uniform(0.22, 0.3)), px(0.0))
    vb_r = 0.13 * b * rng.uniform(0.93, 1.07)
    # paraspinal muscles (posterior to the spine)
    for side in (-1, 1):
        m = ((Y2 - py(0.66)) / (0.22 * By)) ** 2 + ((X2 - px(side * 0.2)) / (0.17 * Bx)) ** 2 < 1
        P.paint(full, np.broadcast_to(m[None], g.shape) & inner_wall, 55.0)
    # psoas: grows inferiorly
    for side in (-1, 1):
        rad = (0.03 + 0.07 * np.clip(-(g.z / b) + 0.25, 0, 1.2)) * b
        m = ((Y3 - (vb_c[0] + 0.1 * b)) ** 2 + (X3 - (px(0) + side * (vb_r + 0.7 * rad[:, None, None]))) ** 2) < (
            rad[:, None, None] ** 2
        )
        P.paint(full, m & cavity, 55.0)
    spine_lab = np.zeros(g.shape, bool)
    # vertebral bodies with discs: period ~0.19 b, disc ~0.05 b
    period = 0.19 * b
    phase_z = rng.uniform(0, period)
    in_disc = ((g.z - phase_z) % period) < 0.05 * b
    d_vb = np.sqrt(((Y2 - vb_c[0]) / 1.0) ** 2 + ((X2 - vb_c[1]) / 1.12) ** 2)
    vb = d_vb < vb_r
    vb_cancellous = d_vb < vb_r - max(2.0, 0.015 * b)
    canal_c = vb_c[0] + vb_r + 0.06 * b
    canal = ((Y2 - canal_c) ** 2 + (X2 - vb_c[1]) ** 2) < (0.055 * b) ** 2
    arch = (((Y2 - canal_c) ** 2 + (X2 - vb_c[1]) ** 2) < (0.09 * b) ** 2) & ~canal & (Y2 > vb_c[0] + vb_r * 0.8)
    spinous = (np.abs(X2 - vb_c[1]) < 0.025 * b) & (Y2 > canal_c) & (Y2 < canal_c + 0.26 * b)
    transverse = (np.abs(Y2 - canal_c + 0.01 * b) < 0.025 * b) & (np.abs(X2 - vb_c[1]) < 0.24 * b) & ~canal & (
        np.abs(X2 - vb_c[1]) > 0.05 * b
    )
    cort_hu = rng.uniform(700, 900)
    canc_hu = rng.uniform(220, 280)
    for k in range(nz):
        if in_disc[k]:
            P.hu[k][vb] = 85.0
            P.hu[k][canal] = 15.0
            continue
        P.hu[k][vb] = cort_hu
        P.hu[k][vb_cancellous] = canc_hu
        post = (arch | spinous | transverse) & inner_wall[k]
        P.hu[k][post] = cort_hu * 0.8
        P.hu[k][canal] = 15.0
        spine_lab[k] = vb | post
    P.lab[spine_lab] = BONE

    # ---- aorta and IVC (tubes along z) ----------------------------------------------------
    ao_c = (vb_c[0] - vb_r - 0.05 * b, px(0.06 + 0.02 * U()))
    ao_r = 0.065 * b * rng.uniform(0.9, 1.1)
    ao = ((Y2 - ao_c[0]) ** 2 + (X2 - ao_c[1]) ** 2) < ao_r**2
    P.paint(full, np.broadcast_to(ao[None], g.shape) & cavity, H["aorta"])
    ivc_c = (vb_c[0] - vb_r - 0.08 * b, px(-0.12 + 0.02 * U()))
    ivc = ((Y2 - ivc_c[0]) / (0.055 * b)) ** 2 + ((X2 - ivc_c[1]) / (0.08 * b)) ** 2 < 1
    P.paint(full, np.broadcast_to(ivc[None], g.shape) & cavity, H["ivc"])

    # ---- bowel: colon (ascending right, descending left, transverse anterior) + small bowel ----
    def gut(sl, f, wall_frac=0.7, gas_p=0.5):
        inside = f < 1
        lumen = f < wall_frac
        P.paint(sl, inside & cavity[sl], H["wall"])
        P.paint(sl, lumen & cavity[sl], rng.uniform(10, 30))
        if rng.random() < gas_p:
            # gas rises anteriorly (supine): low y part of the lumen
            yy_ = g.y[sl[1]][None, :, None]
            ys = np.nonzero(lumen.any(axis=(0, 2)))[0]
            if ys.size:
                level = g.y[sl[1]][ys[0]] + rng.uniform(0.2, 0.6) * (g.y[sl[1]][ys[-1]] - g.y[sl[1]][ys[0]])
                P.paint(sl, lumen & (yy_ < level) & cavity[sl], -1000.0)

    for side, u0 in ((-1, -0.62), (1, 0.66)):
        c = (pz(-0.15 + 0.1 * U()), py(0.02 + 0.05 * U()), px(u0))
        sl, f = _blob(g, rng, c, (0.6 * b, 0.12 * b, 0.11 * b), noise=0.3, cells=5)
        if sl is not None:
            gut(sl, f)
    c = (pz(-0.05 + 0.1 * U()), py(-0.62), px(0.1 * U()))
    sl, f = _blob(g, rng, c, (0.09 * b, 0.1 * b, 0.55 * b), noise=0.3, cells=5)
    if sl is not None:
        gut(sl, f)
    for _ in range(rng.integers(10, 16)):  # small-bowel loops, mostly anterior and inferior
        c = (pz(rng.uniform(-0.7, 0.05)), py(rng.uniform(-0.6, 0.1)), px(rng.uniform(-0.45, 0.5)))
        sl, f = _blob(g, rng, c, (rng.uniform(0.05, 0.1) * b,) * 3, noise=0.25, cells=3)
        if sl is not None:
            gut(sl, f, wall_frac=0.5, gas_p=0.3)

    # ---- stomach (left, anterior, superior) with an air-fluid level ---------------------------
    c = (pz(0.35 + 0.1 * U()), py(-0.32 + 0.05 * U()), px(0.28 + 0.05 * U()))
    sl, f = _blob(g, rng, c, (0.32 * b, 0.17 * b, 0.2 * b), rot_deg=rng.uniform(-30, 0), noise=0.2)
    if sl is not None:
        inside = (f < 1) & cavity[sl]
        lumen = f < 0.75
        P.paint(sl, inside, H["wall"])
        P.paint(sl, lumen & inside, rng.uniform(10, 25))
        lvl = c[1] - rng.uniform(0.0, 0.12) * b
        P.paint(sl, lumen & inside & (g.y[sl[1]][None, :, None] < lvl), -1000.0)

    # ---- pancreas (distractor soft tissue, labelled background) --------------------------------
    c = (pz(-0.05 + 0.05 * U()), vb_c[0] - vb_r - 0.16 * b, px(0.12))
    sl, f = _blob(g, rng, c, (0.1 * b, 0.06 * b, 0.32 * b), rot_deg=rng.uniform(-20, -5), noise=0.3)
    if sl is not None:
        P.paint(sl, (f < 1) & cavity[sl], H["pancreas"] + 8 * U())

    # ---- kidneys -----------------------------------------------------------------------------
    kid_masks = {}
    for lab_id, side, w0 in ((KID_R, -1, -0.3), (KID_L, 1, -0.18)):
        c = (pz(w0 + 0.07 * U()), py(0.28 + 0.04 * U()), px(side * (0.41 + 0.03 * U())))
        semi = (0.33 * b * rng.uniform(0.9, 1.1), 0.15 * b * rng.uniform(0.9, 1.1), 0.11 * b * rng.uniform(0.9, 1.1))
        rot = side * rng.uniform(20, 35)  # long axis rotated so the hilum faces antero-medially
        sl, f = _blob(g, rng, c, semi, rot_deg=rot, noise=0.12, cells=4, tilt_deg=side * rng.uniform(-12, -4))
        if sl is None:
            continue
        # hilum notch: medial, slightly anterior
        Zc, Yc, Xc = g.coords(sl)
        hil = (
            ((Zc - c[0]) / (0.12 * b)) ** 2
            + ((Yc - (c[1] - 0.03 * b)) / (0.06 * b)) ** 2
            + ((Xc - (c[2] - side * 0.1 * b)) / (0.07 * b)) ** 2
        ) < 1
        kid = (f < 1) & ~hil & cavity[sl]
        # perirenal fat shell first
        peri = (f < 1.5) & cavity[sl] & ~kid
        P.paint(sl, peri & ~(P.lab[sl] == BONE), -90.0)
        medulla = kid & (f < 0.55)
        sinus = kid & (f < 0.25)
        P.paint(sl, kid, H["kid_cortex"], lab_id)
        P.paint(sl, medulla, H["kid_medulla"])
        P.paint(sl, sinus, -80.0 if rng.random() < 0.7 else 10.0, BG)  # sinus fat / pelvis
        kid_masks[lab_id] = (sl, kid)

    # ---- spleen (left posterior-lateral, crescent-ish) --------------------------------------
    c = (pz(0.2 + 0.08 * U()), py(0.2 + 0.06 * U()), px(0.62 + 0.04 * U()))
    semi = (0.4 * b * rng.uniform(0.85, 1.15), 0.36 * b * rng.uniform(0.9, 1.1), 0.16 * b * rng.uniform(0.85, 1.15))
    sl, f = _blob(g, rng, c, semi, rot_deg=rng.uniform(25, 45), noise=0.18, cells=4)
    spleen_hu = H["spleen"] + H["spleen_sd"] * U()
    if sl is not None:
        # concave medial surface: remove an ellipsoid medial-anterior
        Zc, Yc, Xc = g.coords(sl)
        notch = (((Zc - c[0]) / (0.5 * b)) ** 2 + ((Yc - c[1] + 0.05 * b) / (0.12 * b)) ** 2 + ((Xc - c[2] + 0.15 * b) / (0.1 * b)) ** 2) < 1
        spl = (f < 1) & ~notch & cavity[sl] & (P.lab[sl] == BG)
        P.paint(sl, spl, spleen_hu, SPLEEN)

    # ---- liver (right lobe + left lobe reaching across the midline) --------------------------
    liver_hu = H["liver"] + H["liver_sd"] * U()
    lc = (pz(0.15 + 0.08 * U()), py(-0.08 + 0.05 * U()), px(-0.42 + 0.04 * U()))
    lsemi = (0.5 * b * rng.uniform(0.9, 1.1), 0.5 * By * rng.uniform(0.92, 1.05), 0.38 * b * rng.uniform(0.9, 1.08))
    # the liver is evaluated on a box covering both lobes
    l2c = (lc[0] + 0.15 * b, py(-0.45 + 0.05 * U()), px(0.02 + 0.08 * U()))
    l2semi = (0.3 * b * rng.uniform(0.85, 1.1), 0.22 * b * rng.uniform(0.85, 1.1), 0.36 * b * rng.uniform(0.85, 1.15))
    lo = [min(a - 1.4 * s, c2 - 1.4 * s2) for a, s, c2, s2 in zip(lc, lsemi, l2c, l2semi)]
    hi = [max(a + 1.4 * s, c2 + 1.4 * s2) for a, s, c2, s2 in zip(lc, lsemi, l2c, l2semi)]
    sl_l = g.box([(x0 + x1) / 2 for x0, x1 in zip(lo, hi)], [(x1 - x0) / 2 for x0, x1 in zip(lo, hi)])
    if sl_l is not None:
        Zc, Yc, Xc = g.coords(sl_l)
        crop = tuple(s.stop - s.start for s in sl_l)
        f1 = ((Zc - lc[0]) / lsemi[0]) ** 2 + ((Yc - lc[1]) / lsemi[1]) ** 2 + ((Xc - lc[2]) / lsemi[2]) ** 2
        f2 = ((Zc - l2c[0]) / l2semi[0]) ** 2 + ((Yc - l2c[1]) / l2semi[1]) ** 2 + ((Xc - l2c[2]) / l2semi[2]) ** 2
        # smooth union of the two lobes, thinning inferiorly (the liver tapers toward its tip)
        k = 0.25
        fu = -k * np.logaddexp(-f1 / k, -f2 / k)
        fu = np.broadcast_to(fu, crop).astype(np.float32) + 0.18 * _smooth_noise(rng, crop, 5)
        taper = 1.0 + 0.6 * np.clip((lc[0] - Zc) / lsemi[0], 0, None) * np.clip((Xc - lc[2] + 0.1 * b) / (0.3 * b), 0, None)
        fu = fu * taper
        # the liver displaces fat/bowel/vessels but not kidneys, spleen or spine
        keep_out = np.isin(P.lab[sl_l], (SPLEEN, KID_R, KID_L, BONE))
        liv = (fu < 1) & cavity[sl_l] & ~keep_out
        # keep a thin fat plane from the kidneys
        for lab_id, (ksl, kmask) in kid_masks.items():
            kd = np.zeros(g.shape, bool)
            kd[ksl] = kmask
            kd = ndi.binary_dilation(kd[sl_l], iterations=1)
            liv &= ~kd
        # largest component only
        lab_cc, n_cc = ndi.label(liv)
        if n_cc > 1:
            sizes = np.bincount(lab_cc.ravel())[1:]
            liv = lab_cc == (np.argmax(sizes) + 1)
        P.paint(sl_l, liv, liver_hu + 2.0 * _smooth_noise(rng, crop, 6), LIVER)

        # vessel tree: intersections of two zero sets of smooth fields form tubes
        n1 = _smooth_noise(rng, crop, 5)
        n2 = _smooth_noise(rng, crop, 5)
        tw = 0.09
        ves = (np.abs(n1) < tw) & (np.abs(n2) < tw * 1.6) & ndi.binary_erosion(liv, iterations=2)
        P.paint(sl_l, ves, H["vessel"])
        # gallbladder (inferior surface, anterior-medial), labelled background
        gbc = (lc[0] - 0.35 * lsemi[0], lc[1] - 0.35 * lsemi[1], lc[2] + 0.55 * lsemi[2])
        gsl, gf = _blob(g, rng, gbc, (0.16 * b, 0.07 * b, 0.06 * b), noise=0.1)
        if gsl is not None and rng.random() < 0.8:
            gb = (gf < 1) & cavity[gsl] & ~np.isin(P.lab[gsl], (SPLEEN, KID_R, KID_L, BONE))
            P.paint(gsl, gb, 10.0, BG)

    # ---- ribs (cross-sections of descending arcs near the wall) ------------------------------
    rib_r = max(0.03 * b, 1.2 * min(sy, sx))
    ring = 1 - fat_t - wall_t * 0.5  # inside the muscular wall
    n_ribs = 6
    z0s = g.z[-1] + rng.uniform(0.0, 0.15) * b - np.arange(n_ribs) * 0.2 * b
    slope = 0.32 * b  # descent per radian from posterior toward anterior
    for side in (-1, 1):
        for ri, z0 in enumerate(z0s):
            t_max = 2.6 - 0.3 * ri  # lower ribs are shorter (floating ribs)
            for k in range(nz):
                t = (z0 - g.z[k]) / slope  # angle from the posterior midline
                if not (0.35 <= t <= t_max):
                    continue
                # point on the ring at angle t (0 = posterior, pi = anterior)
                cy_r = cy0 + np.cos(t) * By * ring * zscale[k] / 1.0
                cx_r = cx0 + side * np.sin(t) * Bx * ring * zscale[k]
                if cy_r > cy0:
                    cy_r = cy0 + (cy_r - cy0) / 1.08
                elong = 1.0 / max(abs(np.sin(np.arctan2(slope, Bx * ring))), 0.3)
                # tangent direction of the ring at t
                ty, tx = -np.sin(t) * By, side * np.cos(t) * Bx
                nrm = np.hypot(ty, tx)
                ty, tx = ty / nrm, tx / nrm
                dy, dx = Y2 - cy_r, X2 - cx_r
                along = dy * ty + dx * tx
                across = -dy * tx + dx * ty
                e = (along / (rib_r * min(elong, 2.5))) ** 2 + (across / rib_r) ** 2
                rib = e < 1
                if not rib.any():
                    continue
                cart = t > t_max - 0.35  # anterior end: costal cartilage
                P.hu[k][rib] = 120.0 if cart else rng.uniform(600, 800)
                if not cart:
                    P.hu[k][e < 0.35] = 250.0
                    P.lab[k][rib] = BONE

    # ---- liver lesions + annotators ----------------------------------------------------------
    lesion_true = np.zeros(g.shape, bool)
    annots = np.zeros((max(n_annotators, 0),) + g.shape, bool)
    liver_now = P.lab == LIVER
    if liver_now.any():
        # distance to the liver boundary, computed on the liver's bounding box only
        lb = ndi.find_objects(liver_now.astype(np.uint8))[0]
        lb = tuple(slice(max(s_.start - 1, 0), s_.stop + 1) for s_ in lb)
        dist = np.zeros(g.shape, np.float32)
        dist[lb] = ndi.distance_transform_edt(liver_now[lb], sampling=g.spacing)
        n_les = int(rng.integers(1, 5))
        radii = np.sort(rng.uniform(4.0, 14.0, n_les))[::-1]
        radii[0] = max(radii[0], rng.uniform(9.0, 14.0))  # at least one clearly visible lesion
        scale = min(1.0, b / 150.0) ** 0.5
        radii = radii * max(scale, 0.6)
        drop = rng.uniform(*H["lesion_drop"])
        # annotator styles: tight (-1 voxel), neutral, generous (+1 voxel), plus individual jitter
        ann_bias = rng.choice([-1.0, 0.0, 1.0], size=max(n_annotators, 0)) + rng.normal(
            0.0, 0.3, size=max(n_annotators, 0)
        )
        vox = min(g.spacing[1], g.spacing[2])
        for li, rad in enumerate(radii):
            cand = np.argwhere(dist > rad + 2.5 * max(g.spacing[1:]))
            if cand.size == 0:
                continue
            zc, yc, xc = cand[rng.integers(len(cand))]
            c = (g.z[zc], g.y[yc], g.x[xc])
            semi = tuple(rad * rng.uniform(0.85, 1.15) for _ in range(3))
            sl, f = _blob(g, rng, c, semi, noise=0.12, cells=3, pad=1.8)
            if sl is None:
                continue
            core = (f < 1) & liver_now[sl]
            P.paint(sl, core, liver_hu - drop + 4.0 * U())
            # slightly darker centre
            P.paint(sl, (f < 0.35) & liver_now[sl], liver_hu - drop - 8.0)
            lesion_true[sl] |= core
            for a in range(n_annotators):
                if rad < 6.5 and rng.random() < 0.3:
                    continue  # this annotator missed a small lesion
                # f ~ (r/R)^2, so shifting the level by 2*d/R moves the boundary by ~d mm
                lvl = max(1.0 + 2.0 * ann_bias[a] * vox / rad + 0.05 * rng.standard_normal(), 0.3)
                fa = f + 0.15 * _smooth_noise(rng, f.shape, 3)  # boundary jitter
                annots[a][sl] |= (fa < lvl) & (liver_now[sl] | core)
    if n_annotators > 0:
        consensus = annots.mean(axis=0) > 0.5
        lesion_annotations = annots
    else:
        consensus = lesion_true
        lesion_annotations = None
    lesion_label = consensus & (liver_now | lesion_true)
    P.lab[lesion_label] = LESION

    # ---- image formation -----------------------------------------------------------------------
    img = ndi.gaussian_filter(P.hu, sigma=(0.4, 0.6, 0.6), mode="nearest")
    if noise_hu > 0:
        img += rng.standard_normal(g.shape, dtype=np.float32) * np.float32(noise_hu)
    img = np.clip(np.rint(img), -1024, 3071).astype(np.int16)

    meta = dict(seed=int(seed), phase=phase, noise_hu=float(noise_hu), body_half_width_mm=float(Bx),
                liver_hu=float(liver_hu), spleen_hu=float(spleen_hu))
    return Phantom(
        image=img,
        labels=P.lab,
        spacing=tuple(float(s) for s in g.spacing),
        affine=phantom_affine(g.shape, g.spacing),
        class_names=PHANTOM_CLASSES,
        lesion_annotations=lesion_annotations,
        meta=meta,
    )


def phantom_sample_data(seed: int = 0, **kwargs) -> list[tuple]:
    """napari sample-data hook: ``[(image, kwargs, "image"), (labels, kwargs, "labels")]``.

    Does not import napari.
    """
    ph = make_phantom(seed=seed, **kwargs)
    meta = {
        "spacing": ph.spacing,
        "affine": ph.affine,
        "class_names": ph.class_names,
        "axes": "zyx",
        "orientation": "x: patient left, y: posterior, z: superior (radiological display)",
        "phantom": dict(ph.meta),
    }
    return [
        (
            ph.image,
            {"name": "phantom CT", "scale": ph.spacing, "contrast_limits": (-160, 240), "metadata": meta},
            "image",
        ),
        (ph.labels, {"name": "phantom labels", "scale": ph.spacing, "metadata": {"class_names": ph.class_names}}, "labels"),
    ]
