"""AR-Seg around the pure-torch model: N samples per slice, their consensus, votes and scales.

Paper: Chen et al., "Autoregressive Medical Image Segmentation via Next-Scale Mask Prediction"
(MICCAI 2025), Sec. 2.3-2.4. Per batch of slices, ``set_image`` computes the image embedding once
(``ArSeg.embed``); ``predict`` draws the N samples of every slice together as one batch with a
KV cache (``ArSeg.sample``) and decodes them. What is kept per slice is small:

* ``votes``  (H, W) uint8: how many of the N samples mark each pixel (on the slice's pixels);
* ``tokens`` (N, L) int16: the samples' token ids (L = 204 for 8 scales), from which any sample
  mask and any partial scale (the coarse-to-fine progression) is decoded on demand.

Consensus = votes / N > threshold (paper: mean of the sample masks > 0.5). The per-voxel
uncertainty is ``uncertainty.disagreement_percent`` of the votes against the consensus shown.
Sample masks are decoded slice by slice (N rows at a time) on every path, so the votes of
``predict`` and the masks of ``decode_samples`` / ``decode_progression`` are the same numbers.
"""

from __future__ import annotations

import numpy as np
import torch

from ..device import autocast_context, resolve_device, resolve_precision
from ..preprocessing import Normalization, SliceGrid
from .base import PredictorOptionError, input_contract, model_input
from .embedding_cache import EmbeddingCache, embedding_signature

__all__ = ["ArSegPredictor", "consensus_from_votes"]


def consensus_from_votes(votes: np.ndarray, n: int, threshold: float = 0.5) -> np.ndarray:
    """Consensus mask (bool, same shape as ``votes``): mean of the N binary sample masks > threshold."""
    return (np.asarray(votes).astype(np.float32) / n) > threshold


