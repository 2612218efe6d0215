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
  of the lean model present: same outputs, less memory;
* with bf16 on a CPU that computes it natively (the opt-in ``--precision bf16``, resolved by
  ``napari_genseg.device``), the predictor runs a copy whose Linear and Conv weights are stored in
  bf16 (:func:`bf16_weights`). Autocast would cast the same fp32 weights to bf16 on every call
  (the same values: ~0.8 GB of memory traffic per forward of the paper model, 0.17 s of a 2.5 s
  256² slice at one thread, measured); norms, embeddings and the caller's model stay fp32;
* on the CPU a batch of slices runs through the model ``cpu_chunk`` (1) slices at a time: the
  forward is compute-bound at one slice already (320 tokens per GEMM, KL-encoder convolutions at
  256²), and a batch of 8 only makes the activations (0.27 GB per KL-encoder tensor) spill the
  caches: 3-5 % slower per slice, measured (``benchmarks/marseg_speed.md``). Batches still save
  the per-call work around the model (preprocessing, the return to the slice grid).
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn as nn

from .segmentation import SegmentationPredictor

__all__ = ["MarSegPredictor", "inference_model", "bf16_weights"]

#: modules whose weights autocast casts to bf16 on every call (and this predictor once)
_MATMUL_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def bf16_weights(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose Linear / Conv weights and biases are bf16 (frozen); every other
    parameter and buffer (norms, embeddings, BatchNorm statistics) keeps its dtype. ``model`` is
    not changed; only the cast weights are new memory (half their fp32 size).

    Meant to run under bf16 autocast, which computes these layers in bf16 anyway: the outputs are
    those of autocast on the fp32 model up to the order of summation. Called without autocast it
    fails on the dtype mismatch (never silently computes in another precision)."""
    memo: dict[int, object] = {}
    for m in model.modules():
        if isinstance(m, _MATMUL_MODULES):
            for p in m.parameters(recurse=False):
                if p.is_floating_point() and p.dtype != torch.bfloat16:
                    memo[id(p)] = nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False)
    return copy.deepcopy(model, memo)  # pre-filled memo: the cast parameters replace the originals


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
    """:class:`SegmentationPredictor` for MARSeg checkpoints (see the module docstring).

    Same arguments as :class:`SegmentationPredictor`; when the resolved precision is bf16 on the
    CPU, ``self.model`` is :func:`bf16_weights` of ``model`` (``model`` itself is left as it is).
    """

    #: slices per model call on the CPU (see the module docstring); other devices take the batch whole
    cpu_chunk: int = 1

    def __init__(self, model: nn.Module, *args, **kwargs) -> None:
        super().__init__(model, *args, **kwargs)
        if self.precision == "bf16" and self.device.type == "cpu":
            self.model = bf16_weights(self.model).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (n, K, size, size) of the normalised input (n, C, size, size); on the CPU in
        chunks of :attr:`cpu_chunk` slices."""
        if self.device.type != "cpu" or x.shape[0] <= self.cpu_chunk:
            return super().forward(x)
        return torch.cat([super(MarSegPredictor, self).forward(c) for c in x.split(self.cpu_chunk)])

    @classmethod
    def from_checkpoint(cls, ckpt, *, device="auto", precision: str = "auto", grid_mode: str | None = None,
                        return_probs: bool = False) -> "MarSegPredictor":
        """The predictor of a loaded MARSeg stage-2 checkpoint; ``CheckpointError`` for stage 0/1."""
        from .base import input_contract

        model = inference_model(ckpt)
        norm, grid = input_contract(ckpt, grid_mode)
        return cls(model, ckpt.class_names, norm, grid, device, precision, return_probs,
                   in_chans=int(ckpt.config.in_chans))
