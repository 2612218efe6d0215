"""The one data type that crosses layers: a CT volume (or mask) with its geometry.

Axis contract (display convention, used everywhere in the package):

* ``data`` is a numpy array indexed ``(z, y, x)``;
* x index increases toward the patient's **left**, y toward **posterior**, z toward **superior**
  (LPS voxel axes). An axial slice ``data[z]`` shown by napari (rows down, columns right) is then in
  radiological orientation: anterior at the top, the patient's right on the screen's left.
* ``spacing`` is ``(sz, sy, sx)`` in mm; ``origin`` is the LPS world position (mm) of voxel
  ``(0, 0, 0)`` written ``(S, P, L)`` in (z, y, x) order, so napari's ``scale=spacing`` and
  ``translate=origin`` place every layer in one world frame.

Sources whose axes are oblique are shown on the closest canonical axes (no resampling); the
original NIfTI affine and header are kept in ``source_affine`` / ``source_header`` together with
the reorientation ``ornt`` that maps the stored array to the display array, so a mask written back
lands on the source voxels exactly.

Sources whose grid is *sheared* (CT gantry tilt: slice positions not along the slice normal) are
the one exception: ``data`` is then a resampling of the source onto an axis-aligned grid covering
it (``resampled`` is True, ``ornt`` is None), so on screen every voxel sits at its true LPS
position; ``source_affine`` keeps the exact sheared affine and a mask is written back by pulling
each source voxel's label from the display voxel nearest to it (see :mod:`napari_genseg.io.shear`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

__all__ = ["Volume", "DISPLAY_AXCODES"]

#: voxel axes (x, y, z) of the display array, as nibabel axis codes
DISPLAY_AXCODES = ("L", "P", "S")


@dataclass
class Volume:
    """An image or mask volume.

    Attributes:
        data: (z, y, x) array. CT images in HU (float32 or int16), masks integer.
        spacing: (sz, sy, sx) voxel size in mm.
        origin: (z, y, x) world position in mm of voxel (0, 0, 0) (LPS frame, see module doc).
        source_affine: 4x4 RAS affine of the source's *stored* voxel order (NIfTI convention).
        ornt: nibabel orientation array mapping stored voxel axes (i, j, k) to display (x, y, z).
        source_shape: shape of the stored array (i, j, k).
        source_header: the NIfTI header (nibabel object) of the source, or None.
        source_path: where it came from.
        resampled: True when ``data`` was resampled from a sheared source grid (gantry tilt)
            rather than reoriented; masks are then mapped back by nearest neighbour.
        meta: free facts (DICOM tags, series description, warnings, orientation string).
    """

    data: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    source_affine: np.ndarray | None = None
    ornt: np.ndarray | None = None
    source_shape: tuple[int, int, int] | None = None
    source_header: Any = None
    source_path: str | None = None
    meta: dict = field(default_factory=dict)
    resampled: bool = False

    def __post_init__(self) -> None:
        if self.data.ndim != 3:
            raise ValueError(f"a volume must be 3-D (z, y, x); got shape {self.data.shape}")
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape)

    @property
    def display_affine_ras(self) -> np.ndarray:
        """RAS affine of the display array's voxel axes (i=x, j=y, k=z)."""
        sz, sy, sx = self.spacing
        oz, oy, ox = self.origin  # LPS: (S, P, L)
        aff = np.diag([-sx, -sy, sz, 1.0])  # L -> -R, P -> -A
        aff[:3, 3] = (-ox, -oy, oz)
        return aff

    def with_data(self, data: np.ndarray, **changes) -> "Volume":
        """A volume of the same geometry with other voxels (e.g. a mask)."""
        if data.shape != self.data.shape:
            raise ValueError(f"shape {data.shape} does not match the volume {self.data.shape}")
        return replace(self, data=data, **changes)

    def layer_kwargs(self) -> dict:
        """napari layer keyword arguments that place this volume in the world frame."""
        return {"scale": self.spacing, "translate": self.origin}

    @property
    def orientation(self) -> str:
        """Axis codes of the source's stored voxel axes (e.g. 'RAS', 'LPS')."""
        if self.source_affine is None:
            return "".join(DISPLAY_AXCODES)
        import nibabel as nib

        return "".join(nib.aff2axcodes(self.source_affine))
