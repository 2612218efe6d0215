"""Display windows (what the user sees) and model input normalisation (what a model is fed).

The two are separate on purpose: changing the display window never changes a model's input.

* ``WINDOW_PRESETS`` / ``window_limits``: width/level presets -> napari contrast limits.
* ``Normalization``: per-model input mapping, stored in every checkpoint's JSON
  (``{"kind": "hu_window", "low": -125, "high": 275}`` = clip to [low, high] then scale to [0, 1];
  ``{"kind": "minmax"}`` = per-slice min-max to [0, 1] (SAM/MedSAM); ``{"kind": "zscore", "mean", "std"}``).
* ``SliceGrid``: how a slice is brought onto a model's square input grid and the logits back:
  ``"resize"`` (the papers' plain resize to N×N) or ``"spacing"`` (resample to the checkpoint's
  in-plane spacing, then centre pad/crop to N×N; nnU-Net's target-spacing idea).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "GRID_MODES",
    "WINDOW_PRESETS",
    "window_limits",
    "Normalization",
    "SliceGrid",
]

#: name -> (width, level) in HU
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "abdomen": (400.0, 40.0),
    "liver": (150.0, 30.0),
    "lung": (1500.0, -600.0),
    "bone": (1800.0, 400.0),
    "brain": (80.0, 40.0),
    "mediastinum": (350.0, 50.0),
}


def window_limits(preset: str | tuple[float, float]) -> tuple[float, float]:
    """Contrast limits (low, high) of a preset name or a (width, level) pair."""
    if isinstance(preset, str):
        try:
            width, level = WINDOW_PRESETS[preset.lower()]
        except KeyError:
            raise KeyError(f"unknown window preset {preset!r}; known: {', '.join(WINDOW_PRESETS)}") from None
    else:
        width, level = preset
    if width <= 0:
        raise ValueError("window width must be positive")
    return (level - width / 2.0, level + width / 2.0)


@dataclass(frozen=True)
class Normalization:
    kind: str = "hu_window"
    low: float = -125.0
    high: float = 275.0
    mean: float = 0.0
    std: float = 1.0
    #: hu_window output range: [0, 1] by default; the official MSA²Net code feeds [-1, 1]
    out_min: float = 0.0
    out_max: float = 1.0

    def __post_init__(self):
        if self.kind not in ("hu_window", "minmax", "zscore"):
            raise ValueError(f"unknown normalisation {self.kind!r}")
        if self.kind == "hu_window" and not self.high > self.low:
            raise ValueError("hu_window needs high > low")
        if self.kind == "zscore" and not self.std > 0:
            raise ValueError("zscore needs std > 0")

    @classmethod
    def from_dict(cls, d: dict | None) -> "Normalization":
        if not d:
            return cls()
        keys = ("kind", "low", "high", "mean", "std", "out_min", "out_max")
        return cls(**{k: v for k, v in d.items() if k in keys})

    def to_dict(self) -> dict:
        if self.kind == "hu_window":
            d = {"kind": "hu_window", "low": self.low, "high": self.high}
            if (self.out_min, self.out_max) != (0.0, 1.0):
                d.update(out_min=self.out_min, out_max=self.out_max)
            return d
        if self.kind == "zscore":
            return {"kind": "zscore", "mean": self.mean, "std": self.std}
        return {"kind": "minmax"}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 1, H, W) HU float -> normalised float."""
        if self.kind == "hu_window":
            unit = (x.clamp(self.low, self.high) - self.low) / (self.high - self.low)
            if (self.out_min, self.out_max) == (0.0, 1.0):
                return unit
            return unit * (self.out_max - self.out_min) + self.out_min
        if self.kind == "zscore":
            return (x - self.mean) / self.std
        lo = x.amin(dim=(-2, -1), keepdim=True)
        hi = x.amax(dim=(-2, -1), keepdim=True)
        return (x - lo) / (hi - lo).clamp_min(1e-6)

    @property
    def pad_value_hu(self) -> float:
        """HU used to pad outside the field of view (air)."""
        return -1024.0


#: how a slice reaches a model's square grid (checkpoint JSON ``input.grid``, ``--grid``)
GRID_MODES = ("resize", "spacing")


