"""MARSeg's predictor: :class:`SegmentationPredictor` on the lean inference build of a stage-2
checkpoint.

MARSeg's input is that of any segmentation model here: the checkpoint's ``input`` (HU window ->
[-1, 1] for the project's MARSeg training, ``models.checkpoints.OFFICIAL_INPUTS`` for imported
official weights) repeated to ``in_chans`` (3) identical channels, slices batched.
``MarSeg.forward`` without a label puts ``fake_latent`` in every buffer token and masks nothing
(the official evaluation). What this subclass adds:

* a checkpoint of MARSeg's stage 0 (KL autoencoder) or stage 1 (MAR pre-training) is refused
  with one line (it has no segmentation head);
* the model runs as its ``inference_only`` build (no diffusion head, its position embedding, mask
  token, class embedding, unused FPN convs), loaded from the checkpoint's weights with every key
  of the lean model present: same outputs, less memory.
"""

from __future__ import annotations

import dataclasses

from .segmentation import SegmentationPredictor

__all__ = ["MarSegPredictor", "inference_model"]


def inference_model(ckpt):
    """The ``inference_only`` MarSeg of a loaded stage-2 checkpoint (on the checkpoint model's device
    and dtype; the checkpoint's model itself when it is already that build). Raises
    ``CheckpointError`` (one line) for a stage-0/1 checkpoint."""
    import torch

    from ..models.checkpoints import CheckpointError, load_state_dict_report, require_segmentation_model
    from ..models.marseg import MarSeg

    cfg = require_segmentation_model(ckpt).config
    if cfg.inference_only:
        return ckpt.model
    p = next(ckpt.model.parameters())
    lean = MarSeg(dataclasses.replace(cfg, inference_only=True))
    report = load_state_dict_report(lean, ckpt.model.state_dict())
    if report.missing or report.shape_mismatch:  # cannot happen for a MarSeg of the same config
        raise CheckpointError(f"MARSeg inference build does not fit its checkpoint: {report.first_problem()}")
    with torch.no_grad():
        return lean.to(device=p.device, dtype=p.dtype).eval()


class MarSegPredictor(SegmentationPredictor):
    """:class:`SegmentationPredictor` for MARSeg checkpoints (see the module docstring)."""

    @classmethod
    def from_checkpoint(cls, ckpt, *, device="auto", precision: str = "auto", grid_mode: str | None = None,
                        return_probs: bool = False) -> "MarSegPredictor":
        """The predictor of a loaded MARSeg stage-2 checkpoint; ``CheckpointError`` for stage 0/1."""
        from .base import input_contract

        model = inference_model(ckpt)
        norm, grid = input_contract(ckpt, grid_mode)
        return cls(model, ckpt.class_names, norm, grid, device, precision, return_probs,
                   in_chans=int(ckpt.config.in_chans))
