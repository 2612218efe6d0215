"""The training loop: one loop for every model family, driven by the family's task (``tasks/``).

``train(cfg)`` picks the task of ``cfg.model`` (``tasks.task_for``: segmentation for MSA²Net,
AR-Seg stages 1/2, ...) and does everything else itself:

* device and precision (``device.resolve_precision``: fp32 on CPUs unless bf16 is asked and the
  CPU has native bf16, ``device.cpu_native_bf16``; bf16 without it and fp16 on a CPU run fp32 with
  one warning), autocast through the task, a GradScaler only for fp16 on CUDA;
* DDP under ``torchrun`` (``distributed.Dist``: NCCL on CUDA, gloo on CPU, collectives on the
  training device); every rank takes rank 0's clock decisions; only rank 0 validates, prints and
  saves;
* the data loader over the task's dataset with ``sampler.EpochSampler`` (an epoch's order depends
  only on (seed, epoch), so a resumed run continues inside the epoch where it stopped);
* the optimiser recipe and the step-based schedule (``optim``), or, with ``time_budget_minutes``,
  the lr on the elapsed fraction of a wall-clock budget (validation time excluded) with a
  validation at each quarter of it;
* checkpoints ``NAME.safetensors`` + ``NAME.json`` (``models.checkpoints.save_checkpoint`` with the
  task's class names and input metadata and the run's provenance) and ``NAME.train.pt``
  (``resume``: optimiser, scheduler, scaler, position, history, every rank's RNG states);
* ``resume``: continues a run exactly: with fixed seeds and a step schedule, N steps + resume for
  M gives the same weights as N + M steps in one go.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from .config import TrainConfig, TrainOptionError, train_state_path
from .data import DataSpecError
from .distributed import Dist, training_device
from .optim import StepGuard, lr_lambda, make_optimizer, set_budget_lr
from .provenance import git_commit, run_provenance, scalar_metrics
from .resume import capture_rng, read_state, restore_rng, write_state
from .sampler import EpochSampler

__all__ = ["TrainConfig", "train", "train_state_path", "git_commit"]

#: "no step limit" (a time budget without ``steps``)
_UNLIMITED = 10**9


@dataclass
class _Progress:
    """Where the run is; saved in (and read back from) the train-state file."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches of ``epoch`` already done (by this rank)
    history: list = field(default_factory=list)
    best: dict | None = None  # {"step", "score"}
    wall_before: float = 0.0  # wall seconds of earlier runs
    trained_before: float = 0.0  # budget seconds of earlier runs (validation excluded)
    skipped: int = 0
    running: float | None = None  # EMA of the loss (log only)
    parts: dict = field(default_factory=dict)  # EMAs of the task's named loss parts

    def to_state(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch, "history": self.history,
                "best": self.best, "skipped": self.skipped, "running": self.running, "parts_running": self.parts}

    @classmethod
    def from_state(cls, st: dict) -> "_Progress":
        history = list(st.get("history", []))
        trained = st.get("trained_seconds")
        if trained is None:  # files written before trained_seconds was a state entry
            trained = next((h["trained_seconds"] for h in reversed(history) if "trained_seconds" in h), 0.0)
        return cls(step=int(st["step"]), epoch=int(st["epoch"]), batch=int(st.get("batch_in_epoch", 0)),
                   history=history, best=st.get("best"), wall_before=float(st.get("wall_seconds", 0.0)),
                   trained_before=float(trained), skipped=int(st.get("skipped", 0)), running=st.get("running"),
                   parts=dict(st.get("parts_running", {})))

    def track(self, loss: float, parts: dict[str, float]) -> None:
        if not math.isfinite(loss):
            return
        self.running = loss if self.running is None else 0.9 * self.running + 0.1 * loss
        for k, v in parts.items():
            self.parts[k] = v if k not in self.parts else 0.9 * self.parts[k] + 0.1 * v


def _task_config(cfg: TrainConfig | dict):
    from .tasks import config_from_dict, task_for

    if isinstance(cfg, dict):
        cfg = config_from_dict(cfg)
    task_cls = task_for(cfg.model)
    if type(cfg) is not task_cls.config_cls:
        raise TrainOptionError(f"{cfg.model} is trained with {task_cls.config_cls.__name__} options, "
                         f"not {type(cfg).__name__}")
    return cfg, task_cls


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _fp32_state(model: nn.Module) -> dict:
    return {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).clone()
            for k, v in model.state_dict().items()}


