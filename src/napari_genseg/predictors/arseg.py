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

Redraw the finer scales (issue 13; :meth:`ArSegPredictor.redraw`): a mask edited at scale k is
re-quantised by the mask VQ's residual quantiser (paper Eq. 1 / Sec. 2.1; spec "Multi-scale mask
autoencoder"), its tokens of scales 1..k are teacher-forced and scales k+1..K are sampled N times on
the slice's (cached) image embedding: p(r_{k+1..K} | r_{1..k}, c, f), the tail of the next-scale
factorisation (Eq. 3, Sec. 2.2) conditioned on the reader's coarse scales, drawn by Eq. 4 and
aggregated as in Sec. 2.3 (consensus of N samples). Geometry of the mask grid (M x M, M =
``cfg.mask_size``) on the slice: :meth:`ArSegPredictor.mask_grid_transform`; a click's cell:
:meth:`ArSegPredictor.click_cell`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..device import autocast_context, resolve_device, resolve_precision
from ..errors import InputError
from ..preprocessing import Normalization, SliceGrid
from .base import PredictorOptionError, input_contract, model_input
from .embedding_cache import EmbeddingCache, embedding_signature, tensor_digest
from .uncertainty import disagreement_percent

__all__ = ["ArSegPredictor", "RedrawResult", "RedrawError", "consensus_from_votes", "cell_block",
           "redraw_consensus", "check_box", "check_spacing", "paste_target"]


class RedrawError(InputError, ValueError):
    """A redraw request that cannot be used (a scale outside 1..K-1, a mask of the wrong shape, a box
    or click outside the slice)."""


@dataclass
class RedrawResult:
    """One redraw of the finer scales (:meth:`ArSegPredictor.redraw`), on the slice grid (H, W).

    tokens (N, L) int64: ``tokens[:, :L_k]`` equal ``edited_tokens[:L_k]`` (L_k = sum pn_s², s <= k);
    samples (N, H, W) bool: the N full-scale masks (the whole slice, box or not);
    consensus (H, W) bool: mean of the samples > threshold inside ``box``, ``previous`` outside it;
    variability (H, W) float32: % of the N samples disagreeing with the consensus (the explorer's
    map, ``uncertainty.disagreement_percent``) inside the box, 0 outside it;
    from_scale: k; seconds: wall time of the segmentor steps after k plus the decoding of the N masks;
    embedding_cached: True when the image embedding came from a cache (no encoder run);
    edited_tokens (L,) int64: all K scales of the (clicked) edited mask's quantisation;
    cells: the (i, j) scale-k cell of every click, in order; box: (y0, y1, x0, x1) the redraw changed.
    """

    tokens: np.ndarray
    samples: np.ndarray
    consensus: np.ndarray
    variability: np.ndarray
    from_scale: int
    seconds: float
    embedding_cached: bool
    edited_tokens: np.ndarray | None = None
    cells: list = field(default_factory=list)
    box: tuple | None = None


