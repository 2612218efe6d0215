"""Where a checkpoint came from: the ``provenance`` entry of its JSON (data, split, recipe,
hyper-parameters, config, code version, machine, validation, loss history)."""

from __future__ import annotations

import dataclasses
import subprocess
import time
from pathlib import Path

import torch

__all__ = ["git_commit", "run_provenance", "scalar_metrics"]


def git_commit() -> str | None:
    """``git rev-parse HEAD`` of the package's repository (read-only), or None."""
    try:
        root = Path(__file__).resolve().parents[3]
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if r.returncode == 0:
            return r.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def scalar_metrics(metrics: dict, digits: int | None = None) -> dict:
    """The numbers and {name: number} mappings of a metrics dict (what history and summaries keep;
    per-case tables are left out), optionally rounded."""
    def num(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def r(v):
        return round(v, digits) if digits is not None and isinstance(v, float) else v

    out = {}
    for k, v in metrics.items():
        if num(v):
            out[k] = r(v)
        elif isinstance(v, dict) and v and all(num(x) for x in v.values()):
            out[k] = {a: r(b) for a, b in v.items()}
    return out


def run_provenance(task, cfg, data, *, schedule: str, hp: dict, precision: str, img_size: int, step: int,
                   total: int, steps_per_epoch: int, skipped: int, device: torch.device, world: int,
                   wall: float, validation: dict | None, history: list) -> dict:
    """The checkpoint provenance of a run of ``task`` (``tasks.base.Task``) after ``step`` steps.

    ``total >= 10**9`` means "no step limit" (time budget) and is recorded as None.
    """
    from .data import Augment

    extra = dict(task.provenance())
    task_hp = extra.pop("hyperparameters", {})
    aug = Augment.from_options(cfg.augment)
    return {
        "trainer": type(task).__module__,
        "data": list(cfg.data),
        "data_cases": [{"name": c.name, "source": c.source, **c.meta} for c in data.cases],
        "label_map": cfg.label_map,
        "split": data.split.to_dict(data.cases),
        "recipe": cfg.recipe,
        "schedule": schedule,
        **extra,
        "hyperparameters": {
            **hp, "batch_size": cfg.batch_size, "steps": total if total < 10**9 else None,
            "time_budget_minutes": cfg.time_budget_minutes, "step": step,
            "epochs_seen": round(step / steps_per_epoch, 3), "warmup_steps": cfg.warmup_steps,
            "grad_clip": cfg.grad_clip, "skipped_nonfinite_steps": skipped, "precision": precision,
            "seed": cfg.seed, "augment": None if aug is None else dataclasses.asdict(aug), "grid": cfg.grid,
            "img_size": img_size, "train_items": len(data.train), **task_hp,
        },
        "config": cfg.to_dict(),
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "device": str(device),
        "world_size": world,
        "wall_seconds": round(wall, 1),
        "validation": validation,
        "history": history[-200:],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
