"""AR-Seg with a CT-trained image encoder (``arseg_ct``): stage 0 pre-trains the encoder as a
segmentation network, stage 2 loads it frozen; a single real CT holds out a slice block."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_genseg.training.config import TrainOptionError
from napari_genseg.training.loop import train

ORGANS = ["background", "liver", "spleen"]
PHANTOM = dict(phantom_shape=[12, 64, 64], phantom_spacing=[3.0, 3.5, 3.5])
HEAD = {"seg_head_dim": 8, "train_image_encoder": False}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # (tests/conftest.py)


def _cfg(out, **kw):
    d = dict(model="arseg_tiny", data=["phantom:3"], classes=ORGANS, **PHANTOM, batch_size=4, lr=1e-2,
             device="cpu", seed=0, quiet=True, val_fraction=0.34, steps=6, threads=1, out=str(out),
             model_overrides=dict(HEAD), augment={"off": True})
    d.update(kw)
    return d


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Stage 0 (30 steps) and stage 1 (8 steps) of the tiny config with an encoder head."""
    d = tmp_path_factory.mktemp("arseg_ct")
    losses = []
    s0 = train(_cfg(d / "s0.safetensors", stage=0, steps=30, val_every=30), on_step=lambda i, l: losses.append(l))
    s1 = train(_cfg(d / "s1.safetensors", stage=1, steps=8))
    return s0, s1, losses


def test_stage0_trains_the_encoder_as_a_segmentation_network(stages):
    from napari_genseg.models.checkpoints import load_checkpoint

    s0, _, losses = stages
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    # validated as a segmenter on the held-out phantom (per-organ Dice through the inference path)
    assert set(s0["validation"]["mean_dice"]) == {"liver", "spleen"}
    assert s0["validation"]["mean_dice"]["liver"] > 0.3
    ck = load_checkpoint(s0["checkpoint"])
    assert ck.provenance["loss"].startswith("dice_ce") and ck.provenance["stage"] == 0
    # only the encoder and its head are trainable in stage 0
    names = {id(p) for p in ck.model.stage_parameters(0)}
    for k, p in ck.model.named_parameters():
        assert (id(p) in names) == k.startswith(("image_encoder.", "encoder_head.")), k
    assert ck.model.encoder_logits(torch.rand(2, 1, 64, 64)).shape == (2, 3, 64, 64)


def test_stage2_loads_the_stage0_encoder_frozen_and_the_stage1_vq(stages, tmp_path):
    from napari_genseg.models.checkpoints import load_checkpoint

    s0, s1, _ = stages
    s2 = train(_cfg(tmp_path / "s2.safetensors", stage=2, steps=6, init=s1["checkpoint"],
                    encoder_init=s0["checkpoint"]))
    m0, m1, m2 = (load_checkpoint(s["checkpoint"]).model for s in (s0, s1, s2))
    sd2 = m2.state_dict()
    enc = [k for k in m0.state_dict() if k.startswith(("image_encoder.", "encoder_head."))]
    assert enc and all(torch.equal(m0.state_dict()[k], sd2[k]) for k in enc)
    assert all(torch.equal(v, sd2[k]) for k, v in m1.state_dict().items() if k.startswith("vq."))
    # the segmentor did train
    assert any(not torch.equal(v, sd2[k]) for k, v in m1.state_dict().items() if k.startswith("segmentor."))
    assert load_checkpoint(s2["checkpoint"]).provenance["encoder_init"]["path"] == str(s0["checkpoint"])


def test_stage2_refuses_an_encoder_of_another_shape(stages, tmp_path):
    from napari_genseg.models.checkpoints import CheckpointError

    s0, _, _ = stages
    with pytest.raises(CheckpointError, match="image encoder does not fit"):
        train(_cfg(tmp_path / "s2.safetensors", stage=2, steps=2, encoder_init=s0["checkpoint"],
                   model_overrides={**HEAD, "seg_head_dim": 16}))


def test_stage2_warm_starts_the_segmentor_of_another_mask_latent(stages, tmp_path):
    """``segmentor_init`` copies the adapter + transformer of a segmentor trained on other scales:
    ``pos_embed`` only in its conditioning + start rows, the output head only when the mask VQ is
    the same one (its rows score that VQ's codes); the counts are recorded in provenance."""
    from napari_genseg.models.checkpoints import load_checkpoint

    s0, s1, _ = stages
    src = train(_cfg(tmp_path / "src.safetensors", stage=2, steps=2, init=s1["checkpoint"],
                     encoder_init=s0["checkpoint"]))
    other = {**HEAD, "patch_nums": [1, 2, 4, 8]}  # 85 tokens instead of 204
    s1b = train(_cfg(tmp_path / "s1b.safetensors", stage=1, steps=1, model_overrides=other))
    s2 = train(_cfg(tmp_path / "s2.safetensors", stage=2, steps=1, lr=1e-9, init=s1b["checkpoint"],
                    encoder_init=s0["checkpoint"], segmentor_init=src["checkpoint"], model_overrides=other))
    a, built = (load_checkpoint(s["checkpoint"]).model.state_dict() for s in (src, s1b))
    ck = load_checkpoint(s2["checkpoint"])
    b, n = ck.model.state_dict(), ck.model.segmentor.num_cond + 1

    def same(x, y):
        return torch.allclose(x.float(), y.float(), atol=1e-3)

    moved = [k for k in a if k.startswith("segmentor.") and k not in ("segmentor.pos_embed", "segmentor.head.weight")]
    assert moved and all(same(a[k], b[k]) for k in moved)
    assert not same(a["segmentor.blocks.0.attn.qkv.weight"], built["segmentor.blocks.0.attn.qkv.weight"])
    assert b["segmentor.pos_embed"].shape[1] == n + 84 and a["segmentor.pos_embed"].shape[1] == n + 203
    assert same(b["segmentor.pos_embed"][:, :n], a["segmentor.pos_embed"][:, :n])
    assert same(b["segmentor.pos_embed"][:, n:], built["segmentor.pos_embed"][:, n:])
    assert same(b["segmentor.head.weight"], built["segmentor.head.weight"])  # another VQ: not copied
    meta = ck.provenance["segmentor_init"]
    assert meta["path"] == str(src["checkpoint"]) and meta["partial"] == ["segmentor.pos_embed"]
    assert meta["kept_initialisation"] == ["segmentor.head.weight"] and meta["copied"] == len(moved)
    # the same VQ: the head is copied too
    s2b = train(_cfg(tmp_path / "s2b.safetensors", stage=2, steps=1, lr=1e-9, init=s1["checkpoint"],
                     encoder_init=s0["checkpoint"], segmentor_init=src["checkpoint"]))
    c = load_checkpoint(s2b["checkpoint"]).model.state_dict()
    assert same(c["segmentor.head.weight"], a["segmentor.head.weight"])
    assert same(c["segmentor.pos_embed"], a["segmentor.pos_embed"])


