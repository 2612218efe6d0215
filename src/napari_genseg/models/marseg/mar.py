"""MAR: the masked autoregressive trunk of MARSeg (Li, Tian, Li, Deng, He, "Autoregressive Image
Generation without Vector Quantization", NeurIPS 2024; LTH14/mar ``models/mar.py``, MIT).

Sequence layout (B images, L = ``seq_len`` image tokens of the latent grid in row-major order, K =
``buffer_size``)::

    position   0 .. K-1                         K .. K+L-1
    content    class embedding / fake_latent    z_proj(latent token)

MAE encoder: x = z_proj_ln(tokens + encoder_pos_embed_learned), masked image tokens dropped, then
``mar_depth`` pre-LN ViT blocks and ``encoder_norm``. MAE decoder: ``decoder_embed``, masked
positions filled with ``mask_token``, + ``decoder_pos_embed_learned``, ``mar_depth`` blocks,
``decoder_norm``; the buffer is stripped and ``diffusion_pos_embed_learned`` added before the
diffusion head. Pre-training (stage 1): one mask ratio per batch from the truncated normal on
[``mask_ratio_min``, 1] (mean 1, std 0.25), a random order per image, the first
ceil(L * ratio) positions of the order masked, diffusion loss on the masked tokens with every token
repeated ``diffusion_batch_mul`` times. Segmentation (stage 2): nothing masked, the buffer holds
``fake_latent``, the outputs of blocks ``layer_indices`` are read (see ``model.py``).

The blocks are timm ``Block``s (key names ``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``,
``mlp.fc1``, ``mlp.fc2``) with attention through ``scaled_dot_product_attention``. Every random
draw (mask ratio, orders, label drop, diffusion steps and noise) takes a ``torch.Generator``
(dropout, active in training mode, uses torch's global generator as everywhere in torch).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ...nn.attention import SelfAttention
from .config import MarSegConfig
from .diffusion import DiffusionHead

__all__ = ["Block", "MAR", "sample_mask_ratio", "random_orders", "mask_from_orders"]


class Mlp(nn.Module):
    """fc1 -> GELU (erf) -> dropout -> fc2 -> dropout (timm ``Mlp``)."""

    def __init__(self, dim: int, hidden: int, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-LN transformer block: x += Attn(LN(x)); x += MLP(LN(x)). Shapes: (B, T, D) -> same."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, attn_drop: float, proj_drop: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SelfAttention(dim, heads, attn_drop=attn_drop, proj_drop=proj_drop, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# ------------------------------------------------------------------------------------ masking
def sample_mask_ratio(minimum: float, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> float:
    """One draw of MAR's mask ratio: normal(1, 0.25) truncated to [minimum, 1] (scipy
    ``truncnorm((minimum - 1) / 0.25, 0, loc=1, scale=0.25)``), by inverting the normal CDF."""
    a = torch.special.ndtr(torch.tensor((minimum - 1.0) / 0.25, dtype=torch.float64))
    b = 0.5  # ndtr(0)
    u = torch.rand((), generator=generator, device=device).cpu().double()  # (no float64 on MPS)
    ratio = 1.0 + 0.25 * float(torch.special.ndtri(a + u * (b - a)))
    return min(max(ratio, minimum), 1.0)


def random_orders(bsz: int, seq_len: int, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """A uniformly random permutation of 0..L-1 per image: (B, L) long."""
    return torch.rand(bsz, seq_len, generator=generator, device=device).argsort(dim=1)


def mask_from_orders(orders: torch.Tensor, num_masked: int) -> torch.Tensor:
    """(B, L) float mask with 1 at the first ``num_masked`` positions of each order."""
    mask = torch.zeros(orders.shape, device=orders.device)
    return mask.scatter_(1, orders[:, :num_masked], 1.0)


class MAR(nn.Module):
    """The MAR trunk (MAE encoder + decoder, embeddings, and unless ``inference_only`` the
    diffusion head, its position embedding, the mask token and the class embedding).

    Shapes: latent tokens (B, L, C) with C = ``cfg.token_dim``; hidden width D = ``cfg.mar_width``.
    """

    def __init__(self, cfg: MarSegConfig) -> None:
        super().__init__()
        d, depth = cfg.mar_width, cfg.mar_depth
        self.cfg = cfg
        self.width = d
        self.buffer_size = cfg.buffer_size
        self.seq_len = cfg.seq_len
        self.grid = cfg.grid_size
        self.patch_size = cfg.patch_size
        self.token_dim = cfg.token_dim
        n_pos = cfg.seq_len + cfg.buffer_size

        def blocks() -> nn.ModuleList:
            return nn.ModuleList(Block(d, cfg.mar_heads, cfg.mlp_ratio, cfg.attn_dropout, cfg.proj_dropout)
                                 for _ in range(depth))

        self.fake_latent = nn.Parameter(torch.zeros(1, d))
        self.z_proj = nn.Linear(cfg.token_dim, d)
        self.z_proj_ln = nn.LayerNorm(d, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, n_pos, d))
        self.encoder_blocks = blocks()
        self.encoder_norm = nn.LayerNorm(d, eps=1e-6)
        self.decoder_embed = nn.Linear(d, d)
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, n_pos, d))
        self.decoder_blocks = blocks()
        self.decoder_norm = nn.LayerNorm(d, eps=1e-6)
        self.generative = not cfg.inference_only
        if self.generative:
            self.class_emb = nn.Embedding(cfg.class_num, d)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
            self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, cfg.seq_len, d))
        self.reset_parameters()
        if self.generative:  # built after the init, as upstream: it has its own
            self.diffloss = DiffusionHead(cfg.token_dim, d, cfg.diffloss_width, cfg.diffloss_depth,
                                          cfg.diffusion_steps, cfg.num_sampling_steps, cfg.noise_schedule)

    def reset_parameters(self) -> None:
        """MAR's initialisation: N(0, 0.02) embeddings, xavier-uniform Linear weights, zero biases,
        unit LayerNorms (the diffusion head keeps its own, see ``diffusion.py``)."""
        for name, m in self.named_modules():
            if name.startswith("diffloss"):
                continue
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        params = [self.fake_latent, self.encoder_pos_embed_learned, self.decoder_pos_embed_learned]
        if self.generative:
            params += [self.class_emb.weight, self.mask_token, self.diffusion_pos_embed_learned]
        for p in params:
            nn.init.normal_(p, std=0.02)

    # ---- layout ---------------------------------------------------------------------------------
    def patchify(self, latent: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> (B, (H/p)(W/p), C p²), row-major over the grid, (c, i, j) inside a token."""
        b, c, h, w = latent.shape
        p = self.patch_size
        x = latent.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, p, p)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, C p²) -> [B, C, H, W] (inverse of :meth:`patchify`)."""
        b, n, _ = tokens.shape
        p, g = self.patch_size, self.grid
        c = self.token_dim // (p * p)
        x = tokens.reshape(b, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, C, g, p, g, p)
        return x.reshape(b, c, g * p, g * p)

    # ---- conditioning -----------------------------------------------------------------------------
    def condition(self, bsz: int, class_label: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """The vector every buffer token holds, (B, D): ``fake_latent`` without a label; with a
        label its class embedding, replaced by ``fake_latent`` with probability
        ``label_drop_prob`` per image in training mode (MAR's label drop)."""
        if class_label is None:
            return self.fake_latent.expand(bsz, -1)
        if not self.generative:
            raise ValueError("this MARSeg build has no class embedding (inference_only=True)")
        emb = self.class_emb(class_label.long())
        if self.training and self.cfg.label_drop_prob > 0:
            drop = torch.rand(bsz, generator=generator, device=emb.device) < self.cfg.label_drop_prob
            emb = torch.where(drop[:, None], self.fake_latent.to(emb.dtype), emb)
        return emb

    # ---- MAE encoder / decoder ------------------------------------------------------------------
    def forward_encoder(self, tokens: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None = None,
                        layers: tuple[int, ...] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """MAE encoder.

        Shapes: tokens (B, L, C); cond (B, D); mask (B, L) 0/1 with the same number of ones per
        image, or None. Returns x = encoder_norm(last block) (B, K + L_kept, D) and, for each block
        index in ``layers``, encoder_norm of that block's output without the buffer (B, L, D)
        (only without a mask).
        """
        b = tokens.shape[0]
        x = self.z_proj(tokens)
        x = torch.cat([cond[:, None, :].expand(b, self.buffer_size, -1).to(x.dtype), x], dim=1)
        x = self.z_proj_ln(x + self.encoder_pos_embed_learned)
        if mask is not None:
            if layers:
                raise ValueError("layer features are read without masking only")
            keep = torch.cat([mask.new_zeros(b, self.buffer_size), mask], dim=1) == 0
            x = x[keep].reshape(b, -1, x.shape[-1])  # (B, K + L_kept, D), order kept
        return self._run(x, self.encoder_blocks, self.encoder_norm, layers, len(self.encoder_blocks))

    def forward_decoder(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                        layers: tuple[int, ...] = (), output: bool = True
                        ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """MAE decoder.

        Shapes: x (B, K + L_kept, D) from :meth:`forward_encoder`; mask as there. Returns
        decoder_norm(last block) without the buffer (B, L, D) (None when ``output`` is False:
        then only the blocks up to max(``layers``) run) and the per-layer features as in
        :meth:`forward_encoder`.
        """
        b = x.shape[0]
        x = self.decoder_embed(x)
        if mask is not None:
            if layers:
                raise ValueError("layer features are read without masking only")
            keep = torch.cat([mask.new_zeros(b, self.buffer_size), mask], dim=1) == 0  # (B, K + L)
            full = self.mask_token.to(x.dtype).expand(b, keep.shape[1], -1).clone()
            full[keep] = x.reshape(-1, x.shape[-1])
            x = full
        x = x + self.decoder_pos_embed_learned
        if not output and not layers:
            raise ValueError("forward_decoder without output needs layers to return")
        depth = len(self.decoder_blocks) if output else max(layers) + 1
        out, feats = self._run(x, self.decoder_blocks, self.decoder_norm, layers, depth, output)
        return (out[:, self.buffer_size:] if out is not None else None), feats

    def _run(self, x, blocks, norm, layers, depth, output: bool = True):
        """Blocks 0..depth-1 on x; ``norm`` of the outputs of ``layers`` (buffer stripped) and,
        with ``output``, of the last block (the shared final norm is computed once per block)."""
        feats: dict[int, torch.Tensor] = {}
        last = len(blocks) - 1
        normed_last = None
        for i in range(depth):
            x = blocks[i](x)
            if i in layers:
                y = norm(x)
                if i == last:
                    normed_last = y
                feats[i] = y[:, self.buffer_size:]
        if not output:
            return None, [feats[i] for i in layers]
        out = normed_last if normed_last is not None else norm(x)
        return out, [feats[i] for i in layers]

    # ---- stage 1: masked autoregressive pre-training ----------------------------------------------
    def loss(self, latent: torch.Tensor, class_label: torch.Tensor | None = None,
             generator: torch.Generator | None = None, mask_ratio: float | None = None) -> dict:
        """MAR's pre-training loss on scaled latents.

        Args:
            latent: [B, C, h, w] tokenizer latents already multiplied by ``latent_scale``.
            class_label: (B,) class ids, or None (unconditional: the buffer holds ``fake_latent``).
            generator: source of every random draw (on ``latent``'s device).
            mask_ratio: fixed ratio instead of the truncated-normal draw (tests, evaluation).

        Returns dict(loss (scalar), mask_ratio (float), num_masked (int), mask (B, L)).
        """
        if not self.generative:
            raise ValueError("pre-training needs the diffusion head (inference_only=False)")
        tokens = self.patchify(latent)
        b, n, c = tokens.shape
        target = tokens.detach()
        ratio = sample_mask_ratio(self.cfg.mask_ratio_min, generator, latent.device) \
            if mask_ratio is None else float(mask_ratio)
        num_masked = int(math.ceil(n * ratio))
        mask = mask_from_orders(random_orders(b, n, generator, latent.device), num_masked)
        cond = self.condition(b, class_label, generator)
        x, _ = self.forward_encoder(tokens, cond, mask)
        z, _ = self.forward_decoder(x, mask)
        z = z + self.diffusion_pos_embed_learned
        mul = self.cfg.diffusion_batch_mul
        loss = self.diffloss(target.reshape(b * n, c).repeat(mul, 1), z.reshape(b * n, -1).repeat(mul, 1),
                             mask.reshape(b * n).repeat(mul), generator=generator)
        return {"loss": loss, "mask_ratio": ratio, "num_masked": num_masked, "mask": mask}

    @torch.no_grad()
    def sample_tokens(self, bsz: int, num_iter: int = 64, cfg: float = 1.0, cfg_schedule: str = "linear",
                      class_label: torch.Tensor | None = None, temperature: float = 1.0,
                      generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
        """MAR generation: ``num_iter`` steps, each predicting the tokens whose turn has come in a
        random order (cosine schedule of the masked fraction), with the diffusion head.

        Returns scaled latents [B, C, h, w] (divide by ``latent_scale`` before the tokenizer's
        decoder). ``cfg`` > 1 uses classifier-free guidance against ``fake_latent`` ("linear":
        guidance grows with the fraction of tokens already generated; "constant").
        """
        if not self.generative:
            raise ValueError("sampling needs the diffusion head (inference_only=False)")
        if cfg_schedule not in ("linear", "constant"):
            raise ValueError(f"cfg_schedule must be 'linear' or 'constant', got {cfg_schedule!r}")
        device = torch.device(device) if device is not None else self.fake_latent.device
        n = self.seq_len
        mask = torch.ones(bsz, n, device=device)
        tokens = torch.zeros(bsz, n, self.token_dim, device=device, dtype=self.fake_latent.dtype)
        orders = random_orders(bsz, n, generator, device)
        for step in range(num_iter):
            cond = self.condition(bsz, class_label, generator)
            toks, m = tokens, mask
            if cfg != 1.0:
                toks = torch.cat([tokens, tokens])
                cond = torch.cat([cond, self.fake_latent.expand(bsz, -1)])
                m = torch.cat([mask, mask])
            x, _ = self.forward_encoder(toks, cond, m)
            z, _ = self.forward_decoder(x, m)
            z = z + self.diffusion_pos_embed_learned
            left = int(mask[0].sum().item())
            mask_len = int(math.floor(n * math.cos(math.pi / 2.0 * (step + 1) / num_iter)))
            mask_len = max(1, min(left - 1, mask_len))
            mask_next = mask_from_orders(orders, mask_len)
            to_pred = mask.bool() if step >= num_iter - 1 else mask.bool() ^ mask_next.bool()
            mask = mask_next
            sel = torch.cat([to_pred, to_pred]) if cfg != 1.0 else to_pred
            scale = 1 + (cfg - 1) * (n - mask_len) / n if cfg_schedule == "linear" else cfg
            new = self.diffloss.sample(z[sel], temperature, scale, generator)
            if cfg != 1.0:
                new = new[: new.shape[0] // 2]
            tokens = tokens.clone()
            tokens[to_pred] = new.to(tokens.dtype)
        return self.unpatchify(tokens)
