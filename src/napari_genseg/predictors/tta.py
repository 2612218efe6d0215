"""Test-time augmentation (TTA) for the deterministic segmentation models (MSA²Net, MARSeg).

A deterministic model gives one prediction; its uncertainty comes from K *views* of the same slice:
small shifts, small scales and HU jitter. Left-right (and any other) flips are deliberately absent:
liver and spleen lie on fixed sides of the body and a mirrored abdomen is not an anatomy the
models saw. Each view is a named :class:`View`; :data:`TTA_VIEWS` is the documented set, ordered so
that its first 4 already mix shift, scale and intensity (``tta_views(k)`` = the first k)::

    shift +3,+3 px   scale 0.92   HU +25   shift -3,-3 px   scale 1.08   HU -25   shift +3,-3 px   shift -3,+3 px

Geometry lives on the model grid (size × size, after ``SliceGrid.to_model``), so every view
reuses the slice already brought onto the grid once per batch in ``set_image`` (never re-read or
re-resampled per view). A view with zoom ``s`` and shift ``(dy, dx)`` model pixels moves content
at grid position ``p`` (pixel centres, about the grid centre ``c``) to ``c + s (p − c) + d``; the
view's logits are pulled back onto the un-augmented grid with the exact inverse (``torch``
``affine_grid`` / ``grid_sample``, bilinear, ``align_corners=False``; integer shifts at zoom 1
are array slicing, exact), then onto the slice's pixels with ``SliceGrid.from_model``. Where a view does not
cover a grid pixel (content pushed out of the field by a shift or zoom-in) it has no evidence,
and the un-augmented logits stand in for it (it counts as agreeing). HU jitter adds a constant in
HU before the checkpoint's normalisation (a no-op for per-slice min-max normalisation).

Outputs (``predict``): ``"labels"`` (n, H, W) uint8 = the un-augmented prediction (the mask
shown; identical to :class:`SegmentationPredictor`'s), ``"class_votes"`` (n, C, H, W) uint8 = how
many of the K views predict each class at each pixel. The per-voxel uncertainty is
``uncertainty.class_vote_disagreement`` of those votes against the mask shown.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..device import autocast_context
from ..preprocessing import as_float_hu
from .base import PredictorOptionError
from .segmentation import SegmentationPredictor

__all__ = ["View", "TTA_VIEWS", "tta_views", "warp", "unwarp", "TTAPredictor", "MAX_VIEWS"]


@dataclass(frozen=True)
class View:
    """One test-time augmentation: zoom ``scale`` about the grid centre, then ``shift`` (dy, dx)
    in model-grid pixels, and ``hu_offset`` HU added before normalisation. ``name`` is shown in
    records and the dock."""

    name: str
    shift: tuple[float, float] = (0.0, 0.0)
    scale: float = 1.0
    hu_offset: float = 0.0

    def __post_init__(self):
        if not self.scale > 0:
            raise ValueError(f"view {self.name!r}: scale must be > 0")

    @property
    def geometric(self) -> bool:
        return self.scale != 1.0 or tuple(self.shift) != (0.0, 0.0)

    def to_dict(self) -> dict:
        return {"name": self.name, "shift_px": list(self.shift), "scale": self.scale, "hu_offset": self.hu_offset}


#: the documented view set, mixed so that any prefix covers shift, scale and intensity
TTA_VIEWS: tuple[View, ...] = (
    View("shift +3,+3 px", shift=(3.0, 3.0)),
    View("scale 0.92", scale=0.92),
    View("HU +25", hu_offset=25.0),
    View("shift -3,-3 px", shift=(-3.0, -3.0)),
    View("scale 1.08", scale=1.08),
    View("HU -25", hu_offset=-25.0),
    View("shift +3,-3 px", shift=(3.0, -3.0)),
    View("shift -3,+3 px", shift=(-3.0, 3.0)),
)
MAX_VIEWS = len(TTA_VIEWS)


def tta_views(k: int) -> tuple[View, ...]:
    """The first ``k`` views of :data:`TTA_VIEWS` (1..8). Raises ``PredictorOptionError`` otherwise."""
    if not 1 <= int(k) <= MAX_VIEWS:
        raise PredictorOptionError(f"number of TTA views must be between 1 and {MAX_VIEWS}")
    return TTA_VIEWS[: int(k)]


def _theta(view: View, size: int, inverse: bool, n: int, device, dtype) -> torch.Tensor:
    """affine_grid matrices (n, 2, 3) in normalised (x, y) coordinates (align_corners=False).

    Forward (content at u goes to s·u + t): output u' samples the input at (u' − t) / s;
    inverse: output u samples the augmented grid at s·u + t; t = 2·d / size."""
    s = float(view.scale)
    ty, tx = (2.0 * float(v) / size for v in view.shift)
    if inverse:
        m = [[s, 0.0, tx], [0.0, s, ty]]
    else:
        m = [[1.0 / s, 0.0, -tx / s], [0.0, 1.0 / s, -ty / s]]
    return torch.tensor(m, device=device, dtype=dtype).expand(n, 2, 3)


def _sample(x: torch.Tensor, view: View, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, C, S, S) resampled by the view (or its inverse) -> (values, valid (B, 1, S, S) bool)."""
    b, _, h, w = x.shape
    if h != w:
        raise ValueError(f"model grid must be square; got {h}x{w}")
    if view.scale == 1.0 and all(float(v).is_integer() for v in view.shift):
        return _shift(x, view, inverse)
    theta = _theta(view, h, inverse, b, x.device, torch.float32)
    grid = F.affine_grid(theta, (b, 1, h, w), align_corners=False)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # a grid pixel is covered when its sample point lies within the pixel centres' hull
    lim = 1.0 - 1.0 / h
    valid = (grid.abs() <= lim + 1e-6).all(-1)[:, None]
    return out.to(x.dtype), valid