def test_stage0_needs_a_config_with_a_head(tmp_path):
    with pytest.raises(TrainOptionError, match="no encoder head"):
        train(_cfg(tmp_path / "x.safetensors", stage=0, model_overrides={}))


def test_a_single_case_source_holds_out_a_slice_block(tmp_path):
    """A single CT (here one phantom) keeps the MSA²Net demo's slice-block hold-out: the validation
    block and its gaps are never training items (the old task trained on every slice)."""
    from napari_genseg.models.checkpoints import load_checkpoint

    s = train(_cfg(tmp_path / "s1.safetensors", data=["phantom:1"], stage=1, steps=2, holdout_slices="auto",
                   holdout_gap=1, holdout_size=3, model_overrides={}))
    strat = load_checkpoint(s["checkpoint"]).provenance["split"]["strategy"]
    assert [st["kind"] for st in strat] == ["slice-block"] and strat[0]["val"]


def test_stage1_continues_the_vq_of_an_init_checkpoint_with_other_classes(stages, tmp_path):
    """Stage 1 with ``init`` starts from that checkpoint's VQ only (here one with another class
    count and no encoder head), and refuses a VQ of another shape."""
    from napari_genseg.models.checkpoints import CheckpointError, load_checkpoint

    _, s1, _ = stages
    other = train(_cfg(tmp_path / "other.safetensors", classes=["background", "liver"], stage=1, steps=2,
                       model_overrides={}))
    losses = []
    s = train(_cfg(tmp_path / "again.safetensors", stage=1, steps=1, lr=1e-9, init=other["checkpoint"]),
              on_step=lambda i, l: losses.append(l))
    ref = load_checkpoint(other["checkpoint"]).model.vq.state_dict()
    got = load_checkpoint(s["checkpoint"]).model.vq.state_dict()
    assert all(torch.allclose(ref[k].float(), got[k].float(), atol=1e-6) for k in ref)
    assert load_checkpoint(s["checkpoint"]).provenance["init"]["vq_only"] is True
    with pytest.raises(CheckpointError, match="mask VQ does not fit"):
        train(_cfg(tmp_path / "bad.safetensors", stage=1, steps=1, init=other["checkpoint"],
                   model_overrides={**HEAD, "vocab_size": 32}))


def test_negative_cases_give_empty_items():
    """A pelvis phantom (no liver, no spleen) gives empty-mask items at ``empty_fraction`` of its
    slices per class (before, a case without the target gave none: negatives taught nothing)."""
    from napari_genseg.preprocessing import Normalization, SliceGrid
    from napari_genseg.training import data as D
    from napari_genseg.training.tasks.arseg import ArSegItems

    cases = D.load_sources(["phantom:1@200/pelvis"], None, ORGANS, (10, 48, 48), (3.0, 4.0, 4.0))[0]
    assert not np.isin(cases[0].labels, [1, 2]).any()
    ds = ArSegItems(cases, [(0, list(range(10)))], ORGANS, SliceGrid(32), Normalization(), 32, empty_fraction=0.3)
    assert sorted(k for _, k, _ in ds.items) == [1, 1, 1, 2, 2, 2]
    assert all(float(ds[i][1].sum()) == 0 for i in range(len(ds)))


def test_cli_takes_stage0_and_encoder_init():
    import argparse

    from napari_genseg.training.cli import add_training_commands, config_from_args

    ap = argparse.ArgumentParser()
    add_training_commands(ap.add_subparsers())
    cfg = config_from_args(ap.parse_args(["train", "--model", "arseg_ct", "--stage", "2", "--init", "s1.safetensors",
                                          "--encoder-init", "s0.safetensors", "--segmentor-init", "old.safetensors"]))
    assert (cfg.stage, cfg.init, cfg.encoder_init) == (2, "s1.safetensors", "s0.safetensors")
    assert cfg.segmentor_init == "old.safetensors"
    assert config_from_args(ap.parse_args(["train", "--model", "arseg_ct", "--stage", "0"])).stage == 0
