"""Non-learned baselines.

``hu_baseline``: the classic "threshold + morphology + connected components" liver/spleen
segmentation of contrast-enhanced (portal venous) abdominal CT, used as the floor any learned model
must beat. Nothing is fitted to data; every size is given in mm and converted with ``spacing``.

Pipeline (array axes (z, y, x), spacing (sz, sy, sx) mm):

1. body mask: largest 3-D component of ``HU > -500``, holes filled slice by slice;
2. interior: the body mask eroded by ``wall_mm`` (drops skin, subcutaneous tissue and most of the
   muscular wall, which has the same HU as the organs);
3. mild Gaussian smoothing (``smooth_mm``) against noise, then ``low <= HU <= high`` inside the
   interior. The default window 40..150 HU assumes contrast-enhanced (portal venous) CT; with
   ``auto_window=True`` the window is instead ``(mode - auto_below, mode + auto_above)`` around the
   dominant soft-tissue attenuation of the interior (:func:`soft_tissue_window`), which also works
   on non-contrast scans (liver ~45-60 HU);
4. morphological opening with an ellipsoidal structuring element of radius ``opening_mm`` (cuts the
   thin bridges between organs, vessels and bowel walls);
5. 3-D connected components (face connectivity): the largest is the liver (label 1), the second
   largest the spleen (label 2). With ``side_prior=True`` (default) the spleen is instead the
   largest remaining component whose centroid lies on the other side of the body's midline than
   the liver's (the spleen sits on the patient's left, the liver on the right) and components
   whose centroid is posterior to the body centre by more than ``0.5`` of the body half-depth
   (paraspinal muscles) are skipped; ``side_prior=False`` is the plain "two largest" rule;
6. each organ is closed a little (``opening_mm / 2``) and its holes are filled slice by slice
   (intrahepatic vessels are brighter than ``high`` in the portal venous phase; lesions darker
   than ``low``).

Returns a ``uint8`` label volume (0 background, 1 liver, 2 spleen).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

__all__ = ["hu_baseline", "soft_tissue_window", "body_mask", "ellipsoid_structure", "BASELINE_CLASSES"]

BASELINE_CLASSES: dict[int, str] = {1: "liver", 2: "spleen"}


def ellipsoid_structure(radius_mm: float, spacing) -> np.ndarray:
    """Boolean ellipsoid (a ball of ``radius_mm`` in physical space) on the voxel grid."""
    radii = [max(radius_mm / float(s), 0.0) for s in spacing]
    half = [int(np.floor(r)) for r in radii]
    grids = np.ogrid[tuple(slice(-h, h + 1) for h in half)]
    d = np.zeros([2 * h + 1 for h in half], np.float64)
    for gr, r in zip(grids, radii):
        d = d + (gr / r) ** 2 if r > 0 else d + np.where(gr == 0, 0.0, np.inf)
    return d <= 1.0


def _fill_holes_slicewise(mask: np.ndarray) -> np.ndarray:
    out = np.empty_like(mask)
    for k in range(mask.shape[0]):
        out[k] = ndi.binary_fill_holes(mask[k]) if mask[k].any() else mask[k]
    return out


def _largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n <= 1:
        return mask.copy()
    sizes = np.bincount(lab.ravel())[1:]
    return lab == (int(np.argmax(sizes)) + 1)


def body_mask(image_hu: np.ndarray, threshold: float = -500.0) -> np.ndarray:
    """Largest connected component above ``threshold`` HU, holes filled per axial slice."""
    m = np.asarray(image_hu) > threshold
    if not m.any():
        return m
    return _fill_holes_slicewise(_largest_component(m))


def _crop_box(mask: np.ndarray, margin) -> tuple[slice, ...] | None:
    objs = ndi.find_objects(mask.astype(np.uint8))
    if not objs or objs[0] is None:
        return None
    return tuple(
        slice(max(s.start - m, 0), min(s.stop + m, n)) for s, m, n in zip(objs[0], margin, mask.shape)
    )


def soft_tissue_window(image_hu, mask, below: float = 30.0, above: float = 45.0) -> tuple[float, float]:
    """``(mode - below, mode + above)`` around the dominant soft-tissue attenuation.

    The mode of the (5 HU bins, lightly smoothed) histogram of ``image_hu[mask]`` restricted to
    [-20, 250] HU. In an upper-abdominal scan this is the liver's attenuation, whatever the contrast
    phase (about 100-110 HU portal venous, 45-60 HU without contrast).
    """
    v = np.asarray(image_hu)[mask]
    v = v[(v > -20) & (v < 250)]
    if v.size == 0:
        return 40.0, 150.0
    h, edges = np.histogram(v, bins=np.arange(-20.0, 255.0, 5.0))
    hs = np.convolve(h, [1, 2, 3, 2, 1], mode="same")
    mode = float(edges[int(np.argmax(hs))] + 2.5)
    return mode - below, mode + above


def hu_baseline(
    image_hu: np.ndarray,
    spacing,
    low: float = 40.0,
    high: float = 150.0,
    *,
    opening_mm: float = 6.0,
    wall_mm: float = 12.0,
    smooth_mm: float = 1.0,
    side_prior: bool = True,
    min_volume_ml: float = 5.0,
    auto_window: bool = False,
    auto_below: float = 30.0,
    auto_above: float = 45.0,
) -> np.ndarray:
    """Liver (1) / spleen (2) by HU window + morphology + connected components (see module doc).

    ``image_hu``: (z, y, x) HU; ``spacing``: (sz, sy, sx) mm. Components smaller than
    ``min_volume_ml`` are never chosen. Returns uint8 labels of the same shape.
    """
    img = np.asarray(image_hu)
    if img.ndim != 3:
        raise ValueError("image_hu must be (z, y, x)")
    sp = tuple(float(s) for s in spacing)
    out = np.zeros(img.shape, np.uint8)

    body = body_mask(img)
    if not body.any():
        return out
    interior = body
    if wall_mm > 0:
        # erosion by wall_mm: distance transform in mm (exact for anisotropic voxels);
        # the volume edges along z are not treated as body surface
        padded = np.pad(body, ((1, 1), (0, 0), (0, 0)), mode="edge")
        pad_xy = np.pad(padded, ((0, 0), (1, 1), (1, 1)), constant_values=False)
        dist = ndi.distance_transform_edt(pad_xy, sampling=sp)[1:-1, 1:-1, 1:-1]
        interior = dist > wall_mm

    box = _crop_box(interior, (1, 2, 2))
    if box is None:
        return out
    work = img[box].astype(np.float32)
    inter = interior[box]
    if smooth_mm > 0:
        work = ndi.gaussian_filter(work, sigma=[smooth_mm / s for s in sp], mode="nearest", truncate=2.5)
    if auto_window:
        low, high = soft_tissue_window(work, inter, auto_below, auto_above)
    cand = inter & (work >= low) & (work <= high)
    if opening_mm > 0:
        se = ellipsoid_structure(opening_mm, sp)
        cand = ndi.binary_opening(cand, structure=se)
    lab, n = ndi.label(cand)
    if n == 0:
        return out
    sizes = np.bincount(lab.ravel())[1:].astype(np.float64)
    voxel_ml = float(np.prod(sp)) / 1000.0
    order = [int(i) for i in np.argsort(-sizes) if sizes[i] * voxel_ml >= min_volume_ml]
    if not order:
        return out

    chosen: dict[int, int] = {}
    if side_prior:
        # body centre / half-depth from the body mask (in-plane), in crop coordinates
        zb, yb, xb = np.nonzero(body[box])
        x_mid = 0.5 * (xb.min() + xb.max())
        y_mid = 0.5 * (yb.min() + yb.max())
        y_half = max(0.5 * (yb.max() - yb.min()), 1.0)
        cents = dict(zip(order, ndi.center_of_mass(cand, lab, [i + 1 for i in order])))
        ok = [i for i in order if (cents[i][1] - y_mid) / y_half < 0.5]
        if ok:
            chosen[1] = ok[0]
            cx_liver = cents[ok[0]][2]
            for i in ok[1:]:
                if (cents[i][2] - x_mid) * (cx_liver - x_mid) < 0:
                    chosen[2] = i
                    break
    else:
        chosen[1] = order[0]
        if len(order) > 1:
            chosen[2] = order[1]

    close_se = ellipsoid_structure(max(opening_mm / 2.0, 0.0), sp) if opening_mm > 0 else None
    sub = out[box]
    for lab_id, comp in chosen.items():
        m = lab == comp + 1
        if close_se is not None and close_se.size > 1:
            pad = [s // 2 + 1 for s in close_se.shape]
            mp = np.pad(m, [(p, p) for p in pad])
            mp = ndi.binary_closing(mp, structure=close_se)
            m = mp[tuple(slice(p, -p) for p in pad)]
        m = _fill_holes_slicewise(m) & inter
        sub[m & (sub == 0)] = lab_id
    return out
