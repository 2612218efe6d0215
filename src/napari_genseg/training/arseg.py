"""AR-Seg training: stage 1 (multi-scale mask autoencoder) and stage 2 (next-scale segmentor).

Reuses the shared trainer (``loop.py``): device / precision, DDP under ``torchrun`` (``Dist``,
``_init_dist``, rank-0-only printing and saving), the optimiser recipes and lr schedules
(``time_budget_minutes`` runs the schedule on elapsed wall time), resume through ``NAME.train.pt``,
provenance (git commit, config, data cases, split) in the checkpoint JSON; and ``data.py``: sources,
case-level split, ``SliceGrid`` mapping (``to_grid``) and ``Augment``.

* Stage 1: ``model.vq.loss(mask)`` = Dice + BCE + VQ on binary target masks (every target class;
  for a class with several annotators, e.g. the phantoms' ``liver_lesion``, every annotator's mask).
* Stage 2 (``init`` = a stage-1 checkpoint; VQ frozen): cross-entropy on the 204 token ids of the
  ground-truth mask (``model.vq.encode_tokens``), conditioned on the slice and the AdaLN class id
  (= label id - 1). Multi-annotator classes draw ONE annotator at random per item (AR-Seg on LIDC).

Items are (case, slice, class): slices that contain the target, plus slices without it at rate
``empty_fraction`` (per class; so the model also learns to answer "nothing here").

``genseg train --model arseg_light --stage 1 ...`` / ``--stage 2 --init STAGE1.safetensors`` route
here (``training/cli.py``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..preprocessing import Normalization, SliceGrid
from . import data as D
from .loop import (Dist, StepGuard, TrainConfig, _build_model, _init_dist, _log, _lr_lambda,
                   _make_optimizer, _precision, _resolve_device, barrier, git_commit, rank0_decision,
                   set_budget_lr, train_state_path)

__all__ = ["ArSegTrainConfig", "train_arseg", "ArSegItems", "load_arseg_cases", "ARSEG_CLASSES"]

#: the demo's targets (label ids 1..3 -> AdaLN ids 0..2)
ARSEG_CLASSES = ("background", "liver", "spleen", "liver_lesion")


@dataclass
class ArSegTrainConfig(TrainConfig):
    model: str = "arseg_light"
    classes: list = field(default_factory=lambda: list(ARSEG_CLASSES))
    stage: int = 1
    #: stage 2: start from this stage-1 checkpoint (its VQ is loaded and frozen)
    init: str | None = None
    #: per class: slices without the target, as a fraction of the slices with it
    empty_fraction: float = 0.1
    #: oversample the items of a class name (e.g. {"liver_lesion": 2})
    class_repeat: dict = field(default_factory=dict)
    grid: str = "resize"
    normalization: dict = field(default_factory=lambda: {"kind": "hu_window", "low": -125.0, "high": 275.0})
    phantom_annotators: int = 4


# ----------------------------------------------------------------------------- data
def load_arseg_cases(cfg: ArSegTrainConfig) -> tuple[list[list[D.Case]], dict[str, np.ndarray]]:
    """Sources as in ``data.load_sources``; phantom sources also keep their lesion annotations
    (name -> (A, z, y, x) bool), which ``phantom_cases`` does not."""
    from ..phantom import make_phantom

    names = list(cfg.classes)
    sources, annotations = [], {}
    for spec in cfg.data:
        kind, opts = D.parse_data_spec(spec)
        if kind != "phantom":
            sources += D.load_sources([spec], cfg.label_map, names, tuple(cfg.phantom_shape),
                                      tuple(cfg.phantom_spacing))
            continue
        lm = D.phantom_label_map(names)
        if "liver_lesion" in names:  # a lesion is also liver (the organ mask includes it)
            lm[6] = names.index("liver_lesion")
        cases = []
        for s in range(opts["seed0"], opts["seed0"] + opts["n"]):
            p = make_phantom(seed=s, shape=tuple(cfg.phantom_shape), spacing=tuple(cfg.phantom_spacing),
                             n_annotators=cfg.phantom_annotators)
            labels = D.apply_label_map(p.labels, lm, len(names))
            name = f"phantom_{s:04d}"
            cases.append(D.Case(name=name, image=p.image, labels=labels, spacing=tuple(p.spacing),
                                source=spec, kind="phantom",
                                meta={"seed": s, "shape": list(cfg.phantom_shape),
                                      "spacing": list(cfg.phantom_spacing)}))
            if p.lesion_annotations is not None:
                annotations[name] = p.lesion_annotations
        sources.append(cases)
    return sources, annotations


def target_masks(case: D.Case, class_names, annotations: dict, cls: int, zs) -> np.ndarray:
    """(A, n, y, x) bool masks of label id ``cls`` on slices ``zs``: all annotators for the
    phantoms' lesion class, else A = 1 (the label map; liver includes its lesions)."""
    name = class_names[cls]
    if name == "liver_lesion" and case.name in annotations:
        return annotations[case.name][:, zs]
    lab = case.labels[zs]
    m = lab == cls
    if name == "liver" and "liver_lesion" in class_names:
        m |= lab == class_names.index("liver_lesion")
    return m[None]


