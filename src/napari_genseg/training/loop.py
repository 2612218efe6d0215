"""The training loop.

Recipes:

* ``paper``: the MSA²Net recipe: SGD (momentum 0.9, weight decay 1e-4), base lr 0.05 × batch/24,
  poly decay (power 0.9) per step, Boundary DoU loss.
* ``adamw``: AdamW (weight decay 1e-2 by default) + Dice/CE, linear warm-up then cosine (or poly)
  decay; converges much faster in short CPU budgets.

Mixed precision: fp16 autocast + GradScaler on CUDA (``precision="auto"``; bf16 autocast when
asked), optional bf16 autocast on CPU (``precision="bf16"``), fp32 otherwise.

Checkpoints: ``out`` (``NAME.safetensors`` + ``NAME.json`` via ``save_checkpoint``, with full
provenance) and ``NAME.train.pt`` beside it (optimizer, scheduler, scaler, step, history: tensors and
plain types only, read back with ``torch.load(weights_only=True)``). ``resume`` continues the step
count of a previous run.

DDP: under ``torchrun`` (``WORLD_SIZE > 1``) the process group is initialised from the environment
(nccl on CUDA, gloo otherwise), slices are sharded with a ``DistributedSampler``, and only rank 0
validates, prints and saves.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from ..preprocessing import Normalization, SliceGrid
from . import data as D
from .losses import make_loss

__all__ = ["TrainConfig", "train", "train_state_path", "git_commit", "validate"]


@dataclass
class TrainConfig:
    model: str = "msa2net_demo"
    data: list = field(default_factory=lambda: ["phantom:8"])
    label_map: str | None = None
    classes: list = field(default_factory=lambda: list(D.DEFAULT_CLASSES))
    recipe: str = "adamw"  # "paper" | "adamw"
    loss: str | None = None  # default by recipe: paper -> bdou, adamw -> dice_ce
    schedule: str | None = None  # adamw: "cosine" | "poly"; paper: poly
    epochs: int | None = None
    steps: int | None = None  # total optimizer steps (wins over epochs)
    batch_size: int = 8
    lr: float | None = None  # default by recipe
    weight_decay: float | None = None
    warmup_steps: int = 0
    #: clip the gradient norm (None = no clipping); non-finite steps are always skipped
    grad_clip: float | None = None
    val_fraction: float = 0.2
    holdout_slices: str | None = "auto"  # single-case sources: "a:b" | "auto" | "none"
    holdout_gap: int = 2
    holdout_size: int = 8
    repeat: dict = field(default_factory=dict)  # data spec -> oversampling factor of its train slices
    grid: str = "spacing"  # "spacing" | "resize"
    spacing_mm: float | None = None  # in-plane target spacing (grid "spacing"); default 384 mm / img_size
    img_size: int | None = None  # default: the model config's
    normalization: dict = field(default_factory=lambda: {"kind": "hu_window", "low": -125.0, "high": 275.0})
    augment: dict = field(default_factory=dict)  # Augment fields; {"off": true} disables
    phantom_shape: list = field(default_factory=lambda: [40, 160, 160])
    phantom_spacing: list = field(default_factory=lambda: [3.0, 2.2, 2.2])
    out: str = "checkpoints/model.safetensors"
    resume: str | None = None
    device: str = "auto"
    precision: str = "auto"  # auto | fp32 | fp16 | bf16
    seed: int = 0
    workers: int = 0
    val_every: int = 0  # steps; 0 = once per epoch (and at the end)
    save_every: int = 0  # steps; 0 = at every validation
    half: bool = False  # save fp16 weights (final checkpoint)
    threads: int | None = None
    max_minutes: float | None = None  # stop early (cleanly, saving) after this wall time
    #: train for this many minutes of wall time: the lr schedule runs on the elapsed-time fraction
    #: (robust to a shared, variably loaded machine); ``steps`` (if set) is then only a cap
    time_budget_minutes: float | None = None
    quiet: bool = False
    model_overrides: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k.replace("-", "_"): v for k, v in d.items()}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(sorted(unknown))}")
        if isinstance(d.get("data"), str):
            d["data"] = [d["data"]]
        if isinstance(d.get("classes"), str):
            d["classes"] = [c for c in d["classes"].replace(",", " ").split() if c]
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def train_state_path(ckpt: str | os.PathLike) -> Path:
    p = Path(ckpt)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".train.pt")


def git_commit() -> str | None:
    """``git rev-parse HEAD`` of the package's repository (read-only), or None."""
    try:
        root = Path(__file__).resolve().parents[3]
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if r.returncode == 0:
            return r.stdout.strip()
    except Exception:
        pass
    return None


