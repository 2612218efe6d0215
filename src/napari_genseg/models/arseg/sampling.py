"""AR-Seg inference (paper Sec. 2.3-2.4) and the top-level :class:`ArSeg` model.

Sampling (Eq. 4), for B images and N samples each:

1. the image embedding (computed once per slice by ``ArSeg.embed``) goes through the adapter once;
2. positions 0..T_c (conditioning + start token) run once on the B image rows and fill a KV cache,
   which is then repeated to the B*N sample rows (row m = b * N + n);
3. for each scale k: logits / temperature_k, top-k filter, multinomial draw for all B*N rows at once;
   the drawn codes update f_hat (bicubic up, phi) and the next scale's input is f_hat area-downsampled;
   with the cache only the new scale's tokens run through the transformer.

``use_kv_cache=False`` re-runs the whole prefix at every scale (same draws, for testing).

Teacher-forced prefix (issue 13, "redraw the finer scales"): ``prefix_ids`` (B, L_k) fixes the
tokens of scales 1..k (L_k = sum of pn_s² over the first k scales, 1 <= k < K) for all N samples of
an image; sampling starts at scale k+1 from p(r_{k+1..K} | r_{1..k}, c, f) = prod_{s > k} p(r_s | r_<s, c, f),
the tail of the paper's next-scale factorisation (Eq. 3, Sec. 2.2), each scale drawn by Eq. 4 (Sec. 2.3);
the conclusion names such clinician-in-the-loop use of the scales as future work. With the KV cache the
conditioning tokens, the start token and the inputs of scales 2..k+1 (all determined by the prefix)
run once on the B image rows; only scales k+2..K run on the B*N sample rows.
Consensus, votes, uncertainty and resizing to the slice grid belong to the predictor
(``napari_genseg.predictors.arseg``).
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ArSegConfig
from .light_encoder import EmbeddingSegHead, LightImageEncoder
from .maskvq import MaskVQ
from .sam_encoder import SamImageEncoder
from .segmentor import KVCache, NextScaleSegmentor

__all__ = ["ArSeg", "sample_tokens", "draw_tokens", "eval_mode", "prefix_scales", "DEFAULT_TEMPERATURES",
           "default_temperatures"]

#: per-scale temperatures of the paper's inference (its 8 scales; spec "Inference")
DEFAULT_TEMPERATURES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.1)


def default_temperatures(num_scales: int) -> tuple[float, ...]:
    """The paper's per-scale temperatures fitted to ``num_scales`` scales: linear from 1.0 at
    the first scale to 0.4 at the second-to-last, 0.1 at the last. For 8 scales this is exactly
    :data:`DEFAULT_TEMPERATURES`; a config with another scale count (e.g. ``arseg_ct16``, 9)
    gets the same shape instead of an error. Raises ``ValueError`` for ``num_scales`` < 1."""
    k = int(num_scales)
    if k < 1:
        raise ValueError(f"num_scales must be >= 1, got {num_scales}")
    if k == 1:
        return (0.1,)
    head = tuple(round(1.0 - 0.6 * i / max(k - 2, 1), 6) for i in range(k - 1)) if k > 2 else (1.0,)
    return (*head, 0.1)


def draw_tokens(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """Sample one token per position. logits (M, T, V) -> ids (M, T).

    temperature <= 0 takes the arg-max; ``top_k`` keeps the k largest logits (ties kept).
    """
    m, t, v = logits.shape
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < v:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1).view(m * t, v)
    return torch.multinomial(probs, 1, generator=generator).view(m, t)


def _temperatures(temperatures, k: int) -> tuple[float, ...]:
    if temperatures is None:
        return default_temperatures(k)
    if isinstance(temperatures, (int, float)):
        return (float(temperatures),) * k
    temps = tuple(float(t) for t in temperatures)
    if len(temps) < k:
        raise ValueError(f"need {k} temperatures (one per scale), got {len(temps)}")
    return temps[:k]


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Run ``module`` in eval mode (no dropout) and restore its previous mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def prefix_scales(prefix_len: int, patch_nums: Sequence[int]) -> int:
    """Number k of whole scales in a prefix of ``prefix_len`` tokens (L_k = sum pn_s², s <= k).

    Raises ``ValueError`` unless 1 <= k < K (the last scale must stay to be sampled) and the
    length ends exactly at a scale boundary.
    """
    offsets = [0]
    for pn in patch_nums:
        offsets.append(offsets[-1] + int(pn) * int(pn))
    k_max = len(patch_nums)
    if prefix_len in offsets[1:k_max]:
        return offsets.index(prefix_len)
    if prefix_len == offsets[-1]:
        raise ValueError(f"a prefix of all {k_max} scales leaves nothing to sample: k must be < K = {k_max}")
    raise ValueError(f"prefix of {prefix_len} tokens is not scales 1..k for 1 <= k < {k_max} "
                     f"(allowed lengths {offsets[1:k_max]})")


@torch.no_grad()
def sample_tokens(segmentor: NextScaleSegmentor, vq: MaskVQ, embedding: torch.Tensor,
                  class_ids: torch.Tensor, n_samples: int, generator: torch.Generator | None = None,
                  temperatures: Sequence[float] | float | None = None,
                  top_k: int | None = 100, use_kv_cache: bool = True,
                  prefix_ids: torch.Tensor | None = None):
    """Draw N token maps per image, all B*N at once.

    Shapes: embedding [B, C_e, h, w]; class_ids (B,) -> (ids (B, N, L) int64,
    f_hat [B*N, code_dim, n, n] the full-scale cumulative f_hat of each sample).

    ``prefix_ids`` (B, L_k) int64 (or (L_k,), the same for every image): the token ids of scales
    1..k, teacher-forced for all N samples (see the module docstring); ``ids[:, :, :L_k]`` then
    equal them and only scales k+1..K are drawn (their temperatures stay those of scales k+1..K).
    Raises ``ValueError`` for n_samples < 1, a prefix that is not scales 1..k with 1 <= k < K, a
    batch mismatch or ids outside 0..V-1.
    """
    if n_samples < 1:
        raise ValueError("n_samples must be >= 1")
    if prefix_ids is not None:
        prefix_ids = torch.as_tensor(prefix_ids, device=embedding.device).long()
        if prefix_ids.ndim == 1:
            prefix_ids = prefix_ids.unsqueeze(0).expand(embedding.shape[0], -1)
        if prefix_ids.ndim != 2 or prefix_ids.shape[0] != embedding.shape[0]:
            raise ValueError(f"prefix_ids must be (B, L_k) with B = {embedding.shape[0]}, got {tuple(prefix_ids.shape)}")
        prefix_scales(prefix_ids.shape[1], vq.quantizer.patch_nums)
        if prefix_ids.numel() and (int(prefix_ids.min()) < 0 or int(prefix_ids.max()) >= segmentor.vocab_size):
            raise ValueError(f"prefix_ids must lie in 0..{segmentor.vocab_size - 1}")
    with eval_mode(segmentor), eval_mode(vq):
        return _sample(segmentor, vq, embedding, class_ids, int(n_samples), generator,
                       temperatures, top_k, use_kv_cache, prefix_ids)


def _sample(segmentor, vq, embedding, class_ids, n_samples, generator, temperatures, top_k,
            use_kv_cache, prefix_ids=None):
    q = vq.quantizer
    pns = q.patch_nums
    temps = _temperatures(temperatures, len(pns))
    b, n = embedding.shape[0], int(n_samples)
    kp = 0 if prefix_ids is None else prefix_scales(prefix_ids.shape[1], pns)  # scales kept
    cond, cls = segmentor.condition(embedding, class_ids.to(embedding.device))  # once
    cls_m = cls.repeat_interleave(n, 0)
    side = q.latent_size
    # the prefix's cumulative f_hat and the inputs it determines (scales 2..kp+1), on the B image rows
    f_hat_b = embedding.new_zeros(b, q.dim, side, side)
    inputs_b = []
    for si in range(kp):
        f_hat_b = f_hat_b + q.scale_vectors(si, prefix_ids[:, q.offsets[si]:q.offsets[si + 1]])
        inputs_b.append(q.next_input(si, f_hat_b))
    cache = None
    if use_kv_cache:
        cache = KVCache(segmentor.depth, segmentor.seq_len)
        x = segmentor.prefix_tokens(cond, cls)
        if inputs_b:
            x = torch.cat([x, segmentor.scale_tokens(torch.cat(inputs_b, 1), 1)], dim=1)
        h = segmentor.run(x, cls, 0, cache)  # B rows: conditioning, start and the prefix's inputs
        logits = segmentor.logits(h[:, -pns[kp] ** 2:], cls).repeat_interleave(n, 0)
        cache.repeat_interleave(n)
    else:
        cond_m = cond.repeat_interleave(n, 0)
        pre = torch.cat(inputs_b, 1).repeat_interleave(n, 0) if inputs_b else None
        logits = segmentor.forward_tokens(cond_m, cls_m, pre)[:, q.offsets[kp]:]
    f_hat = f_hat_b.repeat_interleave(n, 0)
    inputs = [t.repeat_interleave(n, 0) for t in inputs_b]
    ids = [prefix_ids.repeat_interleave(n, 0)] if kp else []
    for si in range(kp, len(pns)):
        if si > kp:
            if use_kv_cache:  # only the new scale's tokens run; earlier ones come from the cache
                x = segmentor.scale_tokens(inputs[-1], q.offsets[si])
                h = segmentor.run(x, cls_m, segmentor.num_cond + q.offsets[si], cache)
                logits = segmentor.logits(h, cls_m)
            else:
                logits = segmentor.forward_tokens(cond_m, cls_m, torch.cat(inputs, 1))
                logits = logits[:, q.offsets[si]:]
        idx = draw_tokens(logits, temps[si], top_k, generator)  # (M, pn²)
        ids.append(idx)
        f_hat = f_hat + q.scale_vectors(si, idx)
        if si < len(pns) - 1:
            inputs.append(q.next_input(si, f_hat))
    return torch.cat(ids, 1).view(b, n, -1), f_hat


class ArSeg(nn.Module):
    """AR-Seg: image encoder + multi-scale mask autoencoder + next-scale segmentor.

    Inference primitives (pure torch, device-agnostic; see each method's Shapes): ``embed`` once
    per slice -> ``sample`` N token maps -> ``decode`` any prefix of scales (the coarse-to-fine
    animation); ``napari_genseg.predictors.arseg.ArSegPredictor`` composes them for the engine.
    Training: ``vq.loss`` (stage 1), ``token_loss`` (stage 2, frozen VQ), ``vq.encode_tokens`` for
    the targets.
    """

    def __init__(self, cfg: ArSegConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.encoder_kind == "sam_vit_b":
            self.image_encoder = SamImageEncoder(
                img_size=cfg.img_size, patch_size=cfg.sam_patch_size, in_chans=3,
                width=cfg.sam_width, depth=cfg.sam_depth, heads=cfg.sam_heads,
                mlp_ratio=cfg.sam_mlp_ratio, out_chans=cfg.embed_dim,
                window_size=cfg.sam_window_size, global_attn_indexes=cfg.sam_global_attn_indexes,
            )
        else:
            self.image_encoder = LightImageEncoder(
                img_size=cfg.img_size, in_chans=cfg.in_chans, widths=cfg.light_widths,
                dim=cfg.light_dim, depth=cfg.light_depth, heads=cfg.light_heads,
                out_chans=cfg.embed_dim,
            )
        self.vq = MaskVQ(cfg)
        self.segmentor = NextScaleSegmentor(cfg)
        #: stage-0 head (``cfg.seg_head_dim`` > 0): background + num_classes per-pixel logits
        self.encoder_head = (EmbeddingSegHead(cfg.embed_dim, cfg.seg_head_dim, cfg.img_size // cfg.embed_grid,
                                              cfg.num_classes + 1) if cfg.seg_head_dim else None)

    # ---- sizes --------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.cfg.num_tokens

    @property
    def mask_size(self) -> int:
        return self.cfg.mask_size

    @property
    def num_scales(self) -> int:
        return self.cfg.num_scales

    def scale_token_maps(self, token_ids: torch.Tensor) -> list[torch.Tensor]:
        """Split ids (..., L) into the K token maps (..., pn, pn), coarse to fine."""
        o = self.vq.quantizer.offsets
        lead = token_ids.shape[:-1]
        return [token_ids[..., o[k]:o[k + 1]].reshape(*lead, pn, pn)
                for k, pn in enumerate(self.cfg.patch_nums)]

    # ---- inference ----------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Image embedding, computed once per slice.

        Shapes: x [B, in_chans, img_size, img_size] in [0, 1] -> [B, embed_dim, h, w]
        (SAM: [B, 256, 64, 64]). A 1-channel slice is repeated to 3 channels for SAM.
        """
        cfg = self.cfg
        if x.ndim != 4 or x.shape[1] != cfg.in_chans or x.shape[-2:] != (cfg.img_size, cfg.img_size):
            raise ValueError(
                f"expected x of shape (B, {cfg.in_chans}, {cfg.img_size}, {cfg.img_size}), "
                f"got {tuple(x.shape)}"
            )
        x = x.to(self.segmentor.pos_embed.dtype)
        if cfg.encoder_kind == "sam_vit_b" and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.image_encoder(x)

    @torch.no_grad()
    def sample(self, embedding: torch.Tensor, class_ids: torch.Tensor, n_samples: int,
               generator: torch.Generator | None = None,
               temperatures: Sequence[float] | float | None = None,
               top_k: int | None = 100, use_kv_cache: bool = True,
               prefix_ids: torch.Tensor | None = None) -> torch.Tensor:
        """N token maps per image, drawn as one batch of B*N.

        Shapes: embedding [B, C_e, h, w]; class_ids (B,) int64 -> ids (B, N, L) int64, L = 204.
        ``prefix_ids`` (B, L_k): teacher-forced tokens of scales 1..k (1 <= k < K), kept in
        ``ids[:, :, :L_k]``; sampling continues at scale k+1 (``sample_tokens``).
        """
        ids, _ = sample_tokens(self.segmentor, self.vq, embedding, class_ids, n_samples,
                               generator, temperatures, top_k, use_kv_cache, prefix_ids)
        return ids

    @torch.no_grad()
    def decode(self, token_ids: torch.Tensor, upto_scale: int | None = None,
               batch_size: int = 32) -> torch.Tensor:
        """Mask logits of the cumulative f_hat after scale ``upto_scale`` (1..K, None = K).

        Shapes: token_ids (B, N, L) or (B*, L) -> logits (B*, 1, mask_size, mask_size), B* = B*N.
        """
        ids = token_ids.reshape(-1, token_ids.shape[-1])
        outs = [self.vq.decode_tokens(ids[s : s + batch_size], upto_scale)
                for s in range(0, ids.shape[0], batch_size)]
        return torch.cat(outs, 0)

    # ---- training -----------------------------------------------------------------------------
    def encoder_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Stage 0: per-pixel logits of the image encoder's own segmentation head.

        Shapes: x [B, in_chans, img_size, img_size] -> [B, num_classes + 1, img_size, img_size]
        (channel 0 = background, channel c = AdaLN class c - 1). Raises ``RuntimeError`` for a
        config without a head (``seg_head_dim == 0``).
        """
        if self.encoder_head is None:
            raise RuntimeError("this AR-Seg config has no encoder head (seg_head_dim = 0): no stage 0")
        return self.encoder_head(self.embed(x))

    def _as_embedding(self, embedding_or_x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        t = embedding_or_x
        if t.ndim == 4 and t.shape[1:] == (cfg.in_chans, cfg.img_size, cfg.img_size):
            if cfg.train_image_encoder:
                return self.embed(t)
            with torch.no_grad():
                return self.embed(t)
        return t

    def token_loss(self, embedding_or_x: torch.Tensor, gt_token_ids: torch.Tensor,
                   class_ids: torch.Tensor) -> torch.Tensor:
        """Stage-2 cross-entropy with teacher forcing (frozen VQ).

        Shapes: embedding [B, C_e, h, w] or image [B, in_chans, img_size, img_size];
        gt_token_ids (B, L) from ``vq.encode_tokens``; class_ids (B,) -> scalar loss.
        """
        emb = self._as_embedding(embedding_or_x)
        with torch.no_grad():
            teacher = self.vq.quantizer.teacher_inputs(gt_token_ids)
        logits = self.segmentor(emb, class_ids, teacher.to(emb.dtype))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                               gt_token_ids.reshape(-1))

    def forward(self, embedding_or_x: torch.Tensor, gt_token_ids: torch.Tensor,
                class_ids: torch.Tensor) -> torch.Tensor:
        """The stage-2 training objective (``token_loss``), so DDP can wrap the model."""
        return self.token_loss(embedding_or_x, gt_token_ids, class_ids)

    def stage_parameters(self, stage: int) -> list[nn.Parameter]:
        """Trainable parameters of stage 0 (image encoder + its segmentation head, when the config
        has one), stage 1 (the VQ) or stage 2 (segmentor [+ image encoder])."""
        if stage == 0:
            if self.encoder_head is None:
                raise ValueError("stage 0 needs a config with an encoder head (seg_head_dim > 0)")
            return list(self.image_encoder.parameters()) + list(self.encoder_head.parameters())
        if stage == 1:
            return list(self.vq.parameters())
        if stage == 2:
            params = list(self.segmentor.parameters())
            if self.cfg.train_image_encoder:
                params += list(self.image_encoder.parameters())
            return params
        raise ValueError("stage must be 0, 1 or 2")
