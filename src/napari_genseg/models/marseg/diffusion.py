"""MAR's diffusion loss (Li et al., "Autoregressive Image Generation without Vector Quantization",
NeurIPS 2024, Sec. 3; LTH14/mar ``models/diffloss.py`` and ``diffusion/``, from DiT / improved DDPM).

Each masked latent token x0 (dim C) is denoised by a small MLP conditioned on the MAE decoder's
output z at that position:

* :class:`SimpleMLPAdaLN` (``net``): ``input_proj`` Linear(C -> W); y = ``time_embed``(t) +
  ``cond_embed``(z); ``depth`` residual blocks x += gate * MLP(LN(x) * (1 + scale) + shift) with
  (shift, scale, gate) = Linear(SiLU(y)); a DiT final layer LN (no affine) -> AdaLN -> Linear(W ->
  2C). The first C outputs predict the noise eps, the last C the interpolation v in [-1, 1]
  between the log of the posterior variance and log(beta_t) (IDDPM's learned range).
* :class:`GaussianDiffusion`: the beta schedule ("cosine" of IDDPM with max beta 0.999, or
  "linear"), q(x_t | x0), the IDDPM training loss (MSE on eps + the variational bound for the
  variance with the mean frozen, in bits) and ancestral sampling over a respaced subset of the
  steps (``space_timesteps``: 100 of 1000 for MAR).
* :class:`DiffusionHead` (MAR's ``DiffLoss``): loss over masked tokens and sampling, every random
  draw from an explicit ``torch.Generator``.

Schedules are computed in float64 with numpy (as upstream) and gathered per step as float32 on the
tensor's device, so the module holds no float64 buffers (``.half()``/MPS safe).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "SimpleMLPAdaLN",
    "GaussianDiffusion",
    "DiffusionHead",
    "beta_schedule",
    "space_timesteps",
]


# ----------------------------------------------------------------------------------- network
def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of t (``freq_dim`` = 256: cos half then sin half, max period 1e4)
    -> Linear -> SiLU -> Linear. Shapes: t (N,) -> (N, width)."""

    def __init__(self, width: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32,
                                                            device=t.device) / half)
        args = t[:, None].float() * freqs[None]  # (N, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class AdaLNResBlock(nn.Module):
    """x + gate * MLP(LN(x) * (1 + scale) + shift), (shift, scale, gate) from the condition y."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(_modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    """DiT final layer: LN (no affine) -> AdaLN(shift, scale) -> Linear(width -> out)."""

    def __init__(self, width: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """The denoiser of the diffusion loss.

    Shapes: x (N, C) noisy token, t (N,) step index in the 1000-step process, c (N, cond_dim)
    condition -> (N, 2C) = [eps, v].
    """

    def __init__(self, in_channels: int, width: int, cond_dim: int, depth: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(in_channels, width)
        self.res_blocks = nn.ModuleList(AdaLNResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, 2 * in_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MAR's initialisation: xavier-uniform Linear weights, zero biases, N(0, 0.02) time MLP,
        zero AdaLN modulations and a zero output layer (the net starts at eps = 0, v = 0)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for blk in self.res_blocks:
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = self.input_proj(x)
        y = self.time_embed(t) + self.cond_embed(c)
        for blk in self.res_blocks:
            x = blk(x, y)
        return self.final_layer(x, y)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor,
                         cfg_scale: float) -> torch.Tensor:
        """Classifier-free guidance: rows [0, N/2) conditional, [N/2, N) unconditional, same x.

        eps = eps_u + s (eps_c - eps_u) for both halves; the variance output is kept per row.
        """
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, c)
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels:]
        cond, uncond = eps.chunk(2)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)


# --------------------------------------------------------------------------------- schedules
def beta_schedule(name: str, steps: int) -> np.ndarray:
    """float64 betas: "cosine" (IDDPM, alpha_bar(t) = cos²((t + 0.008) / 1.008 * pi / 2), beta
    capped at 0.999) or "linear" (DDPM 1e-4 .. 2e-2 rescaled to ``steps``)."""
    if name == "linear":
        scale = 1000 / steps
        return np.linspace(scale * 1e-4, scale * 0.02, steps, dtype=np.float64)
    if name == "cosine":
        def alpha_bar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999)
                         for i in range(steps)], dtype=np.float64)
    raise ValueError(f"unknown noise schedule {name!r}")


def space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """The ``count`` steps of a ``num_timesteps`` process kept for sampling (IDDPM
    ``space_timesteps`` with one section: evenly strided, Python ``round``), ascending."""
    if not 1 <= count <= num_timesteps:
        raise ValueError(f"cannot take {count} of {num_timesteps} steps")
    stride = 1 if count <= 1 else (num_timesteps - 1) / (count - 1)
    return sorted({round(i * stride) for i in range(count)})


class GaussianDiffusion:
    """A (possibly respaced) diffusion process with learned-range variance and eps prediction.

    ``use_timesteps`` (ascending subset of the base steps) respaces the process: new betas
    1 - abar_k / abar_{k-1} over the kept steps; the network always receives the base step index
    (``timestep_map``). Not an ``nn.Module``: the arrays are float64 numpy.
    """

    def __init__(self, base_betas: np.ndarray, use_timesteps: list[int] | None = None) -> None:
        base_abar = np.cumprod(1.0 - np.asarray(base_betas, dtype=np.float64))
        if use_timesteps is None:
            use_timesteps = list(range(len(base_abar)))
        betas, last = [], 1.0
        for i in use_timesteps:
            betas.append(1 - base_abar[i] / last)
            last = base_abar[i]
        self.timestep_map = np.asarray(use_timesteps, dtype=np.int64)
        b = np.asarray(betas, dtype=np.float64)
        self.betas = b
        self.num_timesteps = len(b)
        abar = np.cumprod(1.0 - b)
        abar_prev = np.append(1.0, abar[:-1])
        self.sqrt_abar = np.sqrt(abar)
        self.sqrt_one_minus_abar = np.sqrt(1.0 - abar)
        self.sqrt_recip_abar = np.sqrt(1.0 / abar)
        self.sqrt_recipm1_abar = np.sqrt(1.0 / abar - 1)
        post_var = b * (1.0 - abar_prev) / (1.0 - abar)
        self.post_log_var_clipped = np.log(np.append(post_var[1], post_var[1:])) if len(b) > 1 \
            else np.array([np.log(b[0])])
        self.post_coef1 = b * np.sqrt(abar_prev) / (1.0 - abar)
        self.post_coef2 = (1.0 - abar_prev) * np.sqrt(1.0 - b) / (1.0 - abar)
        self.log_betas = np.log(b)

    @staticmethod
    def _at(arr: np.ndarray, t: torch.Tensor) -> torch.Tensor:
        """arr[t] as float32 (N, 1) on t's device (cast on the CPU: MPS has no float64)."""
        return torch.from_numpy(arr).float().to(t.device)[t][:, None]

    def model_step_index(self, t: torch.Tensor) -> torch.Tensor:
        """Respaced index -> base step index the network is conditioned on."""
        return torch.from_numpy(self.timestep_map).to(t.device)[t]

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self._at(self.sqrt_abar, t) * x0 + self._at(self.sqrt_one_minus_abar, t) * noise

    def posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x0)."""
        mean = self._at(self.post_coef1, t) * x0 + self._at(self.post_coef2, t) * x_t
        return mean, self._at(self.post_log_var_clipped, t)

    def p_mean_logvar(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Model mean, log-variance and x0 prediction from the net output [eps, v] (N, 2C)."""
        c = x_t.shape[1]
        eps, v = out[:, :c], out[:, c:]
        frac = (v + 1) / 2
        log_var = frac * self._at(self.log_betas, t) + (1 - frac) * self._at(self.post_log_var_clipped, t)
        x0 = self._at(self.sqrt_recip_abar, t) * x_t - self._at(self.sqrt_recipm1_abar, t) * eps
        mean, _ = self.posterior(x0, x_t, t)
        return mean, log_var, x0

    def training_losses(self, out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
                        t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """IDDPM hybrid loss per row (N,): mean-squared eps error + the variational-bound term
        (bits per dim) for the variance with the mean gradient stopped; at t = 0 the bound is the
        discretised Gaussian decoder NLL (bins of 2/255 on [-1, 1], as upstream)."""
        c = x0.shape[1]
        out = out.float()
        mse = (noise - out[:, :c]).square().mean(1)
        frozen = torch.cat([out[:, :c].detach(), out[:, c:]], dim=1)
        mean, log_var, _ = self.p_mean_logvar(frozen, x_t, t)
        true_mean, true_log_var = self.posterior(x0, x_t, t)
        kl = 0.5 * (-1.0 + log_var - true_log_var + torch.exp(true_log_var - log_var)
                    + (true_mean - mean).square() * torch.exp(-log_var))
        kl = kl.mean(1) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).mean(1) / math.log(2.0)
        return mse + torch.where(t == 0, nll, kl)


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor,
                                         log_scales: torch.Tensor) -> torch.Tensor:
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