# ----------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_dist(device: torch.device) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return Dist(dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")))


def _resolve_device(name: str, d: Dist) -> torch.device:
    from ..device import resolve_device

    dev = resolve_device(name)
    if dev.type == "mps" and name == "auto":
        dev = torch.device("cpu")  # mps training works but is not tested here
    if dev.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    return dev


def _precision(p: str, device: torch.device) -> str:
    """The inference rule (``device.resolve_precision``): fp32 on CPUs unless bf16 is asked."""
    from ..device import resolve_precision

    return resolve_precision(p, device)


# ----------------------------------------------------------------------------- schedules
def _decay(kind: str, t: float, power: float = 0.9) -> float:
    """lr factor at training fraction t in [0, 1]."""
    t = min(max(t, 0.0), 1.0)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if kind == "poly":
        return (1.0 - t) ** power
    if kind == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {kind!r}")


def _lr_lambda(kind: str, total: int, warmup: int, power: float = 0.9) -> Callable[[int], float]:
    total = max(1, total)
    _decay(kind, 0.0)  # validates the name

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return _decay(kind, (step - warmup) / max(1, total - warmup), power)

    return f


# ----------------------------------------------------------------------------- step helpers (shared with training.arseg)
class StepGuard:
    """Backward + clip + optimizer step, skipping steps whose gradients are not finite (fp32/bf16;
    the fp16 GradScaler skips by itself); raises after ``limit`` bad steps in a row."""

    def __init__(self, opt, params, grad_clip: float | None, scaler, use_scaler: bool, limit: int = 20):
        self.opt, self.params, self.grad_clip = opt, list(params), grad_clip
        self.scaler, self.use_scaler, self.limit = scaler, use_scaler, limit
        self.bad = self.skipped = 0

    def step(self, loss: torch.Tensor, step: int) -> None:
        opt = self.opt
        opt.zero_grad(set_to_none=True)
        if self.use_scaler:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(opt)
        else:
            loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip or float("inf"))
        if self.use_scaler:
            self.scaler.step(opt)  # skips non-finite steps itself and lowers the scale
            self.scaler.update()
        elif torch.isfinite(gnorm):
            opt.step()
            self.bad = 0
        else:
            self.bad += 1
            self.skipped += 1
            opt.zero_grad(set_to_none=True)
            if self.bad > self.limit:
                raise FloatingPointError(f"non-finite gradients for {self.bad} steps in a row at step {step}; "
                                         "lower --lr, set grad_clip or use --precision fp32")


def rank0_decision(dist_: Dist, frac: float, stop: bool) -> tuple[float, bool]:
    """Rank 0's view of the clock wins (every rank must take the same decisions)."""
    if dist_.world <= 1:
        return frac, stop
    import torch.distributed as dist

    t = torch.tensor([frac, float(stop)], dtype=torch.float64)
    dist.broadcast(t, src=0)
    return float(t[0]), bool(t[1] > 0.5)


def set_budget_lr(opt, step: int, warmup_steps: int, kind: str, frac: float) -> None:
    """Time-budgeted schedule: lr follows the elapsed fraction of the budget (after warm-up)."""
    warm = step / warmup_steps if warmup_steps and step < warmup_steps else 1.0
    for gr in opt.param_groups:
        gr["lr"] = gr["initial_lr"] * warm * _decay(kind, frac)


def barrier(dist_: Dist, destroy: bool = False) -> None:
    if dist_.world > 1:
        import torch.distributed as dist

        dist.barrier()
        if destroy:
            dist.destroy_process_group()


def _make_optimizer(cfg: TrainConfig, params, world: int):
    bs = cfg.batch_size * world
    if cfg.recipe == "paper":
        lr = cfg.lr if cfg.lr is not None else 0.05 * bs / 24
        wd = 1e-4 if cfg.weight_decay is None else cfg.weight_decay
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)
        sched = cfg.schedule or "poly"
        loss = cfg.loss or "bdou"
    elif cfg.recipe == "adamw":
        lr = cfg.lr if cfg.lr is not None else 1e-3
        wd = 1e-2 if cfg.weight_decay is None else cfg.weight_decay
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
        sched = cfg.schedule or "cosine"
        loss = cfg.loss or "dice_ce"
    else:
        raise ValueError(f"unknown recipe {cfg.recipe!r} (paper, adamw)")
    return opt, sched, loss, {"lr": lr, "weight_decay": wd, "effective_batch": bs}