def _shift(x: torch.Tensor, view: View, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer shifts as array slicing (exact, no interpolation)."""
    size = x.shape[-1]
    dy, dx = (int(v) * (-1 if inverse else 1) for v in view.shift)
    out = torch.zeros_like(x)
    valid = torch.zeros((x.shape[0], 1, size, size), dtype=torch.bool, device=x.device)

    def rng(d):  # (dst, src) slices for content moving by d pixels
        return (slice(d, size), slice(0, size - d)) if d >= 0 else (slice(0, size + d), slice(-d, size))

    (ydst, ysrc), (xdst, xsrc) = rng(dy), rng(dx)
    out[..., ydst, xdst] = x[..., ysrc, xsrc]
    valid[..., ydst, xdst] = True
    return out, valid


def warp(x: torch.Tensor, view: View, pad_value: float = 0.0) -> torch.Tensor:
    """Apply ``view``'s geometry to a model-grid batch x (B, C, S, S); uncovered pixels get
    ``pad_value`` (air in HU for images). Identity views return ``x`` itself."""
    if not view.geometric:
        return x
    out, _ = _sample(x - pad_value, view, inverse=False)
    return out + pad_value


def unwarp(y: torch.Tensor, view: View, fallback: torch.Tensor | None = None) -> torch.Tensor:
    """Pull a view's model-grid output y (B, K, S, S) back onto the un-augmented grid (the exact
    inverse of :func:`warp`); pixels the view did not cover take ``fallback`` (same shape) when
    given, 0 otherwise."""
    if not view.geometric:
        return y
    out, valid = _sample(y, view, inverse=True)
    if fallback is not None:
        out = torch.where(valid, out, fallback.to(out.dtype))
    return out


class TTAPredictor:
    """A :class:`SegmentationPredictor` run on K test-time views (``Predictor`` protocol).

    ``set_image`` brings the slices onto the model grid once (HU, before normalisation);
    ``predict`` runs the un-augmented pass and the K views on that same tensor and returns
    ``{"labels": (n, H, W) uint8 (the un-augmented prediction), "class_votes": (n, C, H, W) uint8}``
    (plus ``"probs"`` of the un-augmented pass when the base predictor returns them).
    ``views``: a sequence of :class:`View` or an int k (``tta_views(k)``).
    """

    def __init__(self, base: SegmentationPredictor, views=4):
        self.base = base
        self.views = tuple(tta_views(views) if isinstance(views, (int, np.integer)) else views)
        if not self.views:
            raise PredictorOptionError("TTA needs at least one view")
        self.class_names = base.class_names
        self.device = base.device
        self.precision = base.precision
        self._hu: torch.Tensor | None = None
        self._hw: tuple[int, int] | None = None
        self._spacing = (1.0, 1.0)

    @classmethod
    def from_checkpoint(cls, ckpt, *, device="auto", precision: str = "auto", grid_mode: str | None = None,
                        views=4) -> "TTAPredictor":
        """TTA around the segmentation predictor of a loaded checkpoint (MSA²Net, MARSeg)."""
        base = SegmentationPredictor.from_checkpoint(ckpt, device=device, precision=precision, grid_mode=grid_mode)
        return cls(base, views)

    @property
    def n_views(self) -> int:
        return len(self.views)

    def set_image(self, slices_hu: np.ndarray, spacing_yx=(1.0, 1.0)) -> None:
        """(n, H, W) HU slices + (sy, sx) mm -> the model-grid HU tensor every view starts from."""
        b = self.base
        x = torch.from_numpy(as_float_hu(slices_hu))[:, None].to(b.device)
        self._hu = b.grid.to_model(x, spacing_yx, pad_value=b.norm.pad_value_hu)
        self._hw, self._spacing = tuple(np.shape(slices_hu)[-2:]), tuple(spacing_yx)

    def _logits(self, hu: torch.Tensor) -> torch.Tensor:
        b = self.base
        x = b.norm(hu)
        if b.in_chans != 1:
            x = x.expand(-1, b.in_chans, -1, -1)
        with autocast_context(b.device, b.precision):
            return b.model(x).float()

    @torch.inference_mode()
    def predict(self) -> dict[str, np.ndarray]:
        if self._hu is None:
            raise RuntimeError("set_image() first: no slices to predict")
        b, hu = self.base, self._hu
        plain = self._logits(hu)  # (n, C, S, S)
        logits = b.grid.from_model(plain, self._hw, self._spacing)
        labels = logits.argmax(1)
        n_cls = plain.shape[1]
        votes = torch.zeros((hu.shape[0], n_cls, *self._hw), dtype=torch.uint8, device=hu.device)
        for view in self.views:
            aug = warp(hu, view, pad_value=b.norm.pad_value_hu) + view.hu_offset
            back = unwarp(self._logits(aug), view, fallback=plain)
            lab = b.grid.from_model(back, self._hw, self._spacing).argmax(1)  # (n, H, W)
            votes.scatter_add_(1, lab[:, None], torch.ones_like(lab[:, None], dtype=torch.uint8))
        out = {"labels": labels.to(torch.uint8).cpu().numpy(), "class_votes": votes.cpu().numpy()}
        if b.return_probs:
            out["probs"] = torch.softmax(logits, 1).to(torch.float16).cpu().numpy()
        return out

    def release(self) -> None:
        self._hu = None
        self.base.release()
