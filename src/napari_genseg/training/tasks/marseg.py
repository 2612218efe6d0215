"""MARSeg training: stage 0 (KL tokenizer), stage 1 (MAR pre-training), stage 2 (segmentation).

Hwang et al., "MARSeg: Enhancing Medical Image Segmentation with MAR and Adaptive Feature Fusion"
(MICCAI 2025; github.com/Ewha-AI/MARSeg), on LTH14/mar (Li et al., NeurIPS 2024) and the KL-16
AutoencoderKL of CompVis/latent-diffusion. The loop around it is the one training loop
(``training/loop.py``); each stage saves its own module (``MarSegConfig.module``), so a checkpoint
of any stage resumes and hands over through ``models.checkpoints.load_checkpoint``.

* **Stage 0** (``module="autoencoder"``, :class:`~napari_genseg.models.marseg.KLAutoencoder`):
  encoder + decoder on CT slices with LDM's loss: L1 reconstruction through a learned log-variance
  plus ``kl_weight`` (1e-6) × KL. LDM's LPIPS perceptual term and patch-GAN discriminator are
  **off** (LPIPS needs ImageNet VGG weights that cannot be downloaded here; the adversarial term
  buys texture in natural images, not what a segmentation tokenizer needs). The paper keeps a
  pretrained KL-16 frozen instead; none can be downloaded here, so this stage trains one.
  Validation: mean L1 of the posterior-mean reconstruction on held-out slices (score = -L1).
* **Stage 1** (``module="pretrain"``, :class:`~napari_genseg.models.marseg.MarPretrainer`,
  ``genseg pretrain-mar``): ``init`` = a stage-0 checkpoint whose autoencoder becomes the frozen
  tokenizer (a stage-1 checkpoint continues); MAR masked pre-training, unconditional (every buffer
  token holds ``fake_latent``): mask ratio from the truncated normal on [``mask_ratio_min`` = 0.7,
  1], a random order per image, the diffusion loss on the masked latents, each repeated
  ``diffusion_batch_mul`` times. Only MAR trains (its unused class embedding excepted).
  Validation: the diffusion loss on held-out slices with a fixed generator (score = -loss).
* **Stage 2** (``module="segmentation"``, :class:`~napari_genseg.models.marseg.MarSeg`):
  ``init`` = a stage-1 checkpoint, handed over by ``MarPretrainer.to_segmentation`` (tokenizer
  encoder -> ``kl_encoder``, MAR -> ``mar``, ``quant_conv`` = the posterior-mean half of the
  tokenizer's; GPAF and head random); a stage-2 checkpoint fine-tunes further. KL encoder,
  ``quant_conv``, MAR embeddings / ``encoder_norm``, MAR decoder, GPAF and head train; the MAR
  encoder blocks are frozen (their dropout stays active, as in the official training). Loss
  ``ce_weight`` (2) × CE + ``dice_weight`` (1) × soft Dice over all classes incl. background. The
  buffer holds ``fake_latent`` in training too (the official training feeds ``class_emb[0]`` 90 %
  of the time, its evaluation ``fake_latent``: we train what inference runs). Validation:
  Dice / IoU / HD95 through the inference predictor (score = mean foreground Dice).

Input of every stage: the slice on the model grid, HU window [-125, 275] mapped to [-1, 1]
(``normalization``), repeated to ``in_chans`` (3) identical channels; recorded in the checkpoint's
``input`` so the predictor applies the same. Stages 0-1 may use unlabelled ``image:`` sources.

Recipes: ``paper`` = the spec's AdamW (betas 0.9/0.999, weight decay 0.01 (stage 1: MAR's 0.02),
peak lr = base × effective batch / 256 with base 2.5e-5 (stage 2) or 1e-4 (stages 0-1, MAR's
blr), cosine decay, grad clip 3.0); ``adamw`` = the project's fast CPU recipe (AdamW, lr 2e-4 for
stages 0-1 and 1e-4 for stage 2 unless ``lr`` is given, weight decay 0.01, cosine).

``genseg train --model marseg_demo --stage 0 --data image:CT.nii.gz ...`` then ``genseg
pretrain-mar --model marseg_demo --init STAGE0.safetensors ...`` then ``genseg train --model
marseg_demo --stage 2 --init STAGE1.safetensors --data pairs:...``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import one_line
from .. import data as D
from ..config import TrainConfig, TrainOptionError
from ..losses import soft_dice_loss
from .base import ModelSpec, SliceTask, TaskData, load_init_weights
from .segmentation import validate_slices

__all__ = ["MarSegTrainConfig", "MarSegTask", "MARSEG_NORMALIZATION", "STAGE_MODULES", "stage_lr"]

#: HU window [-125, 275] -> [-1, 1] (the official model's input range; its organ windows are not
#: published: the abdominal soft-tissue window is ours)
MARSEG_NORMALIZATION = {"kind": "hu_window", "low": -125.0, "high": 275.0, "out_min": -1.0, "out_max": 1.0}
#: stage -> the module that stage trains and saves (``MarSegConfig.module``)
STAGE_MODULES = {0: "autoencoder", 1: "pretrain", 2: "segmentation"}
#: at most this many held-out slices are scored by the stage-0/1 validation
_VAL_SLICES = 32


@dataclass
class MarSegTrainConfig(TrainConfig):
    """``TrainConfig`` plus MARSeg's stage and loss weights (see the module docstring)."""

    model: str = "marseg_demo"
    #: 0 = KL autoencoder, 1 = MAR pre-training, 2 = segmentation fine-tuning
    stage: int = 2
    normalization: dict = field(default_factory=lambda: dict(MARSEG_NORMALIZATION))
    #: stage 0: weight of the KL term (LDM's KL-f16 configs: 1e-6)
    kl_weight: float = 1e-6
    #: stage 0: train the (fully convolutional) autoencoder on random crops of this side (a
    #: multiple of the tokenizer stride; 0 = whole slices), as LDM trains on 256² crops; a step
    #: then costs (crop / img_size)² of a whole slice's. Validation uses whole slices.
    stage0_crop: int = 0
    #: stage 2: loss = ce_weight · CE + dice_weight · soft Dice (paper: 2 and 1)
    ce_weight: float = 2.0
    dice_weight: float = 1.0