def cell_block(i: int, j: int, k_pn: int, m: int) -> tuple[slice, slice]:
    """Mask-grid rows and columns of the scale cell (i, j) of a pn x pn scale on an (m, m) grid:
    the pixels (u, v) with floor(u * pn / m) == i and floor(v * pn / m) == j (the click rule)."""
    def span(a: int) -> slice:
        return slice(-(-a * m // k_pn), -(-(a + 1) * m // k_pn))  # ceil(a m / pn) .. ceil((a+1) m / pn)
    return span(int(i)), span(int(j))


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
        self._emb_keys: list[str] = []  # input digests of ``_emb``'s slices (no cache: redraw reuses them)
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
        self._emb_keys = [tensor_digest(xi) for xi in x] if cache is None else []
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
        self._emb_keys = []
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

    # ------------------------------------------------------------------ the mask grid on the slice
    def _axis_maps(self, hw, spacing_yx) -> tuple[tuple[float, float], tuple[float, float]]:
        """Per axis (y, x): (s, d) with slice coordinate = (u + d + 0.5) * s - 0.5 of mask-grid pixel u
        (s: slice pixels per mask pixel; d: mask-grid offset of the centre pad (< 0) or crop (> 0))."""
        g, m = self.mask_grid, int(self.cfg.mask_size)
        hw = tuple(int(v) for v in hw)
        sh = g._scaled_hw(hw, tuple(float(v) for v in spacing_yx))
        out = []
        for n, ns in zip(hw, sh):
            if g.mode == "resize":
                out.append((n / m, 0.0))
            else:
                off = (ns - m) // 2 if ns >= m else -((m - ns) // 2)
                out.append((n / ns, float(off)))
        return out[0], out[1]

    def mask_grid_transform(self, hw, spacing_yx=(1.0, 1.0)) -> tuple[tuple[float, float], tuple[float, float]]:
        """napari ``scale`` and ``translate`` (in slice pixels, (y, x)) that overlay an (M, M) mask-grid
        array on the (H, W) slice: mask pixel u lies at slice coordinate u * scale + translate.

        M = ``cfg.mask_size``; the grid covers the image grid's field of view (``SliceGrid.with_size``):
        "resize" stretches it over the slice, "spacing" puts it at the checkpoint's mm spacing,
        centred (pixels off the slice are padding). Exact inverse of the bilinear ``from_model``
        (align_corners False). Multiply by the slice's own layer scale for a layer in mm.
        """
        (sy, dy), (sx, dx) = self._axis_maps(hw, spacing_yx)
        return (sy, sx), ((dy + 0.5) * sy - 0.5, (dx + 0.5) * sx - 0.5)

    def to_mask_grid(self, mask: np.ndarray, spacing_yx=(1.0, 1.0)) -> np.ndarray:
        """(H, W) bool slice mask -> (M, M) bool on the model's mask grid: the fraction of each mask
        pixel covered (bilinear with antialias, as the image goes to the model) > 0.5; padding = 0."""
        m = np.asarray(mask)
        if m.ndim != 2:
            raise RedrawError(f"a slice mask must be 2-D (H, W), got shape {m.shape}")
        x = torch.from_numpy(m.astype(np.float32))[None, None]
        g = self.mask_grid.to_model(x, tuple(float(v) for v in spacing_yx), pad_value=0.0)
        return (g[0, 0] > 0.5).numpy()

    def from_mask_grid(self, grid_mask: np.ndarray, hw, spacing_yx=(1.0, 1.0)) -> np.ndarray:
        """(M, M) bool mask-grid mask -> (H, W) bool on the slice (bilinear of the 0/1 mask > 0.5, the
        same resampling as the model's mask logits; off the grid = background)."""
        g = np.asarray(grid_mask)
        m = int(self.cfg.mask_size)
        if g.shape != (m, m):
            raise RedrawError(f"a mask-grid mask must be ({m}, {m}), got shape {g.shape}")
        t = torch.from_numpy(np.where(g, 20.0, -20.0).astype(np.float32))[None, None]
        return (self.mask_grid.from_model(t, tuple(int(v) for v in hw), tuple(float(v) for v in spacing_yx))[0, 0]
                > 0).numpy()

    def mask_pixel(self, y: float, x: float, hw, spacing_yx=(1.0, 1.0)) -> tuple[int, int]:
        """The mask-grid pixel (u, v) whose area holds slice pixel (y, x): u = floor((y + 0.5) / s - d)
        (``_axis_maps``). Raises :class:`RedrawError` for a pixel off the slice or off the grid."""
        hw = tuple(int(v) for v in hw)
        if not (0 <= y < hw[0] and 0 <= x < hw[1]):
            raise RedrawError(f"pixel ({y}, {x}) is outside the {hw[0]} x {hw[1]} slice")
        (sy, dy), (sx, dx) = self._axis_maps(hw, spacing_yx)
        u, v = math.floor((y + 0.5) / sy - dy), math.floor((x + 0.5) / sx - dx)
        m = int(self.cfg.mask_size)
        if not (0 <= u < m and 0 <= v < m):
            raise RedrawError(f"pixel ({y}, {x}) is outside the model's field of view")
        return u, v

    def click_cell(self, y: float, x: float, k: int, hw, spacing_yx=(1.0, 1.0)) -> tuple[int, int]:
        """The scale-k cell (i, j) of slice pixel (y, x): its mask-grid pixel (u, v) (``mask_pixel``),
        then (floor(u * p_k / M), floor(v * p_k / M)), p_k = ``patch_nums[k - 1]``. Raises
        :class:`RedrawError` for k outside 1..K or a pixel off the slice / field of view."""
        pn = self._pn(k, allow_last=True)
        u, v = self.mask_pixel(y, x, hw, spacing_yx)
        m = int(self.cfg.mask_size)
        return (u * pn) // m, (v * pn) // m

    def scale_cells(self, k: int, hw, spacing_yx=(1.0, 1.0)) -> np.ndarray:
        """(H, W) int32: the scale-k cell index i * p_k + j of every slice pixel (``click_cell``'s rule,
        vectorised), -1 where the pixel lies off the model's field of view."""
        pn = self._pn(k, allow_last=True)
        m = int(self.cfg.mask_size)
        (sy, dy), (sx, dx) = self._axis_maps(hw, spacing_yx)
        u = np.floor((np.arange(int(hw[0])) + 0.5) / sy - dy).astype(np.int64)
        v = np.floor((np.arange(int(hw[1])) + 0.5) / sx - dx).astype(np.int64)
        ok = ((u >= 0) & (u < m))[:, None] & ((v >= 0) & (v < m))[None, :]
        cells = ((u * pn) // m)[:, None] * pn + ((v * pn) // m)[None, :]
        return np.where(ok, cells, -1).astype(np.int32)

    def _pn(self, k, allow_last: bool = False) -> int:
        kk = int(self.num_scales)
        hi = kk if allow_last else kk - 1
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= hi:
            raise RedrawError(f"scale must be an integer in 1..{hi} (K = {kk}"
                              + (": the last scale leaves nothing to redraw)" if not allow_last else ")")
                              + f", got {k!r}")
        return int(self.cfg.patch_nums[int(k) - 1])

    # ------------------------------------------------------------------ tokens of a mask
    @torch.inference_mode()
    def encode_grid(self, grid_mask: np.ndarray) -> np.ndarray:
        """(M, M) bool mask-grid mask -> (L,) int64 token ids of its K scales (``MaskVQ.encode_tokens``:
        the residual quantiser, spec "Multi-scale mask autoencoder")."""
        g = np.asarray(grid_mask)
        m = int(self.cfg.mask_size)
        if g.shape != (m, m):
            raise RedrawError(f"a mask-grid mask must be ({m}, {m}), got shape {g.shape}")
        t = torch.from_numpy(g.astype(np.float32))[None, None].to(self.device)
        with autocast_context(self.device, self.precision):
            ids = self.model.vq.encode_tokens(t)
        return ids[0].long().cpu().numpy()

    def encode_mask(self, mask: np.ndarray, spacing_yx=(1.0, 1.0)) -> np.ndarray:
        """(H, W) bool slice mask -> (L,) int64 token ids (``to_mask_grid`` then ``encode_grid``)."""
        return self.encode_grid(self.to_mask_grid(mask, spacing_yx))

    @torch.inference_mode()
    def scale_mask(self, tokens: np.ndarray, k: int, hw, spacing_yx=(1.0, 1.0)) -> np.ndarray:
        """(L,) token ids -> (H, W) bool mask decoded from scales 1..k only (f_hat_k, paper Fig. 4)."""
        self._pn(k, allow_last=True)
        t = np.asarray(tokens)
        if t.shape != (int(self.cfg.num_tokens),):
            raise RedrawError(f"tokens must be ({self.cfg.num_tokens},), got shape {t.shape}")
        return self._masks(self._tokens(t[None].astype(np.int64)), hw, spacing_yx, upto_scale=int(k))[0]

    @torch.inference_mode()
    def scale_grid_mask(self, tokens: np.ndarray, k: int) -> np.ndarray:
        """(L,) token ids -> (M, M) bool mask on the mask grid decoded from scales 1..k only."""
        self._pn(k, allow_last=True)
        lg = self.decode(self._tokens(np.asarray(tokens, np.int64)[None]), int(k))
        return (lg[0, 0].float() > 0).cpu().numpy()

    # ------------------------------------------------------------------ redraw
    def _embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Embedding (1, C_e, h, w) of one model input x (1, C, S, S) and whether it came from a cache
        (the embedding cache, or the last ``set_image`` batch when there is no cache)."""
        cache = self.embedding_cache
        if cache is not None:
            before = cache.stats["computed"]
            emb = cache.embed(x, self._embedding_base, self.embed)
            return emb, cache.stats["computed"] == before
        if self._emb is not None and self._emb_keys:
            key = tensor_digest(x[0])
            if key in self._emb_keys:
                i = self._emb_keys.index(key)
                return self._emb[i:i + 1], True
        return self.embed(x), False

    def _edited_grid(self, edited_mask, edited_on: str, hw, spacing_yx) -> np.ndarray:
        e = np.asarray(edited_mask)
        if edited_on == "slice":
            if e.shape != tuple(hw):
                raise RedrawError(f"edited mask {e.shape} and slice {tuple(hw)} differ in shape")
            return self.to_mask_grid(e != 0, spacing_yx)
        if edited_on == "mask":
            m = int(self.cfg.mask_size)
            if e.shape != (m, m):
                raise RedrawError(f"an edited mask on the mask grid must be ({m}, {m}), got shape {e.shape}")
            return (e != 0).copy()
        raise RedrawError(f"edited_on must be 'slice' or 'mask', got {edited_on!r}")

    def _check_options(self, n_samples, threshold, target_class) -> tuple[int, float, int]:
        n = self.n if n_samples is None else n_samples
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= int(n) <= 64:
            raise RedrawError(f"number of samples must be between 1 and 64, got {n!r}")
        if not 0.0 < float(threshold) < 1.0:
            raise RedrawError("consensus threshold must be between 0 and 1")
        c = self.target_class if target_class is None else target_class
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 1 <= int(c) < max(len(self.class_names), 2):
            raise RedrawError(f"target class {c!r} is not one of 1..{max(len(self.class_names), 2) - 1}")
        return int(n), float(threshold), int(c)

    def apply_clicks(self, grid_mask: np.ndarray, clicks, k: int, hw, spacing_yx=(1.0, 1.0)):
        """Set the mask-grid block of each click's scale-k cell to foreground (positive) or background
        (the click rule of ``click_cell``), in order; returns (new (M, M) bool mask, cells)."""
        pn = self._pn(k, allow_last=True)
        g = np.array(grid_mask, dtype=bool, copy=True)
        cells = []
        for c in clicks or ():
            if len(c) != 3:
                raise RedrawError(f"a click is (y, x, positive), got {c!r}")
            y, x, positive = c
            i, j = self.click_cell(y, x, k, hw, spacing_yx)
            g[cell_block(i, j, pn, g.shape[0])] = bool(positive)
            cells.append((i, j))
        return g, cells

    def sample_from_prefix(self, emb: torch.Tensor, cls_id: int, n: int, prefix: np.ndarray, seed=None,
                           use_kv_cache: bool = True) -> torch.Tensor:
        """N token maps (N, L) of one image embedding ``emb`` (1, C_e, h, w) for label id ``cls_id``, the
        ids ``prefix`` (L_k,) of scales 1..k teacher-forced (``ArSeg.sample(prefix_ids=...)``), with this
        predictor's temperatures, top-k and precision; ``seed`` None continues its generator."""
        gen = self.generator if seed is None else torch.Generator(device=self.device).manual_seed(int(seed))
        cls = torch.full((1,), cls_id - 1, dtype=torch.long, device=self.device)
        opts = {"temperatures": self.temperatures} if self.temperatures else {}
        pre = torch.as_tensor(np.asarray(prefix)[None], device=self.device)
        with autocast_context(self.device, self.precision):
            return self.model.sample(emb, cls, n_samples=n, generator=gen, top_k=self.top_k,
                                     use_kv_cache=use_kv_cache, prefix_ids=pre, **opts)[0]

    @torch.inference_mode()
    def redraw(self, slice_hu: np.ndarray, edited_mask: np.ndarray, from_scale: int, *, spacing_yx=(1.0, 1.0),
               edited_on: str = "slice", target_class: int | None = None, n_samples: int | None = None,
               seed: int | None = None, box=None, clicks=(), previous: np.ndarray | None = None,
               threshold: float = 0.5, use_kv_cache: bool = True,
               prefix_tokens: np.ndarray | None = None) -> RedrawResult:
        """Keep the edited mask's scales 1..k, let AR-Seg redraw scales k+1..K (issue 13).

        slice_hu (H, W) float HU with pixel spacing ``spacing_yx`` (sy, sx) mm; edited_mask (H, W) bool
        on the slice (``edited_on="slice"``) or (M, M) on the mask grid (``"mask"``, see
        ``mask_grid_transform``); from_scale k in 1..K-1. Steps: clicks (y, x, positive) in slice
        pixels set their scale-k cell's block of the mask-grid mask (``click_cell``); the mask is
        quantised by the VQ (all K scales, ``encode_grid``); its ids of scales 1..k are teacher-forced
        and N samples of scales k+1..K drawn on the slice's image embedding, reused from the
        embedding cache / the last ``set_image`` when there (``ArSeg.sample(prefix_ids=...)``, KV
        cache; spec "Inference", paper Eq. 3-4); the N masks are decoded onto the slice. ``box``
        (y0, y1, x0, x1) half-open slice pixels limits the change: outside it the consensus is
        ``previous`` ((H, W) bool, default empty) exactly. ``seed`` None continues the predictor's
        generator; an int draws from a fresh one (same seed, same draws on the same machine).
        ``n_samples``/``target_class`` default to the predictor's. ``prefix_tokens`` (at least L_k
        ids, e.g. a reference's own ``encode_mask`` tokens): keep exactly these ids for scales 1..k
        instead of quantising ``edited_mask`` (which may then be None; no clicks). Raises
        :class:`RedrawError` (an InputError) for a bad scale, shape, box, click, N, threshold, class
        or prefix, a spacing that is not finite and > 0, or a slice with NaN/inf pixels.
        """
        img = np.asarray(slice_hu)
        if img.ndim != 2:
            raise RedrawError(f"slice must be 2-D (H, W), got shape {img.shape}")
        if not np.isfinite(img).all():
            raise RedrawError(f"slice holds {int((~np.isfinite(img)).sum())} NaN/inf pixels: HU must be finite")
        hw = tuple(int(v) for v in img.shape)
        spacing_yx = check_spacing(spacing_yx)
        k = int(from_scale) if isinstance(from_scale, (int, np.integer)) and not isinstance(from_scale, bool) else from_scale
        self._pn(k)
        n, threshold, cls_id = self._check_options(n_samples, threshold, target_class)
        y0, y1, x0, x1 = check_box(box, hw)
        prev = np.zeros(hw, bool) if previous is None else np.asarray(previous)
        if prev.shape != hw:
            raise RedrawError(f"previous mask {prev.shape} and slice {hw} differ in shape")
        lk = int(self.model.vq.quantizer.offsets[k])
        if prefix_tokens is None:
            grid = self._edited_grid(edited_mask, edited_on, hw, spacing_yx)
            grid, cells = self.apply_clicks(grid, clicks, k, hw, spacing_yx)
            edited = self.encode_grid(grid)  # (L,)
        else:
            edited, cells = np.asarray(prefix_tokens).astype(np.int64).reshape(-1), []
            if clicks:
                raise RedrawError("clicks change the edited mask; with prefix_tokens there is none")
            if edited.shape[0] < lk or edited.min(initial=0) < 0 or edited.max(initial=0) >= self.cfg.vocab_size:
                raise RedrawError(f"prefix_tokens must hold at least {lk} ids (scales 1..{k}) in "
                                  f"0..{self.cfg.vocab_size - 1}")
        x = model_input(img[None], spacing_yx, self.grid, self.norm, self.device)
        emb, cached = self._embedding(x)
        t0 = time.perf_counter()
        tok = self.sample_from_prefix(emb, cls_id, n, edited[:lk], seed, use_kv_cache)
        samples = self._masks(tok, hw, spacing_yx)
        seconds = time.perf_counter() - t0
        consensus, var = redraw_consensus(samples, (y0, y1, x0, x1), prev, threshold)
        return RedrawResult(tok.long().cpu().numpy(), samples, consensus, var, k, seconds, cached, edited, cells,
                            (y0, y1, x0, x1))


def redraw_consensus(samples: np.ndarray, box, previous: np.ndarray, threshold: float = 0.5):
    """(N, H, W) bool samples -> (consensus (H, W) bool: mean > threshold inside ``box`` (y0, y1, x0,
    x1), ``previous`` outside; variability (H, W) float32: % of the N disagreeing inside, 0 outside)."""
    n = samples.shape[0]
    votes = samples.sum(0, dtype=np.uint8)
    y0, y1, x0, x1 = box
    inside = np.zeros(samples.shape[1:], bool)
    inside[y0:y1, x0:x1] = True
    consensus = np.where(inside, consensus_from_votes(votes, n, threshold), np.asarray(previous) != 0)
    var = np.where(inside, disagreement_percent(votes, n, consensus), 0.0).astype(np.float32)
    return consensus, var


def paste_target(old: np.ndarray, consensus: np.ndarray, label: int, inside: np.ndarray | None = None) -> np.ndarray:
    """Labels ``old`` (any shape, integer ids) with a redrawn mask of ``label`` pasted: a copy where,
    inside ``inside`` (bool, default everywhere), the target's own voxels outside ``consensus`` become
    0 and ``consensus`` voxels that are background or the target become ``label``. Voxels of every
    other label are never changed (a redraw is of one class; it neither erases nor grows over others)."""
    old = np.asarray(old)
    cons = np.asarray(consensus, bool)
    if inside is not None:
        cons = cons & np.asarray(inside, bool)
    own = old == label
    if inside is not None:
        own &= np.asarray(inside, bool)
    new = old.copy()
    new[own & ~cons] = 0
    new[cons & ((old == 0) | (old == label))] = label
    return new


def check_spacing(spacing_yx) -> tuple[float, float]:
    """(sy, sx) pixel spacing in mm, both finite and > 0; raises :class:`RedrawError` otherwise."""
    try:
        sp = tuple(float(v) for v in spacing_yx)
    except (TypeError, ValueError):
        sp = ()
    if len(sp) != 2 or not all(np.isfinite(v) and v > 0 for v in sp):
        raise RedrawError(f"spacing_yx must be two finite pixel spacings > 0 mm, got {spacing_yx!r}")
    return sp


def check_box(box, hw) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) half-open pixel box inside an ``hw`` slice (None = the whole slice); raises
    :class:`RedrawError` for anything else."""
    if box is None:
        return 0, hw[0], 0, hw[1]
    try:
        vals = [int(v) for v in box]
        ok = len(vals) == 4 and all(float(a) == b for a, b in zip(box, vals))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise RedrawError(f"box must be 4 integers (y0, y1, x0, x1), got {box!r}")
    y0, y1, x0, x1 = vals
    if not (0 <= y0 < y1 <= hw[0] and 0 <= x0 < x1 <= hw[1]):
        raise RedrawError(f"box {tuple(vals)} is empty or outside the {hw[0]} x {hw[1]} slice")
    return y0, y1, x0, x1
