"""A new family trains through the one loop by adding a task (here: a tiny image autoencoder, the
shape of MARSeg's stage 0), and the registry routes each model to its family's task."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from napari_genseg.models.checkpoints import load_checkpoint
from napari_genseg.preprocessing import Normalization, SliceGrid
from napari_genseg.training import data as D
from napari_genseg.training import tasks
from napari_genseg.training.loop import train, train_state_path
from napari_genseg.training.tasks.base import Task, TaskData, build_registered_model
from _tinynet import PHANTOM_SHAPE, PHANTOM_SPACING


@dataclass
class TinyAEConfig:
    num_classes: int = 1
    img_size: int = 32
    width: int = 8


class TinyAE(nn.Module):
    def __init__(self, cfg: TinyAEConfig):
        super().__init__()
        w = cfg.width
        self.enc = nn.Sequential(nn.Conv2d(1, w, 3, 2, 1), nn.ReLU(), nn.Conv2d(w, w, 3, 2, 1))
        self.dec = nn.Sequential(nn.ConvTranspose2d(w, w, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(w, 1, 4, 2, 1))

    def forward(self, x):
        return self.dec(self.enc(x))


class ReconstructionTask(Task):
    """Test task: reconstruct the normalised slice (MSE), log the L1 part, score = -val MSE."""

    title = "reconstruction"

    def build_model(self):
        self.spec = build_registered_model(self.cfg, 1)
        self.norm = Normalization.from_dict(self.cfg.normalization)
        self.grid = SliceGrid.create(int(self.spec.config.img_size), "resize")
        self.batches = 0
        return self.spec

    def input_meta(self):
        return {"normalization": self.norm.to_dict(), **self.grid.to_meta()}

    def data(self):
        srcs = D.load_sources(self.cfg.data, None, self.class_names, PHANTOM_SHAPE, PHANTOM_SPACING)
        cases, split = D.make_split(srcs, self.cfg.val_fraction, self.cfg.seed)
        self.val = D.SliceDataset(cases, split.val, self.grid, self.norm)
        return TaskData(cases, split, D.SliceDataset(cases, split.train, self.grid, self.norm), "slices")

    def loss(self, net, batch):
        x, _ = batch
        with self.run.autocast():
            rec = net(x).float()
        self.batches += 1
        return F.mse_loss(rec, x), {"l1": float(F.l1_loss(rec, x).detach())}

    @torch.no_grad()
    def validate(self, model):
        x = torch.stack([self.val[i][0] for i in range(len(self.val))])
        mse = float(F.mse_loss(model(x), x))
        return {"score": -mse, "mse": mse}

    def provenance(self):
        return {"loss": "mse", "hyperparameters": {"reconstructs": "normalised slice"}}

    def state_dict(self):
        return {"batches_seen": self.batches}

    def load_state_dict(self, state):
        self.batches = int(state["batches_seen"])


@pytest.fixture
def tinyae(monkeypatch):
    """A test family registered for this test only (it has no predictor: left registered, it would
    break the every-family-has-a-predictor check of a later test)."""
    from napari_genseg.models import registry

    if "tinyae" not in {f.name for f in registry.list_families()}:
        registry.register_family("tinyae", TinyAEConfig, TinyAE, "tinyae_small", kind="reconstruction",
                                 description="test autoencoder")
        registry.register_config("tinyae", "tinyae_small", TinyAEConfig())
    monkeypatch.setitem(tasks.TASKS, "reconstruction", ReconstructionTask)
    yield
    registry._CONFIGS.pop("tinyae_small", None)
    registry._FAMILIES.pop("tinyae", None)


def test_a_new_family_trains_through_the_loop_by_adding_a_task(tinyae, tiny_cfg, tmp_path):
    cfg = tiny_cfg(model="tinyae_small", classes=["background"], steps=12, val_every=4, lr=1e-2)
    s = train(cfg)
    ck = load_checkpoint(s["checkpoint"])
    assert ck.family == "tinyae" and ck.input["grid"] == "resize"
    prov = ck.provenance
    assert prov["trainer"] == __name__ and prov["loss"] == "mse"
    assert prov["hyperparameters"]["reconstructs"] == "normalised slice"
    assert prov["hyperparameters"]["step"] == 12 and prov["validation"]["step"] == 12
    val = [h for h in prov["history"] if "val_score" in h]
    assert [h["step"] for h in val] == [4, 8, 12] and val[-1]["val_mse"] < val[0]["val_mse"]
    assert [h["step"] for h in prov["history"] if "l1" in h] == [10, 12]  # named loss parts in the log
    best = max(val, key=lambda h: h["val_score"])
    assert s["best"] == {"step": best["step"], "score": pytest.approx(best["val_score"], abs=1e-5)}
    st = torch.load(train_state_path(s["checkpoint"]), weights_only=True)
    assert st["batches_seen"] == 12
    r = train(dict(cfg, steps=14, resume=s["checkpoint"], out=str(tmp_path / "more.safetensors")))
    assert r["step"] == 14
    assert torch.load(train_state_path(r["checkpoint"]), weights_only=True)["batches_seen"] == 14


def test_models_route_to_their_family_task():
    from napari_genseg.training.tasks.arseg import ArSegTask, ArSegTrainConfig
    from napari_genseg.training.tasks.segmentation import SegmentationTask

    assert tasks.task_for("msa2net_tiny") is SegmentationTask
    assert tasks.task_for("arseg_tiny") is ArSegTask
    assert isinstance(tasks.config_from_dict({"model": "arseg_tiny", "stage": 2}), ArSegTrainConfig)
    with pytest.raises(ValueError, match="stage: not an option for msa2net_tiny; it is for AR-Seg"):
        tasks.config_from_dict({"model": "msa2net_tiny", "stage": 2})
    with pytest.raises(ValueError, match="unknown training option"):
        tasks.config_from_dict({"model": "msa2net_tiny", "stages": 2})
    with pytest.raises(ValueError, match="unknown model"):
        tasks.task_for("no_such_model")
    with pytest.raises(ValueError, match="already registered"):
        tasks.register_task("arseg", ArSegTask)


def test_validation_scores_an_organ_free_case_by_false_positives():
    """A negative case (no liver in the reference): empty prediction = Dice 1, any false-positive
    voxel = Dice 0. The TransUNet rule of ``evaluate_labels`` would score these 0 and 1."""
    import numpy as np
    import torch

    from napari_genseg.preprocessing import Normalization, SliceGrid
    from napari_genseg.training.data import Case
    from napari_genseg.training.tasks.segmentation import validate_slices
    from napari_genseg.volume import Volume

    class Const(torch.nn.Module):  # logits favouring one class everywhere
        def __init__(self, k):
            super().__init__()
            self.k = k

        def forward(self, x):
            out = torch.zeros(x.shape[0], 3, *x.shape[2:])
            out[:, self.k] = 1.0
            return out

    vol = Volume(np.zeros((2, 16, 16), np.int16), (3.0, 2.0, 2.0))
    case = Case(name="neg", volume=vol, labels=np.zeros((2, 16, 16), np.uint8), source="t", kind="phantom")
    case2 = Case(name="neg2", volume=vol, labels=np.zeros((2, 16, 16), np.uint8), source="t", kind="phantom")
    args = ([case, case2], [(0, [0, 1]), (1, [1])], ["background", "liver", "spleen"],
            Normalization.from_dict({"kind": "hu_window", "low": -125.0, "high": 275.0}),
            SliceGrid(16, "resize"), torch.device("cpu"))
    empty = validate_slices(Const(0), *args)
    assert empty["mean_dice"] == {"liver": 1.0, "spleen": 1.0}
    fp = validate_slices(Const(1), *args)
    assert fp["mean_dice"]["liver"] == 0.0 and fp["mean_dice"]["spleen"] == 1.0