# ----------------------------------------------------------------------------- validation
@torch.no_grad()
def validate(model: nn.Module, cases: list[D.Case], items, class_names, norm: Normalization, grid: SliceGrid,
             device: torch.device, batch_size: int = 8, in_chans: int = 1) -> dict:
    """Dice/IoU/HD95 per class on the held-out slices of each case, through the inference path
    (``SegmentationPredictor``: same normalisation, grid, and logits back on the original pixels)."""
    from ..predictors import SegmentationPredictor
    from ..metrics import evaluate_labels

    was_training = model.training
    pred = SegmentationPredictor(model, class_names, norm, grid, device=device, precision="fp32",
                                 in_chans=in_chans)
    classes = {i: n for i, n in enumerate(class_names) if i}
    per_case = {}
    for ci, zs in items:
        c = cases[ci]
        labs = []
        for s in range(0, len(zs), batch_size):
            pred.set_image(c.image[zs[s:s + batch_size]], c.spacing[1:])
            labs.append(pred.predict()["labels"])
        p = np.concatenate(labs)
        per_case[c.name] = evaluate_labels(p, c.labels[zs], c.spacing, classes)
    model.train(was_training)
    mean = {}
    for n in classes.values():
        vals = [m[n]["dice"] for m in per_case.values()]
        mean[n] = float(np.mean(vals)) if vals else float("nan")
    fg = [v for v in mean.values() if not math.isnan(v)]
    return {"per_case": per_case, "mean_dice": mean, "dice": float(np.mean(fg)) if fg else float("nan")}


# ----------------------------------------------------------------------------- the loop
def _build_model(cfg: TrainConfig, num_classes: int):
    from ..models import registry

    entry = registry.get_entry(cfg.model)
    overrides = dict(cfg.model_overrides)
    overrides["num_classes"] = num_classes
    if cfg.img_size:
        overrides["img_size"] = int(cfg.img_size)
    config = dataclasses.replace(entry.config, **overrides)
    model = registry.get_family(entry.family).build(config)
    return model, entry, config


def _log(d: Dist, msg: str, quiet: bool = False):
    if d.main and not quiet:
        print(msg, file=sys.stderr, flush=True)


