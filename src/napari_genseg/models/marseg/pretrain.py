"""Stage 1 of MARSeg (paper Sec. 2.1): MAR pre-training on CT slices with a frozen KL-16 tokenizer,
and the hand-over of its weights to the segmentation model (stage 2).

:class:`MarPretrainer` = ``tokenizer`` (:class:`KLAutoencoder`, frozen, always in eval mode) +
``mar`` (:class:`MAR` with its diffusion head). A training task calls :meth:`MarPretrainer.loss`
on a batch of images; :meth:`MarPretrainer.generate` samples images to look at what was learnt.
:meth:`MarPretrainer.to_segmentation` builds the stage-2 :class:`MarSeg` from it.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from ..checkpoints import LoadReport, load_state_dict_report
from .autoencoder import KLAutoencoder
from .config import MarSegConfig
from .mar import MAR
from .model import MarSeg

__all__ = ["MarPretrainer"]


class MarPretrainer(nn.Module):
    """Frozen KL-16 tokenizer + MAR with the diffusion loss.

    Keys: ``tokenizer.*`` (:class:`KLAutoencoder`), ``mar.*`` (as in :class:`MarSeg`).
    """

    def __init__(self, cfg: MarSegConfig) -> None:
        super().__init__()
        if cfg.inference_only:
            raise ValueError("MAR pre-training needs the diffusion head: inference_only must be False")
        self.cfg = cfg
        self.tokenizer = KLAutoencoder.from_config(cfg)
        self.tokenizer.requires_grad_(False)
        self.mar = MAR(cfg)

    def train(self, mode: bool = True) -> "MarPretrainer":
        super().train(mode)
        self.tokenizer.eval()  # frozen: no dropout / statistics updates, whatever the mode
        return self

    def load_tokenizer(self, autoencoder: KLAutoencoder) -> LoadReport:
        """Copy a trained (stage-0 or imported KL-16) autoencoder into ``tokenizer`` (strict)."""
        return load_state_dict_report(self.tokenizer, autoencoder.state_dict(), strict=True)

    def loss(self, images: torch.Tensor, class_label: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> dict:
        """Stage-1 loss of a batch.

        Args:
            images: [B, in_chans, img_size, img_size] in [-1, 1].
            class_label: (B,) ids for class-conditional pre-training, or None (unconditional:
                every buffer token holds ``fake_latent``).
            generator: every random draw (posterior sample, mask ratio, orders, label drop,
                diffusion steps and noise), on the images' device.

        Returns :meth:`MAR.loss`'s dict (``loss`` is the scalar to back-propagate).
        """
        s = self.cfg.img_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (self.cfg.in_chans, s, s):
            raise ValueError(f"expected images [B, {self.cfg.in_chans}, {s}, {s}], got {tuple(images.shape)}")
        latent = self.tokenizer.latents(images, generator)
        return self.mar.loss(latent, class_label, generator)

    @torch.no_grad()
    def generate(self, n: int, num_iter: int = 64, cfg: float = 1.0, temperature: float = 1.0,
                 class_label: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample ``n`` images [n, in_chans, img_size, img_size] (MAR generation + KL decoder)."""
        device = self.mar.fake_latent.device
        lat = self.mar.sample_tokens(n, num_iter, cfg, class_label=class_label, temperature=temperature,
                                     generator=generator, device=device)
        return self.tokenizer.decode(lat / self.cfg.latent_scale)

    def to_segmentation(self, num_classes: int | None = None, inference_only: bool = False,
                        quant_conv_from_posterior_mean: bool = True) -> tuple[MarSeg, LoadReport]:
        """The stage-2 model initialised from this one.

        ``kl_encoder`` <- ``tokenizer.encoder``; ``mar`` <- ``mar`` (with ``inference_only``
        the training-only parts are left out). ``quant_conv`` (new in MARSeg, 2z -> z on the raw
        moments): the official code initialises it randomly; with
        ``quant_conv_from_posterior_mean`` it starts as the mean half of the tokenizer's
        ``quant_conv``, so that stage 2 begins from exactly the (mean) latents MAR was trained on.
        GPAF and head stay randomly initialised (reported missing).
        """
        cfg = dataclasses.replace(self.cfg, inference_only=inference_only, module="segmentation",
                                  num_classes=num_classes or self.cfg.num_classes)
        model = MarSeg(cfg)
        sd = {"kl_encoder." + k: v for k, v in self.tokenizer.encoder.state_dict().items()}
        own = model.state_dict()
        sd.update({"mar." + k: v for k, v in self.mar.state_dict().items() if "mar." + k in own})
        if quant_conv_from_posterior_mean:
            z = self.cfg.vae_embed_dim
            sd["quant_conv.weight"] = self.tokenizer.quant_conv.weight[:z].detach().clone()
            sd["quant_conv.bias"] = self.tokenizer.quant_conv.bias[:z].detach().clone()
        report = load_state_dict_report(model, sd)
        return model, report