class ArSegItems(torch.utils.data.Dataset):
    """(case, slice, class) items on the model grid. Returns (x (1, S, S) normalised,
    mask (1, M, M) float {0,1} on the mask grid, AdaLN class id = label id - 1).

    A multi-annotator class draws one annotator per item (``all_annotators``: every annotator is
    an item of its own instead, for stage 1)."""

    def __init__(self, cases, split_items, class_names, annotations, grid: SliceGrid, norm: Normalization,
                 mask_size: int, augment: D.Augment | None = None, empty_fraction: float = 0.1,
                 class_repeat: dict | None = None, seed: int = 0, all_annotators: bool = False):
        self.grid, self.norm, self.mask_size, self.augment, self.seed = grid, norm, mask_size, augment, seed
        self.epoch = 0
        rng = np.random.default_rng(seed)
        self.x, self.masks, self.items = [], [], []  # per stored slice; items: (slice_idx, class, annot)
        class_repeat = class_repeat or {}
        pos = 0
        for ci, zs in split_items:
            if not zs:
                continue
            c = cases[ci]
            x, _ = D.to_grid(c.image[zs], c.labels[zs], c.spacing[1:], grid, norm.pad_value_hu)
            self.x.append(x)
            per_class = {}
            for k in range(1, len(class_names)):
                m = target_masks(c, class_names, annotations, k, zs)  # (A, n, y, x)
                a = m.shape[0]
                g = torch.stack([D.to_grid(c.image[zs[:1]], m[j], c.spacing[1:], grid)[1] for j in range(a)], 1)
                per_class[k] = g.to(torch.uint8)  # (n, A, S, S)
                present = g.flatten(2).any(-1)  # (n, A)
                pos_idx = [i for i in range(len(zs)) if bool(present[i].any())]
                neg_idx = [i for i in range(len(zs)) if not bool(present[i].any())]
                n_neg = min(len(neg_idx), int(round(empty_fraction * len(pos_idx))))
                neg_idx = list(rng.choice(neg_idx, n_neg, replace=False)) if n_neg else []
                rep = max(1, int(class_repeat.get(class_names[k], 1)))
                for i in sorted(pos_idx + [int(v) for v in neg_idx]):
                    annots = range(a) if all_annotators else [-1]
                    for j in annots:
                        self.items += [(pos + i, k, j)] * rep
            self.masks.append(per_class)
            pos += len(zs)
        self.x = torch.cat(self.x) if self.x else torch.zeros((0, 1, grid.size, grid.size))
        # masks: class -> (N, A, S, S) (A may differ per class but not per case within a source)
        self._mask_by_class = {}
        for k in range(1, len(class_names)):
            parts = [m[k] for m in self.masks]
            amax = max((p.shape[1] for p in parts), default=1)
            parts = [p if p.shape[1] == amax else p[:, :1].expand(-1, amax, -1, -1) for p in parts]
            self._mask_by_class[k] = torch.cat(parts) if parts else None
        del self.masks

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


# ----------------------------------------------------------------------------- stage modules
class _Stage1(nn.Module):
    """DDP-wrappable stage-1 objective over the VQ only."""

    def __init__(self, vq: nn.Module):
        super().__init__()
        self.vq = vq

    def forward(self, mask):
        return self.vq.loss(mask)


def _load_weights(model: nn.Module, path, family: str, strict: bool = True):
    from ..models.checkpoints import load_checkpoint

    ck = load_checkpoint(path, expect_model=family)
    sd = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in ck.model.state_dict().items()}
    model.load_state_dict(sd, strict=strict)
    return ck


