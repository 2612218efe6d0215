"""Optimiser recipes, learning-rate schedules and the guarded optimiser step.

Recipes (``make_optimizer``):

* ``paper``: the MSA²Net recipe (Kolahi et al. 2024, official ``train.py``): SGD (momentum 0.9,
  weight decay 1e-4), base lr 0.05 × effective batch / 24, poly decay (power 0.9) per step.
* ``adamw``: AdamW (weight decay 1e-2 by default, lr 1e-3), linear warm-up then cosine (or poly /
  constant) decay; converges much faster in short CPU budgets.

Schedules run either on the step count (``lr_lambda`` for ``LambdaLR``: exact and resumable) or,
with a wall-clock budget, on the elapsed fraction of that budget (``set_budget_lr``).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .config import TrainOptionError

__all__ = ["make_optimizer", "decay", "lr_lambda", "set_budget_lr", "StepGuard"]


def make_optimizer(cfg, params, world: int) -> tuple[torch.optim.Optimizer, str, dict]:
    """-> (optimizer over ``params``, schedule name, hyper-parameters for the provenance).

    ``cfg`` is a ``TrainConfig`` (recipe, lr, weight_decay, schedule, batch_size); the effective
    batch is ``batch_size × world``. Raises ``TrainOptionError`` (an InputError) for an unknown recipe.
    """
    bs = cfg.batch_size * world
    if cfg.recipe == "paper":
        lr = cfg.lr if cfg.lr is not None else 0.05 * bs / 24
        wd = 1e-4 if cfg.weight_decay is None else cfg.weight_decay
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)
        sched = cfg.schedule or "poly"
    elif cfg.recipe == "adamw":
        lr = cfg.lr if cfg.lr is not None else 1e-3
        wd = 1e-2 if cfg.weight_decay is None else cfg.weight_decay
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
        sched = cfg.schedule or "cosine"
    else:
        raise TrainOptionError(f"unknown recipe {cfg.recipe!r} (paper, adamw)")
    decay(sched, 0.0)  # validates the name before any work
    return opt, sched, {"lr": lr, "weight_decay": wd, "effective_batch": bs}


def decay(kind: str, t: float, power: float = 0.9) -> float:
    """lr factor at training fraction ``t`` in [0, 1] (clamped): cosine, poly or constant."""
    t = min(max(t, 0.0), 1.0)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if kind == "poly":
        return (1.0 - t) ** power
    if kind == "constant":
        return 1.0
    raise TrainOptionError(f"unknown schedule {kind!r} (cosine, poly, constant)")


def lr_lambda(kind: str, total: int, warmup: int, power: float = 0.9) -> Callable[[int], float]:
    """Step -> lr factor: linear warm-up over ``warmup`` steps, then ``decay`` over the rest."""
    total = max(1, total)
    decay(kind, 0.0)

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return decay(kind, (step - warmup) / max(1, total - warmup), power)

    return f


def set_budget_lr(opt: torch.optim.Optimizer, step: int, warmup_steps: int, kind: str, frac: float) -> None:
    """Time-budgeted schedule: lr follows the elapsed fraction ``frac`` of the budget (after warm-up)."""
    warm = step / warmup_steps if warmup_steps and step < warmup_steps else 1.0
    for gr in opt.param_groups:
        gr["lr"] = gr["initial_lr"] * warm * decay(kind, frac)


class StepGuard:
    """Backward + clip + optimizer step, skipping steps whose gradients are not finite (fp32/bf16;
    the fp16 GradScaler skips by itself); raises ``FloatingPointError`` after ``limit`` bad steps
    in a row."""

    def __init__(self, opt, params, grad_clip: float | None, scaler, use_scaler: bool, limit: int = 20,
                 skipped: int = 0):
        self.opt, self.params, self.grad_clip = opt, list(params), grad_clip
        self.scaler, self.use_scaler, self.limit = scaler, use_scaler, limit
        self.bad, self.skipped = 0, skipped

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
