"""AR-Seg training (stage 1 mask VQ, stage 2 segmentor) through the one training loop: behaviour, not shapes."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch

from napari_genseg.training.loop import train
from napari_genseg.training.tasks.arseg import ArSegItems, ArSegTrainConfig

CLASSES = ["background", "liver", "spleen", "liver_lesion"]
LIVER = ["background", "liver"]
PHANTOM = dict(phantom_shape=[12, 64, 64], phantom_spacing=[3.0, 3.5, 3.5])


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # (tests/conftest.py)


def _cfg(out, **kw):
    d = dict(model="arseg_tiny", data=["phantom:3"], classes=CLASSES, **PHANTOM, batch_size=4, lr=2e-3,
             device="cpu", seed=0, quiet=True, val_fraction=0.34, steps=6, threads=1, out=str(out))
    d.update(kw)
    return d


@pytest.fixture
def arseg_cfg(tmp_path):
    def make(**kw):
        return _cfg(tmp_path / "s1.safetensors", **kw)

    return make


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """Stage 1 on the liver masks of 2 training phantoms (1 held out): 40 steps."""
    losses = []
    out = tmp_path_factory.mktemp("arseg") / "s1.safetensors"
    s = train(_cfg(out, classes=LIVER, stage=1, steps=40, lr=1e-2, val_every=20, augment={"off": True}),
              on_step=lambda i, l: losses.append(l))
    return s, losses


def test_stage1_learns_to_reconstruct_the_masks(stage1):
    s1, losses = stage1
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    # the held-out case's liver masks come back through the VQ (an untrained VQ returns nothing)
    assert s1["validation"]["recon_dice"] > 0.5 and s1["best"]["step"] == 40


def test_stage2_learns_on_the_frozen_vq_and_predicts_through_the_engine(stage1, tmp_path):
    from napari_genseg.predictors import make_predictor
    from napari_genseg.models.checkpoints import load_checkpoint
    from napari_genseg.phantom import make_phantom

    s1, _ = stage1
    l2 = []
    s2 = train(_cfg(tmp_path / "s2.safetensors", classes=LIVER, stage=2, init=s1["checkpoint"], steps=60, lr=3e-3,
                    val_every=20, augment={"off": True}, half=True), on_step=lambda i, l: l2.append(l))
    # token cross-entropy over the 64-word vocabulary starts at ~log 64 and falls
    assert abs(np.mean(l2[:3]) - math.log(64)) < 0.3 and np.mean(l2[-5:]) < 0.6 * np.mean(l2[:5])
    ck1, ck2 = load_checkpoint(s1["checkpoint"]), load_checkpoint(s2["checkpoint"])
    val = [h for h in ck2.provenance["history"] if "val_token_acc" in h]
    assert [h["step"] for h in val] == [20, 40, 60] and val[-1]["val_loss"] < val[0]["val_loss"]
    assert val[-1]["val_token_acc"] > 0.15  # teacher-forced, on the held-out case; chance is 1/64
    # the VQ did not move: the fp32 weights kept for resuming equal stage 1's bit for bit
    kept = torch.load(tmp_path / "s2.train.pt", weights_only=True)["model"]
    for k, v in ck1.model.vq.state_dict().items():
        assert torch.equal(kept[f"vq.{k}"], v), k
        assert torch.equal(ck2.model.vq.state_dict()[k], v.half().float()), k  # the fp16 file
    assert ck2.class_names == LIVER and ck2.config.num_classes == 1
    prov = ck2.provenance
    assert (prov["stage"], prov["init"]["path"], prov["loss"]) == (2, s1["checkpoint"], "token_ce")
    assert prov["trainer"] == "napari_genseg.training.tasks.arseg"
    # the fp16 checkpoint segments an unseen phantom's liver through the engine
    p = make_phantom(seed=7, shape=(12, 64, 64), spacing=(3.0, 3.5, 3.5))
    ref = np.isin(p.labels[3:9], (1, 6))  # liver incl. its lesions
    pred = make_predictor(ck2, device="cpu", n_samples=8, target_class=1)
    pred.set_image(p.image[3:9], p.spacing[1:])
    out = pred.predict()
    m = out["labels"] == 1
    assert 2 * (m & ref).sum() / (m.sum() + ref.sum()) > 0.4
    votes = out["votes"] / 8
    assert votes[ref].mean() > 5 * votes[~ref].mean()


def test_stage2_resume_is_exact_and_checks_the_stage(stage1, tmp_path):
    s1, _ = stage1
    kw = dict(classes=LIVER, stage=2, init=s1["checkpoint"], schedule="constant", half=True)
    whole = train(_cfg(tmp_path / "whole.safetensors", steps=10, **kw))
    part = tmp_path / "part.safetensors"
    train(_cfg(part, steps=6, **kw))
    st = torch.load(tmp_path / "part.train.pt", weights_only=True)
    assert (st["stage"], st["step"]) == (2, 6)
    resumed = train(_cfg(part, steps=10, resume=str(part), **kw))
    assert resumed["step"] == whole["step"] == 10
    a = torch.load(tmp_path / "whole.train.pt", weights_only=True)
    b = torch.load(tmp_path / "part.train.pt", weights_only=True)
    assert [h["step"] for h in b["history"] if "loss" in h] == [6, 10]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # fp32, through an fp16 file
    with pytest.raises(ValueError, match="stage-2"):
        train(_cfg(tmp_path / "x.safetensors", classes=LIVER, stage=1, steps=12, resume=str(part)))


def test_lesion_items_draw_one_annotator(arseg_cfg):
    from napari_genseg.preprocessing import Normalization, SliceGrid
    from napari_genseg.training import data as D

    cfg = ArSegTrainConfig.from_dict(arseg_cfg(stage=2, phantom_shape=[16, 64, 64]))
    (cases,) = D.load_sources(cfg.data, None, CLASSES, tuple(cfg.phantom_shape), tuple(cfg.phantom_spacing),
                              phantom_annotators=cfg.phantom_annotators)
    assert all(c.annotations["liver_lesion"].shape[0] == 4 for c in cases)
    items = [(i, list(range(c.n_slices))) for i, c in enumerate(cases)]
    ds = ArSegItems(cases, items, CLASSES, SliceGrid(64, "resize"), Normalization(), mask_size=32,
                    augment=None, empty_fraction=0.0)
    lesion = [i for i, (_, k, _) in enumerate(ds.items) if k == 3]
    assert lesion and all(ds.items[i][2] == -1 for i in lesion)
    x, m, c = ds[lesion[0]]
    assert x.shape == (1, 64, 64) and m.shape == (1, 32, 32) and c == 2
    # over epochs the same item shows different annotators' masks (they disagree on the phantoms)
    seen = set()
    for e in range(12):
        ds.set_epoch(e)
        seen.add(ds[lesion[len(lesion) // 2]][1].numpy().tobytes())
    assert len(seen) > 1
    ds1 = ArSegItems(cases, items, CLASSES, SliceGrid(64, "resize"), Normalization(), mask_size=32,
                     empty_fraction=0.0, all_annotators=True)
    assert sum(k == 3 for _, k, _ in ds1.items) == 4 * len(lesion)


def test_cli_routes_arseg_stages():
    from napari_genseg.training.cli import add_training_commands, config_from_args

    ap = argparse.ArgumentParser()
    add_training_commands(ap.add_subparsers())
    args = ap.parse_args(["train", "--model", "arseg_tiny", "--stage", "2", "--init", "s1.safetensors",
                          "--class-repeat", "liver_lesion=2"])
    cfg = config_from_args(args)
    assert isinstance(cfg, ArSegTrainConfig)
    assert (cfg.stage, cfg.init, cfg.class_repeat) == (2, "s1.safetensors", {"liver_lesion": 2})
    with pytest.raises(ValueError, match="AR-Seg"):
        config_from_args(ap.parse_args(["train", "--model", "msa2net_tiny", "--stage", "1"]))