class ArSegPredictor:
    """Engine predictor for AR-Seg checkpoints (``Predictor`` protocol of ``predictors.base``).

    ``predict`` -> ``{"labels": (n, H, W) uint8 (consensus × target class id), "votes": (n, H, W)
    uint8, "tokens": (n, N, L) int16}``. The mask is binary: background + ``target_class``
    (an index into ``class_names``; AdaLN class conditioning uses ``target_class - 1``).
    Raises ``ValueError`` for N outside 1..64, a threshold outside (0, 1) or an unknown class.

    ``embedding_cache``: where image embeddings are kept between runs (``embedding_cache``
    module): None = the default folder, a folder, "off"/False = none, or an ``EmbeddingCache``.
    A second run on the same slices (another seed, N, class or threshold) then skips the encoder.
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
        n_samples: int = 16,
        threshold: float = 0.5,
        target_class: int = 1,
        seed: int = 0,
        top_k: int = 100,
        temperatures=None,
        embedding_cache=None,
    ):
        if not 1 <= n_samples <= 64:
            raise PredictorOptionError("number of samples must be between 1 and 64")
        if not 0.0 < threshold < 1.0:
            raise PredictorOptionError("consensus threshold must be between 0 and 1")
        names = list(class_names) or ["background", "foreground"]
        if not 1 <= target_class < max(len(names), 2):
            raise PredictorOptionError(f"target class {target_class} is not one of {names[1:]}")
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.model = model.eval().to(self.device)
        self.cfg = model.cfg
        self.class_names = names
        self.target_class = target_class
        self.norm = normalization
        self.grid = grid
        # the mask grid covers the image grid's field of view at mask_size (spacing scaled)
        self.mask_grid = grid.with_size(int(self.cfg.mask_size))
        self.n = n_samples
        self.threshold = threshold
        self.seed = seed
        self.top_k = top_k
        self.temperatures = temperatures
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self._emb: torch.Tensor | None = None
        self._hw: tuple[int, int] | None = None
        self._spacing = (1.0, 1.0)
        self.embedding_cache = EmbeddingCache.from_option(embedding_cache)

    @classmethod
    def from_checkpoint(cls, ckpt, *, device="auto", precision: str = "auto", grid_mode: str | None = None,
                        n_samples: int = 16, threshold: float = 0.5, target_class: int = 1, seed: int = 0,
                        top_k: int = 100, temperatures=None, embedding_cache=None) -> "ArSegPredictor":
        """The predictor of a loaded AR-Seg checkpoint (``models.checkpoints.Checkpoint``)."""
        norm, grid = input_contract(ckpt, grid_mode)
        return cls(ckpt.model, ckpt.class_names, norm, grid, device, precision, n_samples, threshold,
                   target_class, seed, top_k, temperatures, embedding_cache)

    @property
    def num_scales(self) -> int:
        return int(self.cfg.num_scales)

    # ------------------------------------------------------------------ protocol
    @torch.inference_mode()
    def set_image(self, slices_hu: np.ndarray, spacing_yx=(1.0, 1.0)) -> None:
        """Embed the batch once: (n, H, W) HU -> image embedding (n, C_e, h, w) on the device."""
        x = model_input(slices_hu, spacing_yx, self.grid, self.norm, self.device)
        cache = self.embedding_cache
        self._emb = self.embed(x) if cache is None else cache.embed(x, self._embedding_base, self.embed)
        self._hw, self._spacing = tuple(np.shape(slices_hu)[-2:]), tuple(spacing_yx)

    @torch.inference_mode()
    def predict(self) -> dict[str, np.ndarray]:
        if self._emb is None:
            raise RuntimeError("set_image() first: no slices to predict")
        b = self._emb.shape[0]
        cls = torch.full((b,), self.target_class - 1, dtype=torch.long, device=self.device)
        opts = {"temperatures": self.temperatures} if self.temperatures else {}
        with autocast_context(self.device, self.precision):
            tokens = self.model.sample(self._emb, cls, n_samples=self.n, generator=self.generator,
                                       top_k=self.top_k, **opts)  # (b, N, L)
        votes = np.stack([self._masks(t, self._hw, self._spacing).sum(0, dtype=np.uint8) for t in tokens])
        labels = (consensus_from_votes(votes, self.n, self.threshold) * self.target_class).astype(np.uint8)
        return {"labels": labels, "votes": votes, "tokens": tokens.to(torch.int16).cpu().numpy()}

    def release(self) -> None:
        self._emb = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ the model's steps
    # (another runtime replaces these two: ``predictors.ort.OrtArSegPredictor``)
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Image embedding (n, C_e, h, w) of the normalised model input x (n, C, S, S)."""
        with autocast_context(self.device, self.precision):
            return self.model.embed(x)

    def _embedding_base(self) -> dict:
        """What this predictor's cached embeddings are signed by, besides each slice's input."""
        return embedding_signature(self.model, self.norm, self.grid, self.backend, self.device, self.precision)

    def decode(self, tokens: torch.Tensor, upto_scale: int | None = None) -> torch.Tensor:
        """Mask logits (N, 1, M, M) of token ids (N, L) after scale ``upto_scale`` (None = all)."""
        with autocast_context(self.device, self.precision):
            return self.model.decode(tokens.long(), upto_scale=upto_scale)

    # ------------------------------------------------------------------ decoding tokens
    def _probs(self, tokens: torch.Tensor, hw, spacing_yx, upto_scale=None) -> torch.Tensor:
        """tokens (N, L) of one slice -> sample probabilities (N, H, W) on the slice's pixels."""
        logits = self.decode(tokens, upto_scale)  # (N, 1, S, S)
        logits = self.mask_grid.from_model(logits.float(), tuple(hw), spacing_yx)  # (N, 1, H, W)
        return torch.sigmoid(logits[:, 0])

    def _masks(self, tokens: torch.Tensor, hw, spacing_yx, upto_scale=None) -> np.ndarray:
        return (self._probs(tokens, hw, spacing_yx, upto_scale) > 0.5).cpu().numpy()

    def _tokens(self, tokens) -> torch.Tensor:
        return torch.as_tensor(np.asarray(tokens), device=self.device)

    @torch.inference_mode()
    def sample_probabilities(self, tokens: np.ndarray, hw, spacing_yx=(1.0, 1.0)) -> np.ndarray:
        """tokens (b, N, L) -> (b, N, H, W) float32 sigmoid of each sample's full-scale mask logits."""
        t = self._tokens(tokens)
        return np.stack([self._probs(ti, hw, spacing_yx).float().cpu().numpy() for ti in t])

    @torch.inference_mode()
    def decode_samples(self, tokens: np.ndarray, hw, spacing_yx=(1.0, 1.0), upto_scale=None) -> np.ndarray:
        """tokens (N, L) of one slice -> (N, H, W) bool sample masks (after scale ``upto_scale``
        1..K when given, the full mask otherwise)."""
        return self._masks(self._tokens(tokens), hw, spacing_yx, upto_scale)

    @torch.inference_mode()
    def decode_progression(self, tokens: np.ndarray, hw, spacing_yx=(1.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
        """Everything the explorer shows for one slice, decoded in one go.

        tokens (N, L) -> (votes per scale (K, H, W) uint8: how many of the N masks decoded from
        f̂_k mark each pixel, k = 1..K; the N full-scale sample masks (N, H, W) bool).
        ``votes[-1]`` equals the slice's ``predict()["votes"]``.
        """
        t = self._tokens(tokens)
        per_scale, masks = [], None
        for k in range(1, self.num_scales + 1):
            masks = self._masks(t, hw, spacing_yx, upto_scale=k)
            per_scale.append(masks.sum(0, dtype=np.uint8))
        return np.stack(per_scale), masks