def train(cfg: TrainConfig | dict, on_step: Callable[[int, float], None] | None = None) -> dict:
    """Run a training; returns a summary dict (on every rank; paths only meaningful on rank 0)."""
    if isinstance(cfg, dict):
        cfg = TrainConfig.from_dict(cfg)
    t_start = time.time()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    d0 = Dist()
    device = _resolve_device(cfg.device, d0)
    dist_ = _init_dist(device)
    precision = _precision(cfg.precision, device)
    torch.manual_seed(cfg.seed + dist_.rank)
    np.random.seed(cfg.seed + dist_.rank)

    class_names = list(cfg.classes)
    k = len(class_names)
    model, entry, mcfg = _build_model(cfg, k)
    img_size = int(mcfg.img_size)
    in_chans = int(getattr(mcfg, "in_chans", 1))
    norm = Normalization.from_dict(cfg.normalization)
    grid = SliceGrid.create(img_size, cfg.grid, cfg.spacing_mm)
    input_meta = {"normalization": norm.to_dict(), **grid.to_meta()}

    # ---- data
    sources = D.load_sources(cfg.data, cfg.label_map, class_names, tuple(cfg.phantom_shape),
                             tuple(cfg.phantom_spacing))
    cases, split = D.make_split(sources, cfg.val_fraction, cfg.seed, cfg.holdout_slices, cfg.holdout_gap,
                                cfg.holdout_size)
    repeats = {}
    for ci, c in enumerate(cases):
        r = cfg.repeat.get(c.source)
        if r is None and c.kind in cfg.repeat:
            r = cfg.repeat[c.kind]
        if r:
            repeats[ci] = int(r)
    aug = None if cfg.augment.get("off") else D.Augment(**{k_: v for k_, v in cfg.augment.items() if k_ != "off"})
    ds = D.SliceDataset(cases, split.train, grid, norm, aug, repeats, seed=cfg.seed)
    if len(ds) == 0:
        raise ValueError("no training slices")
    sampler = None
    if dist_.world > 1:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(ds, num_replicas=dist_.world, rank=dist_.rank, shuffle=True,
                                     seed=cfg.seed, drop_last=True)
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler, drop_last=len(ds) // max(1, dist_.world) >= cfg.batch_size,
        num_workers=cfg.workers, generator=gen, persistent_workers=False,
    )
    steps_per_epoch = max(1, len(loader))
    budget_s = cfg.time_budget_minutes * 60.0 if cfg.time_budget_minutes else None
    if budget_s:
        total = int(cfg.steps) if cfg.steps else 10**9
    else:
        total = int(cfg.steps) if cfg.steps else int(cfg.epochs or 1) * steps_per_epoch
    val_every = cfg.val_every or (10**9 if budget_s else steps_per_epoch)
    save_every = cfg.save_every or val_every

    # ---- model / optimiser
    model.to(device).train()
    opt, sched_kind, loss_name, hp = _make_optimizer(cfg, model.parameters(), dist_.world)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(sched_kind, total, cfg.warmup_steps))
    criterion = make_loss(loss_name).to(device)
    use_scaler = device.type == "cuda" and precision == "fp16"
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    step, epoch, history, best = 0, 0, [], None
    prior_wall = 0.0

    out = Path(cfg.out)
    if out.suffix != ".safetensors":
        out = out.with_suffix(".safetensors")

    if cfg.resume:
        from ..models.checkpoints import load_checkpoint

        ck = load_checkpoint(cfg.resume, expect_model=entry.family)
        model.load_state_dict({k_: v.to(torch.float32) if v.is_floating_point() else v
                               for k_, v in ck.model.state_dict().items()})
        model.to(device).train()
        sp = train_state_path(cfg.resume)
        if sp.is_file():
            st = torch.load(sp, map_location="cpu", weights_only=True)
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
            if use_scaler and st.get("scaler"):
                scaler.load_state_dict(st["scaler"])
            step, epoch = int(st["step"]), int(st["epoch"])
            history = list(st.get("history", []))
            best = st.get("best")
            prior_wall = float(st.get("wall_seconds", 0.0))
            if "rng" in st:
                torch.set_rng_state(st["rng"])
        _log(dist_, f"resumed from {cfg.resume} at step {step}", cfg.quiet)

    net = model
    if dist_.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    from ..models import registry

    n_params = registry.count_parameters(model)
    _log(dist_, f"train: {cfg.model} ({n_params / 1e6:.2f} M params) on {device} ({precision}), world {dist_.world}; "
         f"{len(ds)} train items ({sum(len(z) for _, z in split.train)} slices), "
         f"{sum(len(z) for _, z in split.val)} val slices; {total} steps, batch {cfg.batch_size}", cfg.quiet)

    def provenance(val: dict | None, wall: float) -> dict:
        return {
            "trainer": "napari_genseg.training",
            "data": list(cfg.data),
            "data_cases": [{"name": c.name, "source": c.source, **{k_: v for k_, v in c.meta.items()}} for c in cases],
            "label_map": cfg.label_map,
            "split": split.to_dict(cases),
            "recipe": cfg.recipe,
            "loss": loss_name,
            "schedule": sched_kind,
            "hyperparameters": {**hp, "batch_size": cfg.batch_size, "steps": total if total < 10**9 else None,
                                "time_budget_minutes": cfg.time_budget_minutes, "step": step,
                                "epochs_seen": round(step / steps_per_epoch, 3), "warmup_steps": cfg.warmup_steps,
                                "grad_clip": cfg.grad_clip, "skipped_nonfinite_steps": skipped,
                                "precision": precision, "seed": cfg.seed, "augment": None if aug is None else dataclasses.asdict(aug),
                                "repeat": cfg.repeat, "grid": cfg.grid, "img_size": img_size},
            "config": cfg.to_dict(),
            "git_commit": git_commit(),
            "torch": torch.__version__,
            "device": str(device),
            "world_size": dist_.world,
            "wall_seconds": round(wall, 1),
            "validation": None if val is None else {"mean_dice": val["mean_dice"], "dice": val["dice"],
                                                    "per_case": val["per_case"], "step": step},
            "history": history[-200:],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }

    def save(val: dict | None, half: bool = False):
        if not dist_.main:
            return
        from ..models.checkpoints import save_checkpoint

        wall = prior_wall + time.time() - t_start
        save_checkpoint(out, model, entry.family, entry.name, mcfg, class_names, input_meta,
                        provenance(val, wall), half=half)
        state = {
            "step": step, "epoch": epoch, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict() if use_scaler else {}, "history": history, "best": best,
            "wall_seconds": wall, "rng": torch.get_rng_state(), "config": json.loads(json.dumps(cfg.to_dict())),
        }
        tmp = train_state_path(out).with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, train_state_path(out))

    def run_val():
        if not dist_.main or not split.val:
            return None
        return validate(model, cases, split.val, class_names, norm, grid, device, cfg.batch_size, in_chans)

    bar = None
    if dist_.main and not cfg.quiet:
        from tqdm import tqdm

        bar = tqdm(total=None if total >= 10**9 else total, initial=step, desc="train", file=sys.stderr, dynamic_ncols=True, mininterval=2.0)
    from ..device import autocast_context

    last_val = None
    last_val_step = -1
    skipped = 0
    guard = StepGuard(opt, model.parameters(), cfg.grad_clip, scaler, use_scaler)
    running = None
    stop_early = False
    deadline = t_start + cfg.max_minutes * 60 if cfg.max_minutes else None
    t_loop = time.time()
    trained_s0 = 0.0
    for h in reversed(history):
        if "trained_seconds" in h:
            trained_s0 = float(h["trained_seconds"])
            break
    budget_done = False
    val_seconds = [0.0]  # validation time does not count against the training budget

    def progress() -> float:
        return (trained_s0 + time.time() - t_loop - val_seconds[0]) / budget_s

    next_val_frac = 0.25
    if budget_s:
        while next_val_frac <= progress():
            next_val_frac += 0.25

    while step < total and not stop_early and not budget_done:
        if sampler is not None:
            sampler.set_epoch(epoch)
        ds.set_epoch(epoch)
        for xb, yb in loader:
            if step >= total:
                break
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            if in_chans != 1:
                xb = xb.expand(-1, in_chans, -1, -1)
            with autocast_context(device, precision):
                logits = net(xb)
            loss = criterion(logits.float(), yb)
            guard.step(loss, step)
            skipped = guard.skipped
            step += 1
            frac, stop_early = rank0_decision(dist_, progress() if budget_s else 0.0,
                                              deadline is not None and time.time() > deadline)
            if budget_s:
                set_budget_lr(opt, step, cfg.warmup_steps, sched_kind, frac)
                if frac >= 1.0:
                    budget_done = True
            else:
                sched.step()
            lv = float(loss.detach())
            if math.isfinite(lv):
                running = lv if running is None else 0.9 * running + 0.1 * lv
            if on_step is not None:
                on_step(step, lv)
            if step % 10 == 0 or step == total:
                history.append({"step": step, "loss": None if running is None else round(running, 5),
                                "lr": opt.param_groups[0]["lr"], "skipped": skipped})
                if budget_s:
                    history[-1]["trained_seconds"] = round(frac * budget_s, 1)
            if bar is not None:
                bar.update(1)
                post = {"loss": f"{running if running is not None else float('nan'):.4f}",
                        "lr": f"{opt.param_groups[0]['lr']:.2e}"}
                if skipped:
                    post["skipped"] = skipped
                if last_val is not None:
                    post["val_dice"] = f"{last_val['dice']:.3f}"
                bar.set_postfix(post, refresh=False)
            timed_val = False
            if budget_s and frac >= next_val_frac and not budget_done:
                timed_val = True
                next_val_frac += 0.25
            if step % val_every == 0 or step == total or stop_early or timed_val:
                t_v = time.time()
                v = run_val()
                val_seconds[0] += time.time() - t_v
                if v is not None:
                    last_val, last_val_step = v, step
                    history.append({"step": step, "val_dice": round(v["dice"], 4),
                                    "val_mean_dice": {a: round(b, 4) for a, b in v["mean_dice"].items()}})
                    if best is None or v["dice"] > best["dice"]:
                        best = {"step": step, "dice": v["dice"]}
                    if bar is not None:
                        bar.write(f"step {step}: loss {running if running is not None else float('nan'):.4f} val Dice "
                                  + ", ".join(f"{a} {b:.3f}" for a, b in v["mean_dice"].items()))
                if (step % save_every == 0 or timed_val) and step != total and not stop_early:
                    save(last_val)
                barrier(dist_)
            if stop_early or budget_done:
                break
        epoch += 1
    if bar is not None:
        bar.close()
    if last_val_step != step:
        last_val = run_val() or last_val
    save(last_val, half=cfg.half)
    wall = prior_wall + time.time() - t_start
    summary = {"checkpoint": str(out), "train_state": str(train_state_path(out)), "step": step, "total_steps": total,
               "rank": dist_.rank, "world_size": dist_.world, "wall_seconds": wall,
               "final_loss": running, "validation": None if last_val is None else last_val["mean_dice"],
               "stopped_early": stop_early, "skipped_nonfinite_steps": skipped}
    barrier(dist_, destroy=True)
    _log(dist_, f"done: {step} steps in {wall:.0f} s -> {out}", cfg.quiet)
    return summary
