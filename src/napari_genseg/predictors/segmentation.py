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

__all__ = ["SegmentationPredictor", "class_argmax"]


def class_argmax(logits: torch.Tensor) -> np.ndarray:
    """Labels (n, H, W) uint8 = the arg-max over the class axis of ``logits`` (n, K, H, W), K <= 256,
    equal to ``torch.argmax(logits, 1)``: the first class wins a tie, and a NaN counts as the
    largest value (the first NaN wins), as in torch and numpy.

    ``torch.argmax`` over the strided class axis ran 30-40 ms per 512² slice of 3 classes on one
    CPU thread (the 512×512×300 CT of ``benchmarks/memory.py``: ~10 s of a 55 s run); this running
    maximum over the K class planes is one pass per class, ~3 ms (``benchmarks/memory.md``).
    """
    x = logits.detach()
    if x.device.type != "cpu":
        return x.argmax(1).to(torch.uint8).cpu().numpy()
    a = x.float().numpy() if x.dtype != torch.float32 else x.numpy()
    k = a.shape[1]
    if k > 256:
        raise ValueError(f"{k} classes do not fit uint8 labels")
    best = a[:, 0].copy()
    labels = np.zeros(best.shape, np.uint8)
    for c in range(1, k):
        plane = a[:, c]
        labels[plane > best] = c  # strictly larger: the earlier class keeps a tie
        np.maximum(best, plane, out=best)  # NaN propagates: best is NaN where any class was
    nan = np.isnan(best)
    if nan.any():  # rare: the first NaN class, as torch.argmax does
        labels[nan] = np.isnan(a.transpose(0, 2, 3, 1)[nan]).argmax(-1)
    return labels


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
        device = resolve_device(device)
        self._init_state(model.eval().to(device), device, resolve_precision(precision, device), class_names,
                         normalization, grid, return_probs, in_chans)

    def _init_state(self, model, device: torch.device, precision: str, class_names, normalization, grid,
                    return_probs: bool, in_chans: int) -> None:
        """The fields every runtime's predictor holds (the exported-model predictors of ``ort`` and
        ``ov`` pass ``model=None`` and the CPU)."""
        self.device = device
        self.precision = precision
        self.model = model
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
        out = {"labels": class_argmax(logits)}
        if self.return_probs:
            out["probs"] = torch.softmax(logits, 1).to(torch.float16).cpu().numpy()
        return out

    def release(self) -> None:
        self._x = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
