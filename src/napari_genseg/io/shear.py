"""Sheared voxel grids (CT gantry tilt): detection, display resampling, mask write-back.

A CT acquired with a tilted gantry has slices whose positions do not step along the slice
normal: the voxel grid is *sheared* (the affine's columns are not orthogonal). The DICOM
standard carries this only in ImageOrientationPatient (0020,0037) and ImagePositionPatient
(0020,0032); GantryDetectorTilt (0018,1120) is "not intended for mathematical computations"
(PS3.3 C.8.2.1). napari's 2-D slicing shows axis-aligned grids only, so a sheared source is

* **shown** resampled onto an axis-aligned LPS grid that covers it (the display grid of
  :mod:`napari_genseg.volume`), by trilinear interpolation (nearest neighbour for label
  images), so every voxel is on screen where it is in the patient;
* **written back** on its own voxels: a mask painted or predicted on the display grid is pulled
  back to the source grid by nearest neighbour, and the NIfTI keeps the exact sheared affine as
  its sform (qform: nibabel's closest rigid approximation, since a quaternion cannot hold shear).

dicom2nifti (``resample.py``) and dcm2niix also resample tilted CT onto an orthogonal grid; they
keep the tilted slice planes, which napari could show only on the closest canonical axes, i.e.
with the tilt's rotation dropped. Here the grid is axis-aligned instead, so world positions are
exact on screen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Shear", "measure_shear", "DisplayGrid", "display_grid", "resample_to_display",
           "labels_to_source"]

#: a grid counts as sheared when treating it as orthogonal would misplace a voxel at the far end
#: of the volume by more than this fraction of the smallest voxel size
SHEAR_TOLERANCE_VOXELS = 0.1


@dataclass(frozen=True)
class Shear:
    """How far a voxel grid is from orthogonal.

    Attributes:
        angle_deg: largest deviation from 90° between two voxel axes (the gantry tilt for a CT
            whose slice step is tilted against the slice normal).
        drift_mm: largest displacement across the volume if the shear were dropped (mm).
        sheared: ``drift_mm`` exceeds ``SHEAR_TOLERANCE_VOXELS`` of the smallest voxel size.
    """

    angle_deg: float
    drift_mm: float
    sheared: bool


def measure_shear(affine: np.ndarray, shape) -> Shear:
    """Shear of a 4x4 voxel->world affine over a grid of ``shape`` (i, j, k) voxels."""
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(a, axis=0)
    angle = 0.0
    drift = 0.0
    for i in range(3):
        for j in range(3):
            if i == j or norms[i] == 0 or norms[j] == 0:
                continue
            cos = float(a[:, i] @ a[:, j]) / (norms[i] * norms[j])
            angle = max(angle, abs(90.0 - float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))))
            # moving (n_j - 1) voxels along axis j also moves this far along axis i
            drift = max(drift, (int(shape[j]) - 1) * abs(cos) * norms[j])
    sheared = drift > SHEAR_TOLERANCE_VOXELS * float(norms.min())
    return Shear(round(angle, 3), drift, bool(sheared))


@dataclass(frozen=True)
class DisplayGrid:
    """An axis-aligned LPS grid (display convention of :mod:`napari_genseg.volume`).

    Attributes:
        shape: (z, y, x) voxels.
        spacing: (sz, sy, sx) mm.
        origin: LPS position (S, P, L) of voxel (0, 0, 0), mm.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    @property
    def affine_ras(self) -> np.ndarray:
        """RAS affine of the display voxel axes (x, y, z) (same as ``Volume.display_affine_ras``)."""
        sz, sy, sx = self.spacing
        oz, oy, ox = self.origin
        aff = np.diag([-sx, -sy, sz, 1.0])
        aff[:3, 3] = (-ox, -oy, oz)
        return aff


