"""AR-Seg inference around the pure-torch model: samples, consensus, variability, scales.

Per slice the image embedding (and the adapter inside ``model.sample``) is computed once; the N
samples are drawn together as one batch with a KV cache. What is kept per slice is small:

* ``votes``  (H, W) uint8 — how many of the N samples mark each pixel (on the slice grid);
* ``tokens`` (N, 204) int16 — the samples' token ids, from which any sample mask and any partial
  scale (the coarse-to-fine progression) is decoded on demand.

So a 300-slice volume with N = 16 adds one uint8 volume (the votes) plus 2 MB of tokens, next to
its label volume. Consensus = votes / N > threshold (paper: mean of sample masks > 0.5);
variability = fraction of samples that disagree with the consensus, min(v, N − v) / N ∈ [0, 0.5].
"""

from __future__ import annotations

import numpy as np
import torch

from .device import autocast_context, resolve_device, resolve_precision
from .preprocessing import Normalization, SliceGrid, as_float_hu

__all__ = ["ArSegPredictor", "consensus_from_votes", "variability_from_votes"]


def consensus_from_votes(votes: np.ndarray, n: int, threshold: float = 0.5) -> np.ndarray:
    """Consensus mask: mean of the N binary sample masks > threshold."""
    return (votes.astype(np.float32) / n) > threshold


def variability_from_votes(votes: np.ndarray, n: int) -> np.ndarray:
    """Fraction of samples disagreeing with the (0.5) consensus: 0 = unanimous, 0.5 = split."""
    v = votes.astype(np.float32)
    return np.minimum(v, n - v) / n


class ArSegPredictor:
    """Engine predictor for AR-Seg checkpoints (same protocol as SegmentationPredictor)."""

    def __init__(
        self,
        ckpt,
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
    ):
        if not 1 <= n_samples <= 64:
            raise ValueError("number of samples must be between 1 and 64")
        if not 0.0 < threshold < 1.0:
            raise ValueError("consensus threshold must be between 0 and 1")
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.ckpt = ckpt
        self.model = ckpt.model.eval().to(self.device)
        self.cfg = ckpt.config
        names = list(ckpt.class_names) or ["background", "foreground"]
        if not 1 <= target_class < max(len(names), 2):
            raise ValueError(f"target class {target_class} is not one of {names[1:]}")
        self.target_class = target_class
        # the mask is binary: background + the target class, written with the target's label id
        self.class_names = names
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

    def _cond_index(self) -> int:
        # AdaLN class ids count foreground classes from 0 (class_names[0] is the background)
        return self.target_class - 1

    @torch.inference_mode()
    def predict(self, slices_hu: np.ndarray, spacing_yx=(1.0, 1.0)) -> dict[str, np.ndarray]:
        x = torch.from_numpy(as_float_hu(slices_hu))[:, None].to(self.device)
        hw = x.shape[-2:]
        x = self.norm(self.grid.to_model(x, spacing_yx, pad_value=self.norm.pad_value_hu))
        b = x.shape[0]
        cls = torch.full((b,), self._cond_index(), dtype=torch.long, device=self.device)
        with autocast_context(self.device, self.precision):
            emb = self.model.embed(x)
            tokens = self.model.sample(emb, cls, n_samples=self.n, generator=self.generator,
                                       top_k=self.top_k, **({"temperatures": self.temperatures}
                                                            if self.temperatures else {}))
        tokens = tokens.reshape(b, self.n, -1)
        votes = self._votes(tokens, hw, spacing_yx)
        labels = (consensus_from_votes(votes, self.n, self.threshold) * self.target_class).astype(np.uint8)
        return {"labels": labels, "votes": votes, "tokens": tokens.to(torch.int16).cpu().numpy()}

    def _sample_probs(self, tokens: torch.Tensor, hw, spacing_yx, upto_scale=None) -> torch.Tensor:
        """tokens (b, N, L) -> sample probabilities (b, N, H, W) on the slice grid."""
        b, n, L = tokens.shape
        with autocast_context(self.device, self.precision):
            logits = self.model.decode(tokens.reshape(b * n, L).long(), upto_scale=upto_scale)
        logits = self.mask_grid.from_model(logits.float(), hw, spacing_yx)  # (bN, 1, H, W)
        return torch.sigmoid(logits).reshape(b, n, *hw)

    def _votes(self, tokens, hw, spacing_yx) -> np.ndarray:
        probs = self._sample_probs(tokens, hw, spacing_yx)
        return (probs > 0.5).sum(1).to(torch.uint8).cpu().numpy()

    # ------------------------------------------------------------------ on-demand decoding
    @torch.inference_mode()
    def decode_samples(self, tokens: np.ndarray, hw, spacing_yx=(1.0, 1.0), upto_scale=None) -> np.ndarray:
        """tokens (N, L) of one slice -> (N, H, W) bool sample masks (partial scale when given)."""
        t = torch.as_tensor(np.asarray(tokens), device=self.device)[None]
        return (self._sample_probs(t, tuple(hw), spacing_yx, upto_scale)[0] > 0.5).cpu().numpy()

    @torch.inference_mode()
    def scale_progression(self, tokens: np.ndarray, hw, spacing_yx=(1.0, 1.0)) -> np.ndarray:
        """(K, H, W) float: for each scale k the mean of the N sample masks decoded from f̂_k."""
        k = int(self.cfg.num_scales) if hasattr(self.cfg, "num_scales") else len(self.cfg.patch_nums)
        out = [self.decode_samples(tokens, hw, spacing_yx, upto_scale=s).mean(0) for s in range(1, k + 1)]
        return np.stack(out).astype(np.float32)

    def release(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