# ----------------------------------------------------------------------------- the loop
def train_arseg(cfg: ArSegTrainConfig | dict, on_step=None) -> dict:
    """Stage 1 or 2 of AR-Seg (``cfg.stage``); returns a summary dict like ``loop.train``."""
    if isinstance(cfg, dict):
        cfg = ArSegTrainConfig.from_dict(cfg)
    stage = int(cfg.stage)
    if stage not in (1, 2):
        raise ValueError("stage must be 1 or 2")
    t_start = time.time()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    device = _resolve_device(cfg.device, Dist())
    dist_ = _init_dist(device)
    precision = _precision(cfg.precision, device)
    torch.manual_seed(cfg.seed + dist_.rank)
    np.random.seed(cfg.seed + dist_.rank)

    class_names = list(cfg.classes)
    if len(class_names) < 2:
        raise ValueError("need a background and at least one target class")
    # AdaLN ids count foreground classes: num_classes = K - 1
    model, entry, mcfg = _build_model(cfg, len(class_names) - 1)
    if entry.family != "arseg":
        raise ValueError(f"{cfg.model} is not an AR-Seg config")
    img_size, mask_size = int(mcfg.img_size), int(mcfg.mask_size)
    norm = Normalization.from_dict(cfg.normalization)
    grid = SliceGrid.create(img_size, cfg.grid, cfg.spacing_mm)
    input_meta = {"normalization": norm.to_dict(), **grid.to_meta()}

    # ---- data (every slice of the training cases; validation = held-out cases)
    sources, annotations = load_arseg_cases(cfg)
    cases, split = D.make_split(sources, cfg.val_fraction, cfg.seed, "none", cfg.holdout_gap, cfg.holdout_size)
    aug = None if cfg.augment.get("off") else D.Augment(**{k_: v for k_, v in cfg.augment.items() if k_ != "off"})
    common = dict(class_names=class_names, annotations=annotations, grid=grid, norm=norm, mask_size=mask_size,
                  empty_fraction=cfg.empty_fraction, class_repeat=cfg.class_repeat, seed=cfg.seed,
                  all_annotators=stage == 1)
    ds = ArSegItems(cases, split.train, augment=aug, **common)
    vds = ArSegItems(cases, split.val, augment=None, **{**common, "class_repeat": {}}) if split.val else None
    if len(ds) == 0:
        raise ValueError("no training items (no slice contains a target class)")
    sampler = None
    if dist_.world > 1:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(ds, num_replicas=dist_.world, rank=dist_.rank, shuffle=True,
                                     seed=cfg.seed, drop_last=True)
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
        drop_last=len(ds) // max(1, dist_.world) >= cfg.batch_size, num_workers=cfg.workers, generator=gen)
    steps_per_epoch = max(1, len(loader))
    budget_s = cfg.time_budget_minutes * 60.0 if cfg.time_budget_minutes else None
    if budget_s:
        total = int(cfg.steps) if cfg.steps else 10**9
    else:
        total = int(cfg.steps) if cfg.steps else int(cfg.epochs or 1) * steps_per_epoch

    # ---- model: stage 2 starts from the stage-1 VQ and freezes it
    init_meta = None
    if stage == 2 and cfg.init and not cfg.resume:
        ck = _load_weights(model, cfg.init, entry.family)
        if list(ck.class_names) != class_names:
            _log(dist_, f"note: init checkpoint classes {ck.class_names} != {class_names}", cfg.quiet)
        init_meta = {"path": str(cfg.init), "provenance": {k: ck.provenance.get(k) for k in (
            "stage", "git_commit", "wall_seconds", "hyperparameters", "data", "validation")}
            if isinstance(getattr(ck, "provenance", None), dict) else None}
    elif stage == 2 and not cfg.init and not cfg.resume:
        _log(dist_, "warning: stage 2 without --init: the VQ is untrained", cfg.quiet)
    params = model.stage_parameters(stage)
    trainable = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    model.to(device).train()
    if stage == 2:
        model.vq.eval()
    opt, sched_kind, _, hp = _make_optimizer(cfg, params, dist_.world)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(sched_kind, total, cfg.warmup_steps))
    use_scaler = device.type == "cuda" and precision == "fp16"
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    step, epoch, history, prior_wall, trained_s0 = 0, 0, [], 0.0, 0.0

    out = Path(cfg.out)
    if out.suffix != ".safetensors":
        out = out.with_suffix(".safetensors")
    if cfg.resume:
        _load_weights(model, cfg.resume, entry.family)
        model.to(device).train()
        if stage == 2:
            model.vq.eval()
        sp = train_state_path(cfg.resume)
        if sp.is_file():
            st = torch.load(sp, map_location="cpu", weights_only=True)
            if int(st.get("stage", stage)) != stage:
                raise ValueError(f"{cfg.resume} is a stage-{st.get('stage')} run, not stage {stage}")
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
            if use_scaler and st.get("scaler"):
                scaler.load_state_dict(st["scaler"])
            step, epoch = int(st["step"]), int(st["epoch"])
            history = list(st.get("history", []))
            prior_wall = float(st.get("wall_seconds", 0.0))
            trained_s0 = float(st.get("trained_seconds", 0.0))
            init_meta = st.get("init_meta_json") and json.loads(st["init_meta_json"])
            if "rng" in st:
                torch.set_rng_state(st["rng"])
        _log(dist_, f"resumed from {cfg.resume} at step {step}", cfg.quiet)

    net = _Stage1(model.vq) if stage == 1 else model
    if dist_.world > 1:
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)

    from ..models import registry

    n_train = sum(p.numel() for p in params)
    _log(dist_, f"arseg stage {stage}: {cfg.model} ({registry.count_parameters(model) / 1e6:.2f} M params, "
         f"{n_train / 1e6:.2f} M trained) on {device} ({precision}), world {dist_.world}; {len(ds)} train items, "
         f"{0 if vds is None else len(vds)} val items; "
         f"{'time budget %.1f min' % cfg.time_budget_minutes if budget_s else '%d steps' % total}, "
         f"batch {cfg.batch_size}", cfg.quiet)

    from ..device import autocast_context

    def step_loss(xb, mb, cb) -> tuple[torch.Tensor, dict]:
        with autocast_context(device, precision):
            if stage == 1:
                parts = net(mb)
                return parts["total"].float(), {k: float(v.detach()) for k, v in parts.items() if k != "total"}
            with torch.no_grad():
                ids = model.vq.encode_tokens(mb)
            return net(xb, ids, cb).float(), {}

    @torch.no_grad()
    def run_val() -> dict | None:
        if not dist_.main or vds is None or len(vds) == 0:
            return None
        was = model.training
        model.eval()
        tot, n, dices, correct, ntok = 0.0, 0, [], 0, 0
        for s in range(0, len(vds), cfg.batch_size):
            b = [vds[i] for i in range(s, min(len(vds), s + cfg.batch_size))]
            xb = torch.stack([t[0] for t in b]).to(device)
            mb = torch.stack([t[1] for t in b]).to(device)
            cb = torch.tensor([t[2] for t in b], device=device)
            if stage == 1:
                o = model.vq(mb)
                p = (o["logits"] > 0).float()
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
        model.train(was)
        if stage == 2:
            model.vq.eval()
        v = {"loss": tot / max(n, 1), "items": n}
        if stage == 1:
            v["recon_dice"] = float(np.mean(dices))
        else:
            v["token_acc"] = correct / max(ntok, 1)
        return v

    def provenance(val, wall) -> dict:
        return {
            "trainer": "napari_genseg.training.arseg",
            "stage": stage,
            "init": init_meta,
            "data": list(cfg.data),
            "data_cases": [{"name": c.name, "source": c.source, **c.meta} for c in cases],
            "split": split.to_dict(cases),
            "recipe": cfg.recipe,
            "loss": "dice+bce+vq" if stage == 1 else "token_ce",
            "schedule": sched_kind,
            "hyperparameters": {**hp, "batch_size": cfg.batch_size, "steps": total if total < 10**9 else None,
                                "time_budget_minutes": cfg.time_budget_minutes, "step": step,
                                "epochs_seen": round(step / steps_per_epoch, 3), "warmup_steps": cfg.warmup_steps,
                                "grad_clip": cfg.grad_clip, "precision": precision, "seed": cfg.seed,
                                "augment": None if aug is None else dataclasses.asdict(aug),
                                "empty_fraction": cfg.empty_fraction, "class_repeat": cfg.class_repeat,
                                "grid": cfg.grid, "img_size": img_size, "mask_size": mask_size,
                                "train_items": len(ds)},
            "config": cfg.to_dict(),
            "git_commit": git_commit(),
            "torch": torch.__version__,
            "device": str(device),
            "world_size": dist_.world,
            "wall_seconds": round(wall, 1),
            "validation": val,
            "history": history[-200:],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }

    t_loop = time.time()
    val_seconds = [0.0]

    def trained_seconds() -> float:
        return trained_s0 + time.time() - t_loop - val_seconds[0]

    def save(val, half=False):
        if not dist_.main:
            return
        from ..models.checkpoints import save_checkpoint

        wall = prior_wall + time.time() - t_start
        save_checkpoint(out, model, entry.family, entry.name, mcfg, class_names, input_meta,
                        provenance(val, wall), half=half)
        state = {"stage": stage, "step": step, "epoch": epoch, "optimizer": opt.state_dict(),
                 "scheduler": sched.state_dict(), "scaler": scaler.state_dict() if use_scaler else {},
                 "history": history, "wall_seconds": wall, "trained_seconds": trained_seconds(),
                 "rng": torch.get_rng_state(), "init_meta_json": json.dumps(init_meta, default=str),
                 "config": json.loads(json.dumps(cfg.to_dict()))}
        tmp = train_state_path(out).with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, train_state_path(out))

    bar = None
    if dist_.main and not cfg.quiet:
        from tqdm import tqdm

        bar = tqdm(total=None if total >= 10**9 else total, initial=step, desc=f"arseg stage {stage}",
                   file=sys.stderr, dynamic_ncols=True, mininterval=5.0)
    deadline = t_start + cfg.max_minutes * 60 if cfg.max_minutes else None
    val_every = cfg.val_every or (10**9 if budget_s else steps_per_epoch)
    save_every = cfg.save_every or val_every
    next_frac = 0.25
    while budget_s and next_frac <= trained_seconds() / budget_s:
        next_frac += 0.25
    running, parts_run, last_val, skipped = None, {}, None, 0
    guard = StepGuard(opt, params, cfg.grad_clip, scaler, use_scaler)
    stop = done = False
    while step < total and not stop and not done:
        if sampler is not None:
            sampler.set_epoch(epoch)
        ds.set_epoch(epoch)
        for xb, mb, cb in loader:
            if step >= total:
                break
            xb, mb, cb = xb.to(device), mb.to(device), cb.to(device)
            loss, parts = step_loss(xb, mb, cb)
            guard.step(loss, step)
            skipped = guard.skipped
            step += 1
            frac, stop = rank0_decision(dist_, trained_seconds() / budget_s if budget_s else 0.0,
                                        deadline is not None and time.time() > deadline)
            if budget_s:
                set_budget_lr(opt, step, cfg.warmup_steps, sched_kind, frac)
                done = frac >= 1.0
            else:
                sched.step()
            lv = float(loss.detach())
            if math.isfinite(lv):
                running = lv if running is None else 0.9 * running + 0.1 * lv
                for k_, v_ in parts.items():
                    parts_run[k_] = v_ if k_ not in parts_run else 0.9 * parts_run[k_] + 0.1 * v_
            if on_step is not None:
                on_step(step, lv)
            if step % 10 == 0 or step == total:
                history.append({"step": step, "loss": None if running is None else round(running, 5),
                                "lr": opt.param_groups[0]["lr"], **{k_: round(v_, 5) for k_, v_ in parts_run.items()},
                                **({"trained_seconds": round(trained_seconds(), 1)} if budget_s else {})})
            if bar is not None:
                bar.update(1)
                post = {"loss": f"{running if running is not None else float('nan'):.4f}",
                        "lr": f"{opt.param_groups[0]['lr']:.2e}", **{k_: f"{v_:.3f}" for k_, v_ in parts_run.items()}}
                bar.set_postfix(post, refresh=False)
            timed = bool(budget_s) and frac >= next_frac and not done
            if timed:
                next_frac += 0.25
            if step % val_every == 0 or step == total or stop or timed:
                t_v = time.time()
                v = run_val()
                val_seconds[0] += time.time() - t_v
                if v is not None:
                    last_val = {**v, "step": step}
                    history.append({"step": step, **{f"val_{k_}": round(b, 5) for k_, b in v.items()}})
                    if bar is not None:
                        bar.write(f"step {step}: loss {running:.4f} val " + ", ".join(
                            f"{k_} {b:.4f}" for k_, b in v.items()))
                if (step % save_every == 0 or timed) and step != total and not stop:
                    save(last_val)
                barrier(dist_)
            if stop or done:
                break
        epoch += 1
    if bar is not None:
        bar.close()
    if last_val is None or last_val.get("step") != step:
        v = run_val()
        if v is not None:
            last_val = {**v, "step": step}
    save(last_val, half=cfg.half)
    wall = prior_wall + time.time() - t_start
    summary = {"checkpoint": str(out), "train_state": str(train_state_path(out)), "stage": stage, "step": step,
               "total_steps": total, "rank": dist_.rank, "world_size": dist_.world, "wall_seconds": wall,
               "final_loss": running, "validation": last_val, "stopped_early": stop,
               "skipped_nonfinite_steps": skipped}
    barrier(dist_, destroy=True)
    _log(dist_, f"done: stage {stage}, {step} steps in {wall:.0f} s -> {out}", cfg.quiet)
    return summary