# ------------------------------------------------------------------------------------- head
class DiffusionHead(nn.Module):
    """MAR's ``DiffLoss``: the denoiser ``net`` plus its training and sampling processes.

    Args:
        token_dim: C, width of a latent token (16 for KL-16, patch size 1).
        cond_dim: width of the MAE decoder output z.
        width / depth: SimpleMLPAdaLN width and residual blocks (MAR-B: 1024 / 6).
        steps: training steps of the process (1000); ``sampling_steps``: respaced steps (100).
        schedule: "cosine" (MAR) or "linear".
    """

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int, steps: int = 1000,
                 sampling_steps: int = 100, schedule: str = "cosine") -> None:
        super().__init__()
        self.token_dim = token_dim
        self.net = SimpleMLPAdaLN(token_dim, width, cond_dim, depth)
        betas = beta_schedule(schedule, steps)
        self.train_diffusion = GaussianDiffusion(betas)
        self.gen_diffusion = GaussianDiffusion(betas, space_timesteps(steps, sampling_steps))

    def forward(self, target: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Diffusion loss of ``target`` tokens given conditions ``z``.

        Shapes: target (N, C), z (N, cond_dim), mask (N,) of 0/1 (loss averaged over rows with
        mask 1; None: over all rows). One uniform step t and one Gaussian noise per row, drawn
        from ``generator`` (which must live on target's device). Returns a scalar.
        """
        d = self.train_diffusion
        n = target.shape[0]
        t = torch.randint(0, d.num_timesteps, (n,), device=target.device, generator=generator)
        noise = torch.randn(target.shape, device=target.device, dtype=torch.float32,
                            generator=generator)
        x0 = target.float()
        x_t = d.q_sample(x0, t, noise)
        out = self.net(x_t.to(z.dtype), d.model_step_index(t), z)
        loss = d.training_losses(out, x0, x_t, t, noise)
        if mask is None:
            return loss.mean()
        mask = mask.to(loss.dtype)
        return (loss * mask).sum() / mask.sum().clamp_min(1.0)

    @torch.no_grad()
    def sample(self, z: torch.Tensor, temperature: float = 1.0, cfg: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Ancestral sampling over the respaced process (MAR ``DiffLoss.sample``).

        Shapes: z (N, cond_dim) -> tokens (N, C). With ``cfg != 1`` z holds N/2 conditional rows
        then N/2 unconditional ones; both halves start from the same noise and the guided noise
        estimate drives both (the caller keeps the first half). ``temperature`` scales the noise
        of every step.
        """
        d = self.gen_diffusion
        n = z.shape[0]
        rows = n // 2 if cfg != 1.0 else n
        x = torch.randn((rows, self.token_dim), device=z.device, dtype=torch.float32,
                        generator=generator)
        if cfg != 1.0:
            x = torch.cat([x, x])
        for i in reversed(range(d.num_timesteps)):
            t = torch.full((n,), i, device=z.device, dtype=torch.long)
            ts = d.model_step_index(t)
            if cfg != 1.0:
                out = self.net.forward_with_cfg(x.to(z.dtype), ts, z, cfg)
            else:
                out = self.net(x.to(z.dtype), ts, z)
            mean, log_var, _ = d.p_mean_logvar(out.float(), x, t)
            if i > 0:
                noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
                x = mean + torch.exp(0.5 * log_var) * noise * temperature
            else:
                x = mean
        return x
