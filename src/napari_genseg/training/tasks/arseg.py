"""AR-Seg training: stage 0 (image encoder pre-training, optional), stage 1 (multi-scale mask
autoencoder) and stage 2 (next-scale segmentor).

Chen et al., "Autoregressive Medical Image Segmentation via Next-Scale Mask Prediction" (MICCAI
2025), Sec. 2.1 (mask VQ) and 2.2 (next-scale prediction); the loop around it is the one
training loop (``training/loop.py``).

* Stage 0 (configs with ``seg_head_dim`` > 0, e.g. ``arseg_ct``; not in the paper): the image
  encoder + its segmentation head (``ArSeg.encoder_logits``) trained as a slice segmentation network
  (Dice + CE on the class ids, the segmentation task's items and validation). Stage 2 then loads the
  encoder from it (``encoder_init``) and keeps it frozen when ``train_image_encoder`` is False: a
  CT-trained encoder in place of the paper's MedSAM.
* Stage 1: ``model.vq.loss(mask)`` (``init``: continue from that checkpoint's VQ) = Dice + BCE + VQ on binary target masks (every target class;
  for a class with several annotators, e.g. the phantoms' ``liver_lesion``, every annotator's mask).
  Validation: reconstruction Dice of the held-out masks; score = recon_dice.
* Stage 2 (``init`` = a stage-1 checkpoint; VQ frozen, in eval mode): cross-entropy on the token
  ids of the ground-truth mask (``model.vq.encode_tokens``), conditioned on the slice and the AdaLN
  class id (= label id - 1). Multi-annotator classes draw ONE annotator at random per item (AR-Seg on
  LIDC). Validation: teacher-forced token CE and accuracy; score = token_acc.

Items are (case, slice, class): slices that contain the target, plus slices without it at rate
``empty_fraction`` of those (per class and case; a case without the target, e.g. a pelvis phantom,
gives ``empty_fraction`` of its slices), so the model also learns to answer "nothing here". Validation =
held-out cases; a single-case source (a real CT) holds out a slice block (``holdout_slices``,
as the segmentation task does). ``repeat`` oversamples a data spec's (or a kind's) items.

``genseg train --model arseg_light --stage 1 ...`` / ``--stage 2 --init STAGE1.safetensors``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import one_line
from ...preprocessing import Normalization, SliceGrid
from .. import data as D
from ..config import TrainConfig, TrainOptionError

from .base import load_init_weights, ModelSpec, SliceTask, TaskData, build_registered_model

__all__ = ["ArSegTrainConfig", "ArSegTask", "ArSegItems", "target_masks", "ARSEG_CLASSES"]

#: the demo's targets (label ids 1..3 -> AdaLN ids 0..2)
ARSEG_CLASSES = ("background", "liver", "spleen", "liver_lesion")


@dataclass
class ArSegTrainConfig(TrainConfig):
    """``TrainConfig`` plus AR-Seg's stage, init checkpoint and item sampling."""

    model: str = "arseg_light"
    classes: list = field(default_factory=lambda: list(ARSEG_CLASSES))
    stage: int = 1
    # ``init`` (TrainConfig): stage 2 starts from this stage-1 checkpoint (its VQ is loaded and frozen)
    #: per class: slices without the target, as a fraction of the slices with it
    empty_fraction: float = 0.1
    #: oversample the items of a class name (e.g. {"liver_lesion": 2})
    class_repeat: dict = field(default_factory=dict)
    grid: str = "resize"
    phantom_annotators: int = 4
    #: region-of-interest mode (``tasks.arseg_roi``): crops of this field of view (mm) around each
    #: structure of a target class instead of whole slices; recorded as ``input.roi`` in the checkpoint
    roi_fov_mm: float | None = None
    #: ROI mode: uniform jitter (mm, per axis) of the crop centre; default 1/6 of the field of view
    roi_jitter_mm: float | None = None
    #: stage 2: load ``image_encoder.*`` (and ``encoder_head.*``) from this stage-0 checkpoint after
    #: ``init`` (the stage-1 checkpoint, for the VQ)
    encoder_init: str | None = None
    #: stage 2: warm-start ``segmentor.*`` (adapter + transformer) from this AR-Seg checkpoint, e.g.
    #: a trained segmentor of another mask latent; see ``ArSegTask._warm_start_segmentor``
    segmentor_init: str | None = None