def stage_lr(stage: int, recipe: str, effective_batch: int) -> tuple[float, float]:
    """Default (lr, weight decay) of a stage under ``recipe`` ("paper" scales by the batch/256)."""
    if recipe == "paper":
        base = 2.5e-5 if stage == 2 else 1e-4
        return base * effective_batch / 256.0, (0.02 if stage == 1 else 0.01)
    return (1e-4 if stage == 2 else 2e-4), 0.01


class _AutoencoderObjective(nn.Module):
    """Stage 0 (what DDP wraps): images -> ``KLAutoencoder.loss`` dict."""

    def __init__(self, ae: nn.Module, kl_weight: float):
        super().__init__()
        self.ae, self.kl_weight = ae, kl_weight

    def forward(self, x):
        return self.ae.loss(x, kl_weight=self.kl_weight)


class _PretrainObjective(nn.Module):
    """Stage 1 (what DDP wraps): images -> ``MarPretrainer.loss`` dict (unconditional)."""

    def __init__(self, pre: nn.Module):
        super().__init__()
        self.pre = pre

    def forward(self, x):
        return self.pre.loss(x)


class MarSegTask(SliceTask):
    """MARSeg stage 0, 1 or 2 (``cfg.stage``; see the module docstring)."""

    title = "MARSeg"
    config_cls = MarSegTrainConfig

    def __init__(self, cfg: MarSegTrainConfig, run):
        super().__init__(cfg, run)
        self.stage = int(cfg.stage)
        if self.stage not in STAGE_MODULES:
            raise TrainOptionError("MARSeg stage must be 0 (KL autoencoder), 1 (MAR pre-training) or 2 (segmentation)")
        if len(self.class_names) < 2:
            raise TrainOptionError("need a background and at least one target class")
        self.recipe_name = {"paper": "marseg-paper", "adamw": "cpu-fast"}.get(cfg.recipe)
        if self.recipe_name is None:
            raise TrainOptionError(f"unknown recipe {cfg.recipe!r} for MARSeg (paper, adamw)")
        # both recipes are AdamW: the loop's optimiser factory gets "adamw" with this stage's values
        lr, wd = stage_lr(self.stage, cfg.recipe, cfg.batch_size * run.dist.world)
        if cfg.recipe == "paper" and cfg.grad_clip is None:
            cfg.grad_clip = 3.0
        cfg.recipe = "adamw"
        cfg.lr = lr if cfg.lr is None else cfg.lr
        cfg.weight_decay = wd if cfg.weight_decay is None else cfg.weight_decay
        self.init_meta = None

    # ---- model
    def build_model(self) -> ModelSpec:
        from ...models import registry

        entry = registry.get_entry(self.cfg.model)
        if entry.family != "marseg":
            raise TrainOptionError(f"{self.cfg.model} is not a MARSeg config")
        overrides = dict(self.cfg.model_overrides)
        overrides.update(num_classes=len(self.class_names), module=STAGE_MODULES[self.stage], inference_only=False)
        if self.cfg.img_size:
            overrides["img_size"] = int(self.cfg.img_size)
        try:
            config = dataclasses.replace(entry.config, **overrides)
        except (TypeError, ValueError) as exc:
            raise TrainOptionError(f"{self.cfg.model}: {exc}") from None
        crop = int(self.cfg.stage0_crop or 0)
        if crop and (crop % config.vae_stride or not 0 < crop <= config.img_size):
            raise TrainOptionError(f"stage0_crop {crop} must be a multiple of {config.vae_stride} in "
                                   f"{config.vae_stride}..{config.img_size}")
        self.in_chans = int(config.in_chans)
        self.set_input(config.img_size)
        self.spec = ModelSpec(registry.get_family("marseg").build(config), entry, config)
        return self.spec

    def input_meta(self) -> dict:
        return {**super().input_meta(), "channels": self.in_chans}

    def prepare(self, model, resuming: bool) -> None:
        """Load ``init`` (not when resuming): stage 0 an autoencoder checkpoint (continue); stage 1 a
        stage-0 one (the frozen tokenizer) or a stage-1 one; stage 2 a stage-1 one (hand-over) or a
        stage-2 one. Raises ``CheckpointError`` for another family, stage or architecture."""
        from ...models.checkpoints import CheckpointError, load_checkpoint

        if resuming or not self.cfg.init:
            if not resuming and self.stage in (1, 2):
                what = "the tokenizer is untrained" if self.stage == 1 else "MAR is not pre-trained"
                self.run.log(f"warning: MARSeg stage {self.stage} without --init: {what}")
            return
        path = self.cfg.init
        ck = load_checkpoint(path, expect_model="marseg")
        mod = ck.config.module
        allowed = {0: ("autoencoder",), 1: ("autoencoder", "pretrain"), 2: ("pretrain", "segmentation")}[self.stage]
        if mod not in allowed:
            want = " or ".join(f"stage {s}" for s, m in STAGE_MODULES.items() if m in allowed)
            have = {m: s for s, m in STAGE_MODULES.items()}[mod]
            raise CheckpointError(f"{path} is a MARSeg stage-{have} ({mod}) checkpoint; stage {self.stage} "
                                  f"starts from a {want} checkpoint")
        try:
            if mod == STAGE_MODULES[self.stage]:  # same stage: continue from its weights
                load_init_weights(model, path, "marseg")
                how = "weights"
            elif self.stage == 1:  # stage-0 autoencoder -> the frozen tokenizer
                model.load_tokenizer(ck.model.float())
                how = "tokenizer"
            else:  # stage-1 -> stage-2 hand-over
                seg, report = ck.model.float().to_segmentation(num_classes=len(self.class_names))
                model.load_state_dict(seg.state_dict())
                how = f"hand-over ({len(report.loaded)} tensors loaded, {len(report.missing)} new: GPAF + head)"
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: its weights do not fit {self.cfg.model} "
                                  f"({one_line(exc)})") from None
        prov = ck.provenance if isinstance(ck.provenance, dict) else {}
        self.init_meta = {"path": str(path), "module": mod, "how": how, "stage": prov.get("stage"),
                          "git_commit": prov.get("git_commit"), "steps": prov.get("steps"),
                          "wall_seconds": prov.get("wall_seconds")}
        self.run.log(f"MARSeg stage {self.stage} from {path} ({mod}: {how})")

    def trainable_parameters(self, model):
        if self.stage == 0:
            return list(model.parameters())
        if self.stage == 1:  # unconditional: the class embedding gets no gradient
            return [p for n, p in model.mar.named_parameters() if not n.startswith("class_emb.")]
        return [p for g in model.stage2_param_groups() for p in g["params"]
                if p is not getattr(getattr(model.mar, "class_emb", None), "weight", None)]

    def objective(self, model):
        if self.stage == 0:
            return _AutoencoderObjective(model, float(self.cfg.kl_weight))
        if self.stage == 1:
            return _PretrainObjective(model)
        return model

    # ---- data
    def data(self) -> TaskData:
        cfg = self.cfg
        cases, split = self.split_sources(cfg.holdout_slices, unlabelled_ok=self.stage < 2)
        ds = self.slice_dataset(cases, split)
        self.cases, self.split = cases, split
        self.val = None
        if self.stage < 2 and split.val:
            val = [(ci, zs) for ci, zs in split.val if zs]
            self.val = D.SliceDataset(cases, val, self.grid, self.norm, None) if val else None
        n_train = sum(len(z) for _, z in split.train)
        n_val = sum(len(z) for _, z in split.val)
        unl = sum(len(z) for ci, z in split.train if cases[ci].kind == "image")
        return TaskData(cases, split, ds, f"stage {self.stage}: {len(ds)} train items ({n_train} slices, "
                                          f"{unl} unlabelled), {n_val} val slices")

    def _x(self, xb: torch.Tensor) -> torch.Tensor:
        return xb.expand(-1, self.in_chans, -1, -1) if self.in_chans != xb.shape[1] else xb

    # ---- loss
    def loss(self, net, batch):
        xb, yb = batch
        xb = self._x(xb)
        crop = int(self.cfg.stage0_crop or 0)
        if self.stage == 0 and 0 < crop < xb.shape[-1]:  # one random window per batch (global RNG)
            i, j = (int(v) for v in torch.randint(0, xb.shape[-1] - crop + 1, (2,)))
            xb = xb[..., i:i + crop, j:j + crop]
        with self.run.autocast():
            out = net(xb)
        if self.stage == 0:
            return out["loss"].float(), {"rec_l1": float(out["rec"]), "kl": float(out["kl"])}
        if self.stage == 1:
            return out["loss"].float(), {"mask_ratio": float(out["mask_ratio"])}
        logits = out.float()
        ce = F.cross_entropy(logits, yb.long())
        dice = soft_dice_loss(logits, yb, include_background=True)
        loss = self.cfg.ce_weight * ce + self.cfg.dice_weight * dice
        return loss, {"ce": float(ce.detach()), "dice": float(dice.detach())}

    # ---- validation
    @torch.no_grad()
    def validate(self, model):
        if self.stage == 2:
            if not self.split.val:
                return None
            return validate_slices(model, self.cases, self.split.val, self.class_names, self.norm, self.grid,
                                   self.run.device, self.cfg.batch_size, self.in_chans)
        if self.val is None or len(self.val) == 0:
            return None
        was = model.training
        model.eval()
        dev, bs = self.run.device, self.cfg.batch_size
        n = min(len(self.val), _VAL_SLICES)
        idx = np.linspace(0, len(self.val) - 1, n).round().astype(int).tolist()
        g = torch.Generator(device=dev).manual_seed(self.cfg.seed + 12345)
        tot, cnt = 0.0, 0
        for s in range(0, n, bs):
            xb = self._x(torch.stack([self.val[i][0] for i in idx[s:s + bs]]).to(dev))
            if self.stage == 0:
                post = model.encode(xb)
                v = float((model.decode(post.mode()).float() - xb).abs().mean())
            else:
                v = float(model.mar.loss(model.tokenizer.latents(xb, g), None, g)["loss"])
            tot += v * xb.shape[0]
            cnt += xb.shape[0]
        if was:
            model.train()
        m = tot / max(cnt, 1)
        key = "rec_l1" if self.stage == 0 else "diffusion_loss"
        return {key: m, "score": -m, "slices": cnt}

    # ---- provenance and state
    def provenance(self) -> dict:
        cfg, mc = self.cfg, self.spec.config
        loss = {0: f"l1_nll + {cfg.kl_weight:g}*kl (LDM; no LPIPS, no discriminator)",
                1: "MAR diffusion loss on masked latents",
                2: f"{cfg.ce_weight:g}*ce + {cfg.dice_weight:g}*dice"}[self.stage]
        hp = {"stage": self.stage, "module": STAGE_MODULES[self.stage], "marseg_recipe": self.recipe_name,
              "repeat": cfg.repeat}
        if self.stage == 0:
            hp.update(kl_weight=cfg.kl_weight, stage0_crop=cfg.stage0_crop)
        elif self.stage == 1:
            hp.update(mask_ratio_min=mc.mask_ratio_min, diffusion_batch_mul=mc.diffusion_batch_mul,
                      diffusion_steps=mc.diffusion_steps, conditioning="fake_latent (unconditional)")
        else:
            hp.update(ce_weight=cfg.ce_weight, dice_weight=cfg.dice_weight, buffer="fake_latent",
                      frozen="mar.encoder_blocks")
        return {"stage": self.stage, "init": self.init_meta, "loss": loss, "hyperparameters": hp}

    def state_dict(self) -> dict:
        return {"stage": self.stage, "init_meta_json": json.dumps(self.init_meta, default=str)}

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("stage", self.stage)) != self.stage:
            raise TrainOptionError(f"{self.cfg.resume} is a MARSeg stage-{state.get('stage')} run, not stage {self.stage}")
        if state.get("init_meta_json"):
            self.init_meta = json.loads(state["init_meta_json"])
