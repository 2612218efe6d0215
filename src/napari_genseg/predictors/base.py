"""The one protocol every predictor follows, and the input contract they share.

A predictor owns a loaded model and everything around it (SAM's ``SamPredictor`` idea, Kirillov
et al. 2023, ``segment_anything/predictor.py``): device and precision, the checkpoint's input
normalisation, its slice grid, and the way outputs go back onto the slice's pixels. The engine
(``napari_genseg.engine.run_volume``) drives any predictor through three calls per batch:

1. ``set_image(slices_hu, spacing_yx)``: bring a batch of slices onto the model grid and compute
   everything that depends on the image only, once (AR-Seg: the image embedding that all N
   samples share);
2. ``predict()``: the batch's outputs, a dict of numpy arrays, one leading entry per slice;
   ``"labels"`` (n, H, W) uint8 is always there, other keys are the family's extras;
3. ``release()``: drop the per-image state and return cached accelerator memory; the predictor
   stays usable (``set_image`` again).

Attributes: ``class_names`` (index = label id, 0 = background), ``device`` (``torch.device``),
``precision`` ("fp32", "bf16" or "fp16" as resolved by ``napari_genseg.device``) and, optionally,
``backend`` (the runtime: "torch" when absent, "onnxruntime" for ``predictors.ort``).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch

from ..errors import InputError
from ..preprocessing import Normalization, SliceGrid, as_float_hu

__all__ = ["Predictor", "PredictorOptionError", "input_contract", "model_input"]


class PredictorOptionError(InputError, ValueError):
    """A predictor option the user chose that cannot be used (e.g. N samples out of range)."""


@runtime_checkable
class Predictor(Protocol):
    """What the engine knows of a model (see the module docstring)."""

    class_names: list[str]
    device: torch.device
    precision: str

    def set_image(self, slices_hu: np.ndarray, spacing_yx: tuple[float, float]) -> None:
        """Take a batch of slices, (n, H, W) in HU with in-plane pixel spacing (sy, sx) in mm."""
        ...

    def predict(self) -> dict[str, np.ndarray]:
        """Outputs for the batch given to the last ``set_image``; ``"labels"`` (n, H, W) uint8."""
        ...

    def release(self) -> None:
        """Drop the per-image state and free cached accelerator memory."""
        ...


def input_contract(ckpt, grid_mode: str | None = None) -> tuple[Normalization, SliceGrid]:
    """The input normalisation and slice grid a checkpoint was trained with (its JSON ``input``:
    ``normalization``, ``grid``, ``spacing_mm``); ``grid_mode`` ("resize"/"spacing") overrides the
    recorded grid mode. Raises ``ValueError`` for an unknown normalisation or grid mode."""
    norm = Normalization.from_dict(ckpt.input.get("normalization"))
    grid = SliceGrid.from_meta(ckpt.input, ckpt.config.img_size, grid_mode)
    return norm, grid


def model_input(slices_hu: np.ndarray, spacing_yx, grid: SliceGrid, norm: Normalization,
                device: torch.device) -> torch.Tensor:
    """(n, H, W) HU slices -> the model's normalised input (n, 1, size, size) on ``device``.

    Outside the field of view (spacing grid) the slice is padded with air before normalisation.
    """
    x = torch.from_numpy(as_float_hu(slices_hu))[:, None].to(device)  # (n, 1, H, W)
    x = grid.to_model(x, spacing_yx, pad_value=norm.pad_value_hu)  # (n, 1, size, size)
    return norm(x)
