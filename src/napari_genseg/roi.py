"""Region-of-interest geometry: a voxel box on the displayed (z, y, x) array, and the square crop
of a fixed field of view (mm) that a crop-trained model sees around it (pure numpy / scipy).

AR-Seg's paper segments 128² crops around a lesion (LIDC-IDRI: 180² crops of the Probabilistic
U-Net's preprocessing, centre-cropped to 128²; Chen et al. MICCAI 2025, Sec. 3.1). Here a crop is
defined in millimetres, not pixels, so a checkpoint sees lesions at the same physical scale
whatever the scan's pixel spacing:

* a :class:`RoiBox` is ``z0:z1, y0:y1, x0:x1`` in voxel indices of the displayed (z, y, x) array,
  ends exclusive (Python slices); ``parse_roi`` reads the CLI's ``"z0:z1,y0:y1,x0:x1"``;
* a :class:`RoiCrop` is a square of side ``fov_mm`` centred on a point of a slice (index
  coordinates, pixel centres at integers), sampled on a ``size`` × ``size`` grid: crop pixel ``j``
  (0-based) has its centre at slice index ``c + (j - (size - 1) / 2) * (fov_mm / size) / s``
  (``s`` = the slice's pixel spacing in mm along that axis), so the crop covers
  ``c ± fov_mm / 2`` mm exactly, for any anisotropic spacing;
* :func:`crop_for_box`: the crop of a box is centred on the box centre ``((y0 + y1 - 1) / 2,
  (x0 + x1 - 1) / 2)``. Its side is the checkpoint's ``fov_mm`` when the box fits in it (the model
  then also sees the context around a small box, as in training, and only the box is written
  back). A box larger than ``fov_mm`` in mm along either axis gets a crop of the box's larger side
  instead (``RoiCrop.zoom`` > 1: the model sees the structure smaller than at training; a
  warning says so), so the whole box is always inside the crop;
* image -> crop: bilinear (``scipy.ndimage.map_coordinates`` order 1) after a Gaussian
  anti-aliasing pre-filter along an axis whose crop pixel is larger than the slice pixel; outside
  the slice: ``pad_value`` (air);
* crop -> box: bilinear at the box's pixel centres (``RoiCrop.to_box``): used on mask logits or
  probabilities, thresholded afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .errors import InputError

__all__ = ["RoiError", "RoiBox", "RoiCrop", "parse_roi", "crop_for_box"]


class RoiError(InputError, ValueError):
    """A region of interest that cannot be used (malformed, empty or outside the image)."""


@dataclass(frozen=True)
class RoiBox:
    """``z0:z1, y0:y1, x0:x1`` voxel indices of the displayed (z, y, x) array, ends exclusive."""

    z0: int
    z1: int
    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return slice(self.z0, self.z1), slice(self.y0, self.y1), slice(self.x0, self.x1)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.z1 - self.z0, self.y1 - self.y0, self.x1 - self.x0

    @property
    def center_yx(self) -> tuple[float, float]:
        """In-plane centre in index coordinates (pixel centres at integers)."""
        return (self.y0 + self.y1 - 1) / 2.0, (self.x0 + self.x1 - 1) / 2.0

    def __str__(self) -> str:
        return f"{self.z0}:{self.z1},{self.y0}:{self.y1},{self.x0}:{self.x1}"

    def check(self, shape) -> "RoiBox":
        """Raise :class:`RoiError` unless the box is non-empty and inside an array of ``shape``
        (z, y, x); returns the box."""
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3:
            raise RoiError(f"a region of interest needs a 3-D (z, y, x) image, not shape {shape}")
        for ax, (a, b, n) in enumerate(zip((self.z0, self.y0, self.x0), (self.z1, self.y1, self.x1), shape)):
            name = "zyx"[ax]
            if b <= a:
                raise RoiError(f"region of interest {self}: empty {name} range {a}:{b}")
            if a < 0 or b > n:
                raise RoiError(f"region of interest {self}: {name} range {a}:{b} is outside 0:{n}")
        return self


def parse_roi(spec: str, shape=None) -> RoiBox:
    """``"z0:z1,y0:y1,x0:x1"`` (integers, ends exclusive) -> :class:`RoiBox`, checked against
    ``shape`` (z, y, x) when given. Raises :class:`RoiError` (one line) for anything else."""
    text = str(spec).replace(" ", "")
    parts = text.split(",")
    if len(parts) != 3:
        raise RoiError(f"--roi {spec!r} is not z0:z1,y0:y1,x0:x1 (voxel indices, ends exclusive)")
    vals = []
    for p in parts:
        a, sep, b = p.partition(":")
        try:
            if not sep:
                raise ValueError
            vals += [int(a), int(b)]
        except ValueError:
            raise RoiError(f"--roi {spec!r}: {p!r} is not a range a:b of integers") from None
    box = RoiBox(*vals)
    return box.check(shape) if shape is not None else box


@dataclass(frozen=True)
class RoiCrop:
    """A square crop of one slice: side ``fov_mm`` centred on ``center_yx`` (index coordinates),
    sampled at ``size`` × ``size`` (see the module docstring for the exact mapping)."""

    center_yx: tuple[float, float]
    spacing_yx: tuple[float, float]
    fov_mm: float
    size: int
    #: the checkpoint's field of view (mm) this crop was made for; ``zoom`` = fov_mm / trained_fov_mm
    trained_fov_mm: float | None = None

    @property
    def pixel_mm(self) -> float:
        """Crop pixel size in mm (both axes)."""
        return self.fov_mm / self.size

    @property
    def zoom(self) -> float:
        """``fov_mm / trained_fov_mm`` (1 when the crop has the trained field of view)."""
        return 1.0 if not self.trained_fov_mm else self.fov_mm / self.trained_fov_mm

    def with_size(self, size: int) -> "RoiCrop":
        """The same field of view on another grid (e.g. AR-Seg's mask grid)."""
        return RoiCrop(self.center_yx, self.spacing_yx, self.fov_mm, int(size), self.trained_fov_mm)

    def sample_points(self) -> tuple[np.ndarray, np.ndarray]:
        """(size,) slice index coordinates of the crop's pixel centres along y and along x."""
        j = np.arange(self.size, dtype=np.float64) - (self.size - 1) / 2.0
        return (self.center_yx[0] + j * self.pixel_mm / self.spacing_yx[0],
                self.center_yx[1] + j * self.pixel_mm / self.spacing_yx[1])

    def crop_coords(self, ys, xs) -> tuple[np.ndarray, np.ndarray]:
        """Slice index coordinates (ys along y, xs along x) -> crop pixel coordinates (inverse of
        ``sample_points``)."""
        c = (self.size - 1) / 2.0
        return ((np.asarray(ys, np.float64) - self.center_yx[0]) * self.spacing_yx[0] / self.pixel_mm + c,
                (np.asarray(xs, np.float64) - self.center_yx[1]) * self.spacing_yx[1] / self.pixel_mm + c)

    def from_slices(self, slices: np.ndarray, pad_value: float = -1024.0, order: int = 1) -> np.ndarray:
        """(n, H, W) or (H, W) values (any real or bool dtype) -> (n, size, size) / (size, size)
        float32 crop (bilinear for ``order`` 1, nearest for 0); ``pad_value`` outside the slice. An
        axis along which the crop pixel is larger than the slice pixel is Gaussian pre-filtered
        (sigma = (ratio - 1) / 2 slice pixels) against aliasing (only for ``order`` >= 1).

        Only the window of the slice the crop reads (its sample points, their interpolation
        neighbours and the Gaussian's support, clipped to the slice) is converted and filtered:
        the result equals filtering and sampling the whole slice, at the cost of the crop."""
        a = np.asarray(slices)
        squeeze = a.ndim == 2
        if squeeze:
            a = a[None]
        h, w = a.shape[-2:]
        ys, xs = self.sample_points()
        ratio = (self.pixel_mm / self.spacing_yx[0], self.pixel_mm / self.spacing_yx[1])
        sigma = tuple(max(0.0, (r - 1.0) / 2.0) for r in ratio)
        filtered = order >= 1 and max(sigma) > 0
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
        inside = (yy >= -0.5) & (yy <= h - 0.5) & (xx >= -0.5) & (xx <= w - 0.5)
        lo, hi = [0, 0], [h, w]  # order > 1: the spline pre-filter needs the whole slice
        for ax, (pts, s, n) in enumerate(((ys, sigma[0], h), (xs, sigma[1], w))):
            if order > 1:
                break
            r = (int(4.0 * s + 0.5) if filtered else 0) + 1  # gaussian_filter's radius (truncate 4) + 1
            lo[ax] = min(max(int(np.floor(pts.min())) - r, 0), n - 1)
            hi[ax] = max(min(int(np.floor(pts.max())) + 2 + r, n), lo[ax] + 1)
        # integer shifts of coordinates >= the shift are exact in float64: same weights as unshifted
        coords = [yy - lo[0], xx - lo[1]]
        win = a[:, lo[0]:hi[0], lo[1]:hi[1]]
        out = np.empty((a.shape[0], self.size, self.size), np.float32)
        for i in range(a.shape[0]):
            src = win[i].astype(np.float32, copy=False)
            if filtered:
                src = ndi.gaussian_filter(src, sigma=sigma, mode="nearest")
            v = ndi.map_coordinates(src, coords, order=order, mode="nearest")
            out[i] = np.where(inside, v, np.float32(pad_value))
        return out[0] if squeeze else out

    def to_box(self, values: np.ndarray, box: RoiBox) -> np.ndarray:
        """(..., size, size) crop values (logits, probabilities) -> (..., h, w) at the pixel centres
        of ``box``'s in-plane rectangle (bilinear). The whole box lies inside the crop for a crop
        made by :func:`crop_for_box`."""
        v = np.asarray(values, dtype=np.float32)
        lead = v.shape[:-2]
        v = v.reshape((-1,) + v.shape[-2:])
        cy, cx = self.crop_coords(np.arange(box.y0, box.y1), np.arange(box.x0, box.x1))
        yy, xx = np.meshgrid(cy, cx, indexing="ij")
        out = np.stack([ndi.map_coordinates(p, [yy, xx], order=1, mode="nearest") for p in v])
        return out.reshape(lead + yy.shape)


def crop_for_box(box: RoiBox, spacing_yx, fov_mm: float, size: int) -> RoiCrop:
    """The crop of ``box`` (see the module docstring): centred on the box, side ``fov_mm`` mm, or
    the box's larger side in mm when the box does not fit in ``fov_mm`` (``zoom`` > 1). Raises
    :class:`RoiError` for a non-positive field of view or spacing."""
    sy, sx = (float(s) for s in spacing_yx)
    if not (fov_mm > 0 and sy > 0 and sx > 0):
        raise RoiError(f"a region of interest needs a positive field of view and pixel spacing "
                       f"(fov {fov_mm} mm, spacing {sy} x {sx} mm)")
    extent = max((box.y1 - box.y0) * sy, (box.x1 - box.x0) * sx)
    return RoiCrop(box.center_yx, (sy, sx), max(float(fov_mm), float(extent)), int(size), float(fov_mm))
