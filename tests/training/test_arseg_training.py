"""AR-Seg training (stage 1 mask VQ, stage 2 segmentor) through the shared trainer pieces."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch

from napari_genseg.training.arseg import ArSegItems, ArSegTrainConfig, load_arseg_cases, train_arseg

CLASSES = ["background", "liver", "spleen", "liver_lesion"]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: several times faster than the default on a shared, loaded CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def arseg_cfg(tmp_path):
    def make(**kw):
        d = dict(model="arseg_tiny", data=["phantom:3"], classes=CLASSES, phantom_shape=[12, 64, 64],
                 phantom_spacing=[3.0, 3.5, 3.5], batch_size=4, lr=2e-3, device="cpu", seed=0, quiet=True,
                 val_fraction=0.34, steps=6, out=str(tmp_path / "s1.safetensors"))
        d.update(kw)
        return d

    return make


@pytest.fixture
def stage1(arseg_cfg):
    losses = []
    s = train_arseg(arseg_cfg(stage=1, steps=30, lr=3e-3), on_step=lambda i, l: losses.append(l))
    return s, losses


def test_stage1_loss_decreases_and_stage2_runs_through_predictor(stage1, arseg_cfg, tmp_path):
    from napari_genseg.predictors import make_predictor
    from napari_genseg.models.checkpoints import load_checkpoint
    from napari_genseg.phantom import make_phantom

    s1, losses = stage1
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert s1["validation"] is not None and 0.0 <= s1["validation"]["recon_dice"] <= 1.0

    l2 = []
    s2 = train_arseg(arseg_cfg(stage=2, init=s1["checkpoint"], steps=8, out=str(tmp_path / "s2.safetensors"),
                               half=True), on_step=lambda i, l: l2.append(l))
    assert len(l2) == 8 and all(math.isfinite(v) for v in l2)
    assert l2[0] < math.log(64) + 1.0  # CE over the tiny vocabulary (64) starts near log V

    ck1 = load_checkpoint(s1["checkpoint"])
    ck2 = load_checkpoint(s2["checkpoint"])
    assert ck2.class_names == CLASSES and ck2.config.num_classes == 3
    assert ck2.provenance["stage"] == 2 and ck2.provenance["init"]["path"] == s1["checkpoint"]
    assert ck2.provenance["trainer"] == "napari_genseg.training.arseg"
    # the VQ is frozen in stage 2 (fp16 file: compare at fp16 precision)
    for k, v in ck1.model.vq.state_dict().items():
        torch.testing.assert_close(ck2.model.vq.state_dict()[k].float(), v.half().float())
    assert ck2.input["normalization"]["kind"] == "hu_window"

    p = make_phantom(seed=7, shape=(12, 64, 64), spacing=(3.0, 3.5, 3.5))
    z = min(int(np.argmax(p.lesion_annotations.any(0).sum((1, 2)))), p.image.shape[0] - 2)
    pred = make_predictor(ck2, device="cpu", n_samples=4, target_class=3)
    pred.set_image(p.image[z:z + 2], p.spacing[1:])
    out = pred.predict()
    assert out["labels"].shape == (2, 64, 64) and set(np.unique(out["labels"])) <= {0, 3}
    assert out["votes"].max() <= 4 and out["tokens"].shape == (2, 4, 204)


def test_resume_continues_steps_and_checks_stage(stage1, arseg_cfg, tmp_path):
    s1, _ = stage1
    out = str(tmp_path / "s2.safetensors")
    a = train_arseg(arseg_cfg(stage=2, init=s1["checkpoint"], steps=10, max_minutes=None, out=out,
                              save_every=4, val_every=4))
    assert a["step"] == 10
    st = torch.load(tmp_path / "s2.train.pt", weights_only=True)
    assert st["stage"] == 2 and st["step"] == 10
    b = train_arseg(arseg_cfg(stage=2, steps=14, resume=out, out=out))
    assert b["step"] == 14 and math.isfinite(b["final_loss"])
    st = torch.load(tmp_path / "s2.train.pt", weights_only=True)
    assert st["step"] == 14 and [h["step"] for h in st["history"] if "loss" in h][:1] == [10]
    with pytest.raises(ValueError, match="stage-2"):
        train_arseg(arseg_cfg(stage=1, steps=16, resume=out, out=str(tmp_path / "x.safetensors")))


def test_lesion_items_draw_one_annotator(arseg_cfg):
    from napari_genseg.preprocessing import Normalization, SliceGrid

    cfg = ArSegTrainConfig.from_dict(arseg_cfg(stage=2, phantom_shape=[16, 64, 64]))
    sources, ann = load_arseg_cases(cfg)
    cases = sources[0]
    assert set(ann) == {c.name for c in cases} and ann[cases[0].name].shape[0] == 4
    items = [(i, list(range(c.n_slices))) for i, c in enumerate(cases)]
    ds = ArSegItems(cases, items, CLASSES, ann, SliceGrid(64, "resize"), Normalization(), mask_size=32,
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
    ds1 = ArSegItems(cases, items, CLASSES, ann, SliceGrid(64, "resize"), Normalization(), mask_size=32,
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