def train(cfg: TrainConfig | dict, on_step: Callable[[int, float], None] | None = None) -> dict:
    """Run a training of ``cfg.model`` with its family's task; returns a summary dict (on every
    rank; paths are only written by rank 0).

    ``on_step(step, loss)`` is called after every optimiser step. Raises ``ValueError`` for bad
    options or data (unknown model, option, data spec; no training items; a resume of another
    stage) and ``FloatingPointError`` after 20 non-finite steps in a row.
    """
    from ..device import resolve_precision
    from ..models import registry
    from ..models.checkpoints import load_checkpoint, save_checkpoint
    from .tasks import RunContext

    cfg, task_cls = _task_config(cfg)
    t_start = time.time()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    device = training_device(cfg.device)
    dist_ = Dist.from_env(device)
    precision = resolve_precision(cfg.precision, device)
    _seed(cfg.seed + dist_.rank)
    run = RunContext(device, precision, dist_, cfg.quiet)
    task = task_cls(cfg, run)
    spec = task.build_model()
    model, family = spec.model, spec.entry.family

    # ---- data
    data = task.data()
    ds = data.train
    sampler = EpochSampler(len(ds), dist_.world, dist_.rank, cfg.seed)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=cfg.batch_size, sampler=sampler, drop_last=sampler.per_rank >= cfg.batch_size,
        num_workers=cfg.workers, generator=torch.Generator().manual_seed(cfg.seed))
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise DataSpecError(f"{len(ds)} training items are fewer than the {dist_.world} ranks")
    budget_s = cfg.time_budget_minutes * 60.0 if cfg.time_budget_minutes else None
    if budget_s:
        total = int(cfg.steps) if cfg.steps else _UNLIMITED
    else:
        total = int(cfg.steps) if cfg.steps else int(cfg.epochs or 1) * steps_per_epoch
    val_every = cfg.val_every or (_UNLIMITED if budget_s else steps_per_epoch)
    save_every = cfg.save_every or val_every

    # ---- model / optimiser
    state = read_state(train_state_path(cfg.resume)) if cfg.resume else None
    task.prepare(model, resuming=bool(cfg.resume))
    params = task.trainable_parameters(model)
    trainable = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    opt, sched_kind, hp = make_optimizer(cfg, params, dist_.world)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(sched_kind, total, cfg.warmup_steps))
    use_scaler = device.type == "cuda" and precision == "fp16"
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    prog, rng = _Progress(), None
    if cfg.resume:
        weights = load_checkpoint(cfg.resume, expect_model=family).model.state_dict()
        if state and "model" in state:  # the checkpoint was written in fp16: its fp32 weights
            weights = state["model"]
        model.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in weights.items()})
        if state is not None:
            task.load_state_dict(state)
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            if use_scaler and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            prog = _Progress.from_state(state)
            rng = state.get("rng")
            if isinstance(rng, list):
                rng = rng[dist_.rank] if len(rng) == dist_.world else None
                if rng is None:
                    run.log(f"note: {cfg.resume} was written by {len(state['rng'])} ranks, not "
                            f"{dist_.world}: random states start fresh")
        run.log(f"resumed from {cfg.resume} at step {prog.step}")
    model.to(device)
    task.train_mode(model)
    net = task.objective(model)
    if dist_.world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    n_train = sum(p.numel() for p in params)
    run.log(f"train {task.title}: {cfg.model} ({registry.count_parameters(model) / 1e6:.2f} M params, "
            f"{n_train / 1e6:.2f} M trained) on {device} ({precision}), world {dist_.world}; {data.description}; "
            f"{'time budget %.1f min' % cfg.time_budget_minutes if budget_s else '%d steps' % total}, "
            f"batch {cfg.batch_size}")

    out = Path(cfg.out)
    if out.suffix != ".safetensors":
        out = out.with_suffix(".safetensors")
    guard = StepGuard(opt, params, cfg.grad_clip, scaler, use_scaler, skipped=prog.skipped)
    t_loop = time.time()
    val_seconds = 0.0  # validation time does not count against the training budget

    def trained_seconds() -> float:
        return prog.trained_before + time.time() - t_loop - val_seconds

    def save(val: dict | None, half: bool = False) -> None:
        rngs = dist_.gather_objects(capture_rng(device))  # every rank takes part
        if not dist_.main:
            return
        wall = prog.wall_before + time.time() - t_start
        prov = run_provenance(task, cfg, data, schedule=sched_kind, hp=hp, precision=precision,
                              img_size=int(spec.config.img_size), step=prog.step, total=total,
                              steps_per_epoch=steps_per_epoch, skipped=guard.skipped, device=device,
                              world=dist_.world, wall=wall, validation=val, history=prog.history)
        save_checkpoint(out, model, family, spec.entry.name, spec.config, task.class_names, task.input_meta(),
                        prov, half=half, postprocess=task.postprocess_block())
        st = {**task.state_dict(), **prog.to_state(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
              "scaler": scaler.state_dict() if use_scaler else {}, "wall_seconds": wall,
              "trained_seconds": trained_seconds(), "rng": rngs, "config": json.loads(json.dumps(cfg.to_dict()))}
        if half:  # the checkpoint holds fp16 weights: keep fp32 ones for an exact resume
            st["model"] = _fp32_state(model)
        write_state(train_state_path(out), st)

    def validate() -> dict | None:
        nonlocal val_seconds
        if not dist_.main:
            return None
        t_v = time.time()
        v = task.validate(model)
        val_seconds += time.time() - t_v
        return None if v is None else {**v, "step": prog.step}

    bar = None
    if dist_.main and not cfg.quiet:
        from tqdm import tqdm

        bar = tqdm(total=None if total >= _UNLIMITED else total, initial=prog.step, desc=f"train {task.title}",
                   file=sys.stderr, dynamic_ncols=True, mininterval=2.0)
    deadline = t_start + cfg.max_minutes * 60 if cfg.max_minutes else None
    next_val_frac = 0.25
    while budget_s and next_val_frac <= trained_seconds() / budget_s:
        next_val_frac += 0.25
    last_val, stop, budget_done = None, False, False
    if rng is not None:
        restore_rng(rng, device)
    while prog.step < total and not stop and not budget_done:
        sampler.set_epoch(prog.epoch, start=prog.batch * cfg.batch_size)
        ds.set_epoch(prog.epoch)
        for batch in loader:
            batch = tuple(t.to(device, non_blocking=True) for t in batch)
            loss, parts = task.loss(net, batch)
            guard.step(loss, prog.step)
            prog.step += 1
            prog.batch += 1
            if prog.batch >= steps_per_epoch:
                prog.epoch, prog.batch = prog.epoch + 1, 0
            frac, stop = dist_.rank0_decision(trained_seconds() / budget_s if budget_s else 0.0,
                                              deadline is not None and time.time() > deadline)
            if budget_s:
                set_budget_lr(opt, prog.step, cfg.warmup_steps, sched_kind, frac)
                budget_done = frac >= 1.0
            else:
                sched.step()
            lv = float(loss.detach())
            prog.track(lv, parts)
            if on_step is not None:
                on_step(prog.step, lv)
            lr = opt.param_groups[0]["lr"]
            if prog.step % 10 == 0 or prog.step == total:
                prog.history.append({"step": prog.step, "loss": None if prog.running is None else round(prog.running, 5),
                                     "lr": lr, "skipped": guard.skipped,
                                     **{k: round(v, 5) for k, v in prog.parts.items()},
                                     **({"trained_seconds": round(trained_seconds(), 1)} if budget_s else {})})
            if bar is not None:
                bar.update(1)
                post = {"loss": f"{prog.running if prog.running is not None else float('nan'):.4f}", "lr": f"{lr:.2e}",
                        **{k: f"{v:.3f}" for k, v in prog.parts.items()}}
                if guard.skipped:
                    post["skipped"] = guard.skipped
                if last_val is not None:
                    post["val"] = f"{last_val['score']:.3f}"
                bar.set_postfix(post, refresh=False)
            timed_val = bool(budget_s) and frac >= next_val_frac and not budget_done
            if timed_val:
                next_val_frac += 0.25
            if prog.step % val_every == 0 or prog.step == total or stop or timed_val:
                v = validate()
                if v is not None:
                    last_val = v
                    prog.history.append({"step": prog.step, **{f"val_{k}": b for k, b in
                                                               scalar_metrics(v, 5).items() if k != "step"}})
                    if prog.best is None or v["score"] > prog.best["score"]:
                        prog.best = {"step": prog.step, "score": v["score"]}
                    if bar is not None:
                        bar.write(f"step {prog.step}: loss {post['loss']} val " + json.dumps(
                            {k: b for k, b in scalar_metrics(v, 4).items() if k != "step"}))
                if (prog.step % save_every == 0 or timed_val) and prog.step != total and not stop:
                    save(last_val)
                dist_.barrier()
            if prog.step >= total or stop or budget_done:
                break
    if bar is not None:
        bar.close()
    if last_val is None or last_val["step"] != prog.step:
        last_val = validate() or last_val
    save(last_val, half=cfg.half)
    wall = prog.wall_before + time.time() - t_start
    summary = {"checkpoint": str(out), "train_state": str(train_state_path(out)), "task": task.title,
               "step": prog.step, "total_steps": total, "rank": dist_.rank, "world_size": dist_.world,
               "wall_seconds": wall, "final_loss": prog.running,
               "validation": None if last_val is None else scalar_metrics(last_val),
               "best": prog.best, "stopped_early": stop, "skipped_nonfinite_steps": guard.skipped}
    dist_.close()
    run.log(f"done: {prog.step} steps in {wall:.0f} s -> {out}")
    return summary