@dataclass(frozen=True)
class SliceGrid:
    """Maps (H, W) slices with pixel spacing (sy, sx) onto a size×size model grid and back.

    mode "resize": bilinear resize of the whole slice to size×size (the papers' way).
    mode "spacing": resample to ``target_spacing`` mm then centre pad (with air) / crop to
    size×size; the inverse maps logits back onto the original pixels (outside the crop -> background).
    """

    size: int
    mode: str = "resize"
    target_spacing: tuple[float, float] | None = None

    def __post_init__(self):
        if self.mode not in GRID_MODES:
            raise ValueError(f"unknown grid mode {self.mode!r} (one of {', '.join(GRID_MODES)})")
        if self.mode == "spacing" and not self.target_spacing:
            raise ValueError("grid mode 'spacing' needs target_spacing")
        if self.target_spacing is not None:
            object.__setattr__(self, "target_spacing", tuple(float(v) for v in self.target_spacing))

    @classmethod
    def create(cls, size: int, mode: str = "resize", spacing_mm: float | None = None) -> "SliceGrid":
        """A training grid: ``mode`` "resize", or "spacing" at ``spacing_mm`` in-plane (default
        384 mm / ``size``: a 384 mm field of view, enough for an adult abdomen)."""
        if mode == "spacing":
            sp = float(spacing_mm) if spacing_mm else 384.0 / int(size)
            return cls(int(size), "spacing", (sp, sp))
        return cls(int(size), mode)

    def to_meta(self) -> dict:
        """The checkpoint JSON's ``input`` entries: ``{"grid": mode, "spacing_mm": [sy, sx] | None}``."""
        return {"grid": self.mode, "spacing_mm": list(self.target_spacing) if self.mode == "spacing" else None}

    @classmethod
    def from_meta(cls, meta: dict, size: int, mode: str | None = None) -> "SliceGrid":
        """The grid a checkpoint was trained on (``input`` of its JSON; version-1 files name the mode
        ``"resize"``), or ``mode`` instead when given. "spacing" without a recorded spacing falls
        back to "resize" (the checkpoint does not say which field of view it saw)."""
        mode = mode or meta.get("grid") or meta.get("resize") or "resize"
        spacing = meta.get("spacing_mm")
        if mode == "spacing" and not spacing:
            mode = "resize"
        return cls(int(size), mode, tuple(spacing) if mode == "spacing" else None)

    def with_size(self, size: int) -> "SliceGrid":
        """The grid with the same field of view at ``size``×``size`` (e.g. AR-Seg's mask grid next
        to its image grid): "spacing" scales the target spacing by ``self.size / size``."""
        if self.mode == "resize":
            return SliceGrid(int(size), "resize")
        f = self.size / int(size)
        return SliceGrid(int(size), "spacing", (self.target_spacing[0] * f, self.target_spacing[1] * f))

    def _scaled_hw(self, hw, spacing):
        if self.mode == "resize":
            return (self.size, self.size)
        ty, tx = self.target_spacing
        return (max(1, round(hw[0] * spacing[0] / ty)), max(1, round(hw[1] * spacing[1] / tx)))

    def to_model(self, x: torch.Tensor, spacing=(1.0, 1.0), pad_value: float = -1024.0) -> torch.Tensor:
        """x (B, C, H, W) -> (B, C, size, size)."""
        hw = tuple(x.shape[-2:])
        sh = self._scaled_hw(hw, spacing)
        if sh != hw:
            x = F.interpolate(x, size=sh, mode="bilinear", align_corners=False, antialias=True)
        if self.mode == "resize":
            return x
        return _center_fit(x, self.size, pad_value)

    def from_model(self, logits: torch.Tensor, hw, spacing=(1.0, 1.0)) -> torch.Tensor:
        """logits (B, K, size, size) -> (B, K, H, W) on the original pixels."""
        hw = tuple(int(v) for v in hw)
        if self.mode == "resize":
            if tuple(logits.shape[-2:]) == hw:
                return logits
            return F.interpolate(logits, size=hw, mode="bilinear", align_corners=False)
        sh = self._scaled_hw(hw, spacing)
        # undo the pad/crop: put logits back on the scaled grid; outside = strong background
        fill = torch.zeros(logits.shape[:2], dtype=logits.dtype, device=logits.device)
        fill[:, 0] = 20.0
        if logits.shape[1] > 1:
            fill[:, 1:] = -20.0
        else:
            fill[:, 0] = -20.0
        canvas = fill[:, :, None, None].expand(*logits.shape[:2], *sh).clone()
        (cy0, cy1, sy0, sy1), (cx0, cx1, sx0, sx1) = (_fit_slices(sh[0], self.size), _fit_slices(sh[1], self.size))
        canvas[..., cy0:cy1, cx0:cx1] = logits[..., sy0:sy1, sx0:sx1]
        if sh != hw:
            canvas = F.interpolate(canvas, size=hw, mode="bilinear", align_corners=False)
        return canvas


def _fit_slices(n: int, size: int):
    """Index ranges: (canvas_lo, canvas_hi, model_lo, model_hi) for centre pad/crop of n <-> size."""
    if n >= size:  # crop
        off = (n - size) // 2
        return off, off + size, 0, size
    off = (size - n) // 2  # pad
    return 0, n, off, off + n


def _center_fit(x: torch.Tensor, size: int, pad_value: float) -> torch.Tensor:
    out = torch.full((*x.shape[:2], size, size), pad_value, dtype=x.dtype, device=x.device)
    (cy0, cy1, sy0, sy1), (cx0, cx1, sx0, sx1) = _fit_slices(x.shape[-2], size), _fit_slices(x.shape[-1], size)
    out[..., sy0:sy1, sx0:sx1] = x[..., cy0:cy1, cx0:cx1]
    return out


def as_float_hu(slices: np.ndarray) -> np.ndarray:
    """(n, H, W) any numeric dtype -> float32 with NaN replaced by air."""
    out = np.asarray(slices, dtype=np.float32)
    if not np.all(np.isfinite(out)):
        out = np.nan_to_num(out, nan=-1024.0, posinf=3071.0, neginf=-1024.0)
    return out