# ----------------------------------------------------------------------------- data
def target_masks(case: D.Case, class_names, cls: int, zs) -> np.ndarray:
    """(A, n, y, x) bool masks of label id ``cls`` on slices ``zs``: every annotator where the case
    has several for that class (``case.annotations``), else A = 1 from the labels (liver includes
    its lesions)."""
    name = class_names[cls]
    if name in case.annotations:
        return case.annotations[name][:, zs]
    lab = case.labels[zs]
    m = lab == cls
    if name == "liver" and "liver_lesion" in class_names:
        m |= lab == class_names.index("liver_lesion")
    return m[None]


class ArSegItems(torch.utils.data.Dataset):
    """(case, slice, class) items on the model grid. Returns (x (1, S, S) normalised,
    mask (1, M, M) float {0,1} on the mask grid, AdaLN class id = label id - 1).

    A multi-annotator class draws one annotator per item (``all_annotators``: every annotator is
    an item of its own instead, for stage 1). ``case_repeat`` (case index -> n) repeats a case's
    items n times (e.g. the one real CT among many phantoms)."""

    def __init__(self, cases, split_items, class_names, grid: SliceGrid, norm: Normalization,
                 mask_size: int, augment: D.Augment | None = None, empty_fraction: float = 0.1,
                 class_repeat: dict | None = None, seed: int = 0, all_annotators: bool = False,
                 case_repeat: dict | None = None):
        self.grid, self.norm, self.mask_size, self.augment, self.seed = grid, norm, mask_size, augment, seed
        self.epoch = 0
        rng = np.random.default_rng(seed)
        xs, masks, self.items = [], [], []  # items: (stored slice, class, annotator or -1)
        class_repeat = class_repeat or {}
        pos = 0
        for ci, zs in split_items:
            if not zs:
                continue
            c = cases[ci]
            x, _ = D.to_grid(c.image[zs], c.labels[zs], c.spacing[1:], grid, norm.pad_value_hu)
            xs.append(x)
            per_class = {}
            for k in range(1, len(class_names)):
                m = target_masks(c, class_names, k, zs)  # (A, n, y, x)
                a = m.shape[0]
                g = torch.stack([D.to_grid(c.image[zs[:1]], m[j], c.spacing[1:], grid)[1] for j in range(a)], 1)
                per_class[k] = g.to(torch.uint8)  # (n, A, S, S)
                present = g.flatten(2).any(-1).any(-1)  # (n,)
                pos_idx = [i for i in range(len(zs)) if bool(present[i])]
                neg_idx = [i for i in range(len(zs)) if not bool(present[i])]
                # a case without the target at all (a pelvis/thorax negative) gives empty_fraction of its
                # slices, so whole-torso negatives teach "nothing here" too
                n_neg = min(len(neg_idx), int(round(empty_fraction * (len(pos_idx) or len(zs)))))
                neg_idx = [int(v) for v in rng.choice(neg_idx, n_neg, replace=False)] if n_neg else []
                rep = max(1, int(class_repeat.get(class_names[k], 1))) * max(1, int((case_repeat or {}).get(ci, 1)))
                for i in sorted(pos_idx + neg_idx):
                    for j in (range(a) if all_annotators else [-1]):
                        self.items += [(pos + i, k, j)] * rep
            masks.append(per_class)
            pos += len(zs)
        self.x = torch.cat(xs) if xs else torch.zeros((0, 1, grid.size, grid.size))
        # class -> (N, A, S, S); a case with one annotator is broadcast to the class's A
        self._mask_by_class = {}
        for k in range(1, len(class_names)):
            parts = [m[k] for m in masks]
            amax = max((p.shape[1] for p in parts), default=1)
            parts = [p if p.shape[1] == amax else p[:, :1].expand(-1, amax, -1, -1) for p in parts]
            self._mask_by_class[k] = torch.cat(parts) if parts else None

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i):
        j, k, a = self.items[i]
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch * 100_003 + i) % (2**63))
        ms = self._mask_by_class[k][j]  # (A, S, S)
        if a < 0:
            a = int(torch.randint(ms.shape[0], (1,), generator=g))
        x, y = D.augment_and_normalize(self.augment, self.norm, self.x[j], ms[a].long(), g)
        y = y[None, None].float()
        if y.shape[-1] != self.mask_size:
            y = (F.interpolate(y, size=(self.mask_size, self.mask_size), mode="area") > 0.5).float()
        return x.contiguous(), y[0].contiguous(), k - 1