def display_grid(affine_ras: np.ndarray, shape_ijk) -> DisplayGrid:
    """The axis-aligned grid that covers every voxel centre of a (sheared) source.

    Each display axis takes the spacing of the source axis closest to it, measured along that
    world axis (so a 20° tilt keeps the slice step along z and the in-plane sizes), and spans
    the source's bounding box in LPS.
    """
    import nibabel.orientations as no

    aff = np.asarray(affine_ras, dtype=np.float64)
    ornt = no.io_orientation(aff)  # row = source axis: (world RAS axis, flip)
    spacing_world = np.zeros(3)
    for src_axis, (world_axis, _) in enumerate(ornt):
        spacing_world[int(world_axis)] = abs(aff[int(world_axis), src_axis])
    if np.any(spacing_world <= 0):
        from .nifti import VolumeReadError

        raise VolumeReadError(f"degenerate voxel axes in the affine {aff[:3, :3].tolist()}")
    n = np.asarray(shape_ijk, dtype=np.float64) - 1
    corners = np.array([[i, j, k, 1.0] for i in (0, n[0]) for j in (0, n[1]) for k in (0, n[2])])
    lps = (corners @ aff.T)[:, :3] * np.array([-1.0, -1.0, 1.0])
    lo, hi = lps.min(axis=0), lps.max(axis=0)
    counts = np.ceil((hi - lo) / spacing_world - 1e-6).astype(int) + 1  # (L, P, S) order
    return DisplayGrid(
        shape=(int(counts[2]), int(counts[1]), int(counts[0])),
        spacing=(float(spacing_world[2]), float(spacing_world[1]), float(spacing_world[0])),
        origin=(float(lo[2]) + 0.0, float(lo[1]) + 0.0, float(lo[0]) + 0.0),
    )


def resample_to_display(data_ijk: np.ndarray, affine_ras: np.ndarray, grid: DisplayGrid,
                        order: int = 1, fill: float | None = None, slab: int = 16) -> np.ndarray:
    """Sample the source (i, j, k) array on ``grid``; returns (z, y, x) in the source dtype.

    ``order`` 1 = trilinear (images), 0 = nearest neighbour (labels). Display voxels outside the
    source take ``fill`` (default: the source minimum, i.e. air or background). Works in slabs
    of ``slab`` display slices so memory stays near the size of the result.
    """
    from scipy import ndimage

    src = np.asarray(data_ijk)
    if fill is None:
        fill = float(src.min()) if src.size else 0.0
    # display voxel (x, y, z) -> source voxel (i, j, k)
    m = np.linalg.inv(np.asarray(affine_ras, dtype=np.float64)) @ grid.affine_ras
    nz, ny, nx = grid.shape
    integral = src.dtype.kind in "iub"
    out = np.empty((nz, ny, nx), dtype=src.dtype if integral else np.float32)
    for z0 in range(0, nz, slab):
        z1 = min(z0 + slab, nz)
        part = ndimage.affine_transform(
            src, m[:3, :3], offset=m[:3, 3] + m[:3, 2] * z0, output_shape=(nx, ny, z1 - z0),
            order=order, mode="constant", cval=float(fill), output=np.float32, prefilter=False,
        )
        if integral:
            np.rint(part, out=part)
            if src.dtype.kind != "b":
                info = np.iinfo(src.dtype)
                np.clip(part, info.min, info.max, out=part)
        out[z0:z1] = np.transpose(part, (2, 1, 0))
    return out


def labels_to_source(labels_zyx: np.ndarray, grid: DisplayGrid, affine_ras: np.ndarray,
                     shape_ijk, dtype) -> np.ndarray:
    """Pull display-grid labels back onto the source voxels (nearest neighbour).

    Every source voxel takes the label of the display voxel nearest to its centre, so a mask
    drawn on screen lands on the source slices it covers. Returns the stored (i, j, k) array.
    """
    from scipy import ndimage

    lab_xyz = np.transpose(np.asarray(labels_zyx), (2, 1, 0))
    # source voxel (i, j, k) -> display voxel (x, y, z)
    m = np.linalg.inv(grid.affine_ras) @ np.asarray(affine_ras, dtype=np.float64)
    return ndimage.affine_transform(
        lab_xyz.astype(dtype, copy=False), m[:3, :3], offset=m[:3, 3],
        output_shape=tuple(int(s) for s in shape_ijk), order=0, mode="constant", cval=0,
        output=dtype, prefilter=False,
    )
