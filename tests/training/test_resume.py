"""Resume continues a run exactly: N steps, a crash, resume for M == N + M steps in one go (CPU)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from napari_genseg.models.checkpoints import load_checkpoint
from napari_genseg.training.loop import train, train_state_path


class Crash(Exception):
    pass


def _draws(log: list, crash_at: int | None = None):
    """on_step: record the loss and a draw of every global RNG (torch, numpy, python), so a
    resumed run must have restored all three to repeat them; raise at ``crash_at``."""

    def on_step(step, loss):
        if step == crash_at:
            raise Crash(step)
        log.append((step, loss, float(torch.rand(())), float(np.random.random()), random.random()))

    return on_step


def test_crash_and_resume_equals_one_uninterrupted_run(tiny_cfg, tmp_path):
    # 2 training phantoms x 12 slices, batch 4: 6 steps per epoch; the checkpoint at step 8 is in the
    # middle of the second epoch. Dropout draws from the global RNG, augmentation is on, and the
    # cosine schedule with warm-up runs over the 15 steps.
    cfg = dict(steps=15, warmup_steps=3, grad_clip=1.0, val_every=4, save_every=8,
               model_overrides={"dropout": 0.2})
    whole_log, part_log = [], []
    whole = train(tiny_cfg(**cfg, out=str(tmp_path / "whole.safetensors")), on_step=_draws(whole_log))

    part = tmp_path / "part.safetensors"
    with pytest.raises(Crash):
        train(tiny_cfg(**cfg, out=str(part)), on_step=_draws(part_log, crash_at=10))
    st = torch.load(train_state_path(part), weights_only=True)
    assert (st["step"], st["epoch"], st["batch_in_epoch"]) == (8, 1, 2)
    resumed = train(tiny_cfg(**cfg, out=str(tmp_path / "resumed.safetensors"), resume=str(part)),
                    on_step=_draws(part_log))

    assert resumed["step"] == whole["step"] == 15
    assert part_log[:8] == whole_log[:8]
    assert [r[0] for r in part_log[9:]] == list(range(9, 16))
    assert part_log[9:] == whole_log[8:]  # same losses and the same draws of every RNG after the resume
    a = load_checkpoint(whole["checkpoint"]).model.state_dict()
    b = load_checkpoint(resumed["checkpoint"]).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(train_state_path(whole["checkpoint"]), weights_only=True)
    sb = torch.load(train_state_path(resumed["checkpoint"]), weights_only=True)
    for k, v in sa["optimizer"]["state"].items():
        assert all(torch.equal(v[n], sb["optimizer"]["state"][k][n]) for n in v)
    assert sa["scheduler"]["last_epoch"] == sb["scheduler"]["last_epoch"] == 15