# ----------------------------------------------------------------------------- the task
class _Stage1(nn.Module):
    """Stage-1 objective over the VQ only (what DDP wraps): batch -> {"total", parts} of ``vq.loss``."""

    def __init__(self, vq: nn.Module):
        super().__init__()
        self.vq = vq

    def forward(self, x, mask, class_ids):
        return self.vq.loss(mask)


class _Stage0(nn.Module):
    """Stage-0 objective (what DDP wraps): the encoder head's per-pixel logits of a batch of slices."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.encoder_logits(x)


class _Stage2(nn.Module):
    """Stage-2 objective (what DDP wraps): token CE of the mask's VQ tokens (frozen VQ, no grad)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, mask, class_ids):
        with torch.no_grad():
            ids = self.model.vq.encode_tokens(mask)
        return self.model(x, ids, class_ids)




class ArSegTask(SliceTask):
    """AR-Seg stage 1 (mask VQ) or stage 2 (segmentor on a frozen VQ), ``cfg.stage``."""

    title = "AR-Seg"
    config_cls = ArSegTrainConfig

    def __init__(self, cfg: ArSegTrainConfig, run):
        super().__init__(cfg, run)
        self.stage = int(cfg.stage)
        if self.stage not in (0, 1, 2):
            raise TrainOptionError("stage must be 0, 1 or 2")
        if len(self.class_names) < 2:
            raise TrainOptionError("need a background and at least one target class")
        self.init_meta = None

    def build_model(self) -> ModelSpec:
        # AdaLN ids count foreground classes: num_classes = K - 1
        self.spec = build_registered_model(self.cfg, len(self.class_names) - 1)
        if self.spec.entry.family != "arseg":
            raise TrainOptionError(f"{self.cfg.model} is not an AR-Seg config")
        mcfg = self.spec.config
        if self.stage == 0 and not mcfg.seg_head_dim:
            raise TrainOptionError(f"{self.cfg.model} has no encoder head (seg_head_dim = 0): no stage 0")
        self.mask_size = int(mcfg.mask_size)
        self.set_input(mcfg.img_size)
        return self.spec

    def data(self) -> TaskData:
        cfg = self.cfg
        cases, split = self.split_sources(cfg.holdout_slices, phantom_annotators=cfg.phantom_annotators)
        self.cases, self.split = cases, split
        if cfg.roi_fov_mm:
            return self._roi_data(cases, split)
        if self.stage == 0:
            from ..losses import make_loss

            self.criterion = make_loss("dice_ce").to(self.run.device)
            ds = self.slice_dataset(cases, split)
            self.n_train = len(ds)
            return TaskData(cases, split, ds, f"{len(ds)} train slices, {sum(len(z) for _, z in split.val)} val slices")
        case_repeat = {}
        for ci, c in enumerate(cases):
            r = cfg.repeat.get(c.source, cfg.repeat.get(c.kind))
            if r:
                case_repeat[ci] = int(r)
        common = dict(class_names=self.class_names, grid=self.grid, norm=self.norm, mask_size=self.mask_size,
                      empty_fraction=cfg.empty_fraction, seed=cfg.seed, all_annotators=self.stage == 1)
        ds = ArSegItems(cases, split.train, augment=D.Augment.from_options(cfg.augment),
                        class_repeat=cfg.class_repeat, case_repeat=case_repeat, **common)
        self.val = ArSegItems(cases, split.val, augment=None, **common) if split.val else None
        if len(ds) == 0:
            raise D.DataSpecError("no training items (no slice contains a target class)")
        self.n_train = len(ds)
        return TaskData(cases, split, ds, f"{len(ds)} train items, {0 if self.val is None else len(self.val)} val items")

    def _roi_data(self, cases, split) -> TaskData:
        """ROI mode: crops around each structure (``tasks.arseg_roi.ArSegRoiItems``)."""
        from .arseg_roi import ArSegRoiItems

        cfg = self.cfg
        common = dict(class_names=self.class_names, img_size=self.grid.size, mask_size=self.mask_size,
                      norm=self.norm, fov_mm=float(cfg.roi_fov_mm), empty_fraction=cfg.empty_fraction,
                      seed=cfg.seed, all_annotators=self.stage == 1)
        ds = ArSegRoiItems(cases, split.train, jitter_mm=self.roi_jitter_mm,
                           augment=D.Augment.from_options(cfg.augment), class_repeat=cfg.class_repeat, **common)
        self.val = ArSegRoiItems(cases, split.val, **common) if split.val else None
        if len(ds) == 0:
            raise D.DataSpecError("no ROI training items (no slice contains a target class)")
        self.n_train = len(ds)
        return TaskData(cases, split, ds, f"{len(ds)} train ROI crops ({ds.n_pos} structures, {ds.n_neg} negatives, "
                        f"{cfg.roi_fov_mm:g} mm), {0 if self.val is None else len(self.val)} val crops")

    @property
    def roi_jitter_mm(self) -> float:
        j = self.cfg.roi_jitter_mm
        return float(self.cfg.roi_fov_mm) / 6.0 if j is None else float(j)

    def input_meta(self) -> dict:
        meta = super().input_meta()
        if self.cfg.roi_fov_mm:
            # crops are resampled to img_size² at fov_mm / img_size mm per pixel: not a whole-slice grid
            meta.update(grid="resize", spacing_mm=None,
                        roi={"fov_mm": float(self.cfg.roi_fov_mm), "size": int(self.grid.size),
                             "jitter_mm": self.roi_jitter_mm, "centre": "box centre (training: structure "
                             "bounding-box centre + jitter)"})
        return meta

    def prepare(self, model, resuming: bool) -> None:
        if self.stage == 1 and self.cfg.init and not resuming:
            self._load_vq(model)
            return
        if self.stage != 2 or resuming:
            return
        if not self.cfg.init:
            self.run.log("warning: stage 2 without --init: the VQ is untrained")
            self._load_encoder(model)
            return
        ck = load_init_weights(model, self.cfg.init, self.spec.entry.family)
        if list(ck.class_names) != self.class_names:
            self.run.log(f"note: init checkpoint classes {ck.class_names} != {self.class_names}")
        prov = ck.provenance if isinstance(getattr(ck, "provenance", None), dict) else None
        self.init_meta = {"path": str(self.cfg.init), "provenance": None if prov is None else {
            k: prov.get(k) for k in ("stage", "git_commit", "wall_seconds", "hyperparameters", "data", "validation")}}
        self._load_encoder(model)
        self._warm_start_segmentor(model)

    def _load_vq(self, model) -> None:
        """Stage 1 with ``init``: continue training the mask VQ of that AR-Seg checkpoint (any config
        whose VQ has the same shapes; its encoder, segmentor and classes are not used)."""
        from ...models.checkpoints import CheckpointError, load_checkpoint

        ck = load_checkpoint(self.cfg.init, expect_model=self.spec.entry.family)
        sd = {k[3:]: v.float() for k, v in ck.model.state_dict().items() if k.startswith("vq.")}
        try:
            model.vq.load_state_dict(sd)
        except RuntimeError as exc:
            raise CheckpointError(f"{self.cfg.init}: its mask VQ does not fit this model "
                                  f"({one_line(exc)})") from None
        prov = ck.provenance if isinstance(getattr(ck, "provenance", None), dict) else {}
        self.init_meta = {"path": str(self.cfg.init), "config": ck.config_name, "vq_only": True, "provenance": {
            k: prov.get(k) for k in ("stage", "git_commit", "wall_seconds", "hyperparameters", "data", "validation")}}
        self.run.log(f"stage 1 continues the mask VQ of {self.cfg.init}")

    def _warm_start_segmentor(self, model) -> None:
        """Stage 2 with ``segmentor_init``: copy each ``segmentor.*`` tensor of that checkpoint whose
        name and shape match this model's. ``pos_embed`` (length = conditioning tokens + 1 + the
        token count, which depends on the mask latent's scales) gets its first ``num_cond + 1`` rows
        (conditioning + start positions) when the widths match; the other rows keep their
        initialisation. The output ``head`` is copied only when the two checkpoints hold the same
        mask VQ (its rows score that VQ's codes). Everything else stays as built. Not in the
        paper: a warm start that lets a 16×16-latent segmentor begin from the 8×8 demo's adapter
        and transformer (whose code embedding re-learns the new codebook). Logs and records the
        counts; raises ``CheckpointError`` when nothing matches (another family or width)."""
        if not self.cfg.segmentor_init:
            return
        from ...models.checkpoints import CheckpointError, load_checkpoint

        ck = load_checkpoint(self.cfg.segmentor_init, expect_model=self.spec.entry.family)
        theirs = {k: v for k, v in ck.model.state_dict().items() if k.startswith("segmentor.")}
        mine = model.state_dict()
        own = {k: v for k, v in mine.items() if k.startswith("segmentor.")}
        their_vq = {k: v for k, v in ck.model.state_dict().items() if k.startswith("vq.")}
        same_vq = their_vq.keys() == {k for k in mine if k.startswith("vq.")} and all(
            torch.equal(v.float(), mine[k].float()) for k, v in their_vq.items())
        copied, partial, kept = [], [], []
        with torch.no_grad():
            for k, v in own.items():
                w = theirs.get(k)
                if k == "segmentor.head.weight" and not same_vq:
                    kept.append(k)  # its rows score the other VQ's codes
                elif w is not None and w.shape == v.shape:
                    v.copy_(w.to(v.dtype))
                    copied.append(k)
                elif k == "segmentor.pos_embed" and w is not None and w.shape[-1] == v.shape[-1]:
                    n = int(model.segmentor.num_cond) + 1
                    v[:, :n].copy_(w[:, :n].to(v.dtype))
                    partial.append(k)
                else:
                    kept.append(k)
        if not copied:
            raise CheckpointError(f"{self.cfg.segmentor_init}: no segmentor tensor fits this model")
        n_copied = sum(own[k].numel() for k in copied)
        self.segmentor_meta = {"path": str(self.cfg.segmentor_init), "config": ck.config_name,
                               "copied": len(copied), "copied_parameters": n_copied,
                               "partial": partial, "kept_initialisation": kept}
        self.run.log(f"segmentor warm start from {self.cfg.segmentor_init}: {len(copied)} tensors "
                     f"({n_copied / 1e6:.2f} M values) copied, partly {partial or 'none'}, "
                     f"kept as built {kept or 'none'}")

    def _load_encoder(self, model) -> None:
        """Stage 2 with ``encoder_init``: the image encoder (+ head) of that stage-0 checkpoint."""
        if not self.cfg.encoder_init or getattr(self, "_encoder_loaded", False):
            return
        from ...models.checkpoints import CheckpointError, load_checkpoint

        ck = load_checkpoint(self.cfg.encoder_init, expect_model=self.spec.entry.family)
        sd = {k: v.float() for k, v in ck.model.state_dict().items()
              if k.startswith(("image_encoder.", "encoder_head."))}
        own = {k for k in model.state_dict() if k.startswith(("image_encoder.", "encoder_head."))}
        if set(sd) != own:
            raise CheckpointError(f"{self.cfg.encoder_init}: its image encoder does not fit this model")
        try:
            model.load_state_dict(sd, strict=False)
        except RuntimeError as exc:
            raise CheckpointError(f"{self.cfg.encoder_init}: its image encoder does not fit this model "
                                  f"({one_line(exc)})") from None
        self._encoder_loaded = True
        prov = ck.provenance if isinstance(getattr(ck, "provenance", None), dict) else {}
        self.encoder_meta = {"path": str(self.cfg.encoder_init), "provenance": {
            k: prov.get(k) for k in ("stage", "git_commit", "wall_seconds", "hyperparameters", "data", "validation")}}
        self.run.log(f"image encoder from {self.cfg.encoder_init}"
                     + ("" if self.spec.config.train_image_encoder else " (frozen)"))

    def trainable_parameters(self, model):
        return model.stage_parameters(self.stage)

    def train_mode(self, model) -> None:
        model.train()
        if self.stage == 2:
            model.vq.eval()

    def objective(self, model):
        if self.stage == 0:
            return _Stage0(model)
        return _Stage1(model.vq) if self.stage == 1 else _Stage2(model)

    def loss(self, net, batch):
        if self.stage == 0:
            xb, yb = batch
            with self.run.autocast():
                logits = net(xb)
            return self.criterion(logits.float(), yb), {}
        with self.run.autocast():
            out = net(*batch)
        if self.stage == 1:
            return out["total"].float(), {k: float(v.detach()) for k, v in out.items() if k != "total"}
        return out.float(), {}

    @torch.no_grad()
    def validate(self, model):
        if self.stage == 0:
            if not self.split.val:
                return None
            from .segmentation import validate_slices

            return validate_slices(_Stage0(model), self.cases, self.split.val, self.class_names, self.norm,
                                   self.grid, self.run.device, self.cfg.batch_size)
        if self.val is None or len(self.val) == 0:
            return None
        was = model.training
        model.eval()
        dev, bs = self.run.device, self.cfg.batch_size
        tot, n, dices, correct, ntok = 0.0, 0, [], 0, 0
        for s in range(0, len(self.val), bs):
            b = [self.val[i] for i in range(s, min(len(self.val), s + bs))]
            xb = torch.stack([t[0] for t in b]).to(dev)
            mb = torch.stack([t[1] for t in b]).to(dev)
            cb = torch.tensor([t[2] for t in b], device=dev)
            if self.stage == 1:
                p = (model.vq(mb)["logits"] > 0).float()
                inter = (p * mb).flatten(1).sum(1)
                den = p.flatten(1).sum(1) + mb.flatten(1).sum(1)
                dices += torch.where(den > 0, 2 * inter / den.clamp_min(1), torch.ones_like(den)).tolist()
                tot += float(model.vq.loss(mb)["total"]) * len(b)
            else:
                ids = model.vq.encode_tokens(mb)
                emb = model.embed(xb)
                teacher = model.vq.quantizer.teacher_inputs(ids)
                logits = model.segmentor(emb, cb, teacher.to(emb.dtype))
                tot += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids.reshape(-1))) * len(b)
                correct += int((logits.argmax(-1) == ids).sum())
                ntok += ids.numel()
            n += len(b)
        if was:
            self.train_mode(model)
        v = {"loss": tot / max(n, 1), "items": n}
        if self.stage == 1:
            v["recon_dice"] = v["score"] = float(np.mean(dices))
        else:
            v["token_acc"] = v["score"] = correct / max(ntok, 1)
        return v

    def provenance(self) -> dict:
        cfg = self.cfg
        return {"stage": self.stage, "init": self.init_meta,
                "encoder_init": getattr(self, "encoder_meta", None),
                "segmentor_init": getattr(self, "segmentor_meta", None),
                "loss": {0: "dice_ce (encoder head)", 1: "dice+bce+vq", 2: "token_ce"}[self.stage],
                "hyperparameters": {"empty_fraction": cfg.empty_fraction, "class_repeat": cfg.class_repeat,
                                    "mask_size": self.mask_size, "repeat": cfg.repeat,
                                    **({"roi_fov_mm": float(cfg.roi_fov_mm), "roi_jitter_mm": self.roi_jitter_mm}
                                       if cfg.roi_fov_mm else {})}}

    def state_dict(self) -> dict:
        return {"stage": self.stage, "init_meta_json": json.dumps(self.init_meta, default=str)}

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("stage", self.stage)) != self.stage:
            raise TrainOptionError(f"{self.cfg.resume} is a stage-{state.get('stage')} run, not stage {self.stage}")
        if state.get("init_meta_json"):
            self.init_meta = json.loads(state["init_meta_json"])

