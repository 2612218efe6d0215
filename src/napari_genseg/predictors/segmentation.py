"""Deterministic segmentation models: one forward pass -> per-class logits (MSA²Net; MARSeg).

Any ``nn.Module`` whose ``forward`` maps the normalised input (n, in_chans, size, size) to logits
(n, K, size, size) runs through :class:`SegmentationPredictor`: the slice goes onto the model grid
(``SliceGrid.to_model``), the logits come back onto the slice's pixels (``SliceGrid.from_model``),
and the label is the arg-max over the K classes.
"""

from __future__ import annotations

import numpy as np
import torch

from ..device import autocast_context, resolve_device, resolve_precision
from ..preprocessing import Normalization, SliceGrid
from .base import input_contract, model_input

__all__ = ["SegmentationPredictor"]


class SegmentationPredictor:
    """A segmentation model (forward -> logits) with its input contract.

    ``set_image``: (n, H, W) HU + spacing (sy, sx) mm; ``predict`` -> ``{"labels": (n, H, W) uint8}``
    and, with ``return_probs``, ``"probs"``: (n, K, H, W) float16 softmax probabilities.
    The model has no image-only stage, so ``set_image`` prepares the model input and ``predict``
    runs the forward pass (:meth:`forward`, in torch here; ``backend`` names the runtime).
    """

    backend = "torch"

    def __init__(
        self,
        model: torch.nn.Module,
        class_names: list[str],
        normalization: Normalization,
        grid: SliceGrid,
        device="auto",
        precision: str = "auto",
        return_probs: bool = False,
        in_chans: int = 1,
    ):
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.model = model.eval().to(self.device)
        self.class_names = list(class_names)
        self.norm = normalization
        self.grid = grid
        self.return_probs = return_probs
        self.in_chans = in_chans
        self._x: torch.Tensor | None = None
        self._hw: tuple[int, int] | None = None
        self._spacing = (1.0, 1.0)

    @classmethod
    def from_checkpoint(cls, ckpt, *, device="auto", precision: str = "auto", grid_mode: str | None = None,
                        return_probs: bool = False) -> "SegmentationPredictor":
        """The predictor of a loaded checkpoint (``napari_genseg.models.checkpoints.Checkpoint``)."""
        norm, grid = input_contract(ckpt, grid_mode)
        return cls(ckpt.model, ckpt.class_names, norm, grid, device, precision, return_probs,
                   in_chans=getattr(ckpt.config, "in_chans", 1))

    def set_image(self, slices_hu: np.ndarray, spacing_yx=(1.0, 1.0)) -> None:
        x = model_input(slices_hu, spacing_yx, self.grid, self.norm, self.device)
        if self.in_chans != 1:
            x = x.expand(-1, self.in_chans, -1, -1)
        self._x, self._hw, self._spacing = x, tuple(np.shape(slices_hu)[-2:]), tuple(spacing_yx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's logits (n, K, size, size) for its normalised input ``x`` (n, C, size, size);
        the one step another runtime replaces (``predictors.ort``)."""
        with autocast_context(self.device, self.precision):
            return self.model(x)

    @torch.inference_mode()
    def predict(self) -> dict[str, np.ndarray]:
        if self._x is None:
            raise RuntimeError("set_image() first: no slices to predict")
        logits = self.forward(self._x)
        logits = self.grid.from_model(logits.float(), self._hw, self._spacing)  # (n, K, H, W)
        out = {"labels": logits.argmax(1).to(torch.uint8).cpu().numpy()}
        if self.return_probs:
            out["probs"] = torch.softmax(logits, 1).to(torch.float16).cpu().numpy()
        return out

    def release(self) -> None:
        self._x = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
