"""MARSeg training stages 0-2 through the one training loop, the stage hand-overs, the unlabelled
``image:`` data, and MARSeg inference from a trained checkpoint (predictor, ``genseg segment``)."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_genseg.cli import main
from napari_genseg.models.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from napari_genseg.training import data as D
from napari_genseg.training.loop import train
from napari_genseg.training.tasks.marseg import MARSEG_NORMALIZATION

PHANTOM = dict(phantom_shape=[8, 64, 64], phantom_spacing=[3.0, 3.5, 3.5])


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # (tests/conftest.py)


def _cfg(out, **kw):
    d = dict(model="marseg_tiny", data=["phantom:2"], **PHANTOM, batch_size=4, device="cpu", seed=0, quiet=True,
             val_fraction=0.5, threads=1, grid="resize", augment={"off": True}, val_every=1000, out=str(out))
    d.update(kw)
    return d


def _mean(v, a, b):
    return float(np.mean(v[a:b]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Stage 0 (30 steps) -> stage 1 from it (30) -> stage 2 from that (30), with their losses."""
    d = tmp_path_factory.mktemp("marseg")
    out, losses = {}, {}
    for stage, kw in ((0, dict(lr=2e-3)), (1, dict(lr=1e-3, init=str(d / "s0.safetensors"))),
                      (2, dict(lr=1e-3, init=str(d / "s1.safetensors")))):
        ls = []
        out[stage] = train(_cfg(d / f"s{stage}.safetensors", stage=stage, steps=30, **kw),
                           on_step=lambda i, v, ls=ls: ls.append(v))
        losses[stage] = ls
    return d, out, losses


def test_stage0_kl_autoencoder_loss_falls_and_checkpoint_is_the_autoencoder(runs):
    d, out, losses = runs
    ls = losses[0]
    assert len(ls) == 30 and all(math.isfinite(v) for v in ls)
    assert _mean(ls, -5, None) < 0.6 * _mean(ls, 0, 5)
    ck = load_checkpoint(d / "s0.safetensors")
    assert ck.config.module == "autoencoder" and type(ck.model).__name__ == "KLAutoencoder"
    assert ck.input["normalization"] == MARSEG_NORMALIZATION and ck.input["channels"] == 3
    assert ck.provenance["stage"] == 0 and "no LPIPS" in ck.provenance["loss"]
    assert out[0]["validation"]["rec_l1"] < 0.5  # held-out phantom slices reconstruct (range [-1, 1])


def test_stage1_mar_pretraining_loss_falls_with_the_stage0_tokenizer_frozen(runs):
    d, out, losses = runs
    ls = losses[1]
    assert len(ls) == 30 and all(math.isfinite(v) for v in ls)
    assert _mean(ls, -8, None) < 0.7 * _mean(ls, 0, 8)
    s0 = load_checkpoint(d / "s0.safetensors").model.state_dict()
    s1 = load_checkpoint(d / "s1.safetensors")
    assert s1.config.module == "pretrain" and s1.provenance["init"]["module"] == "autoencoder"
    tok = {k[len("tokenizer."):]: v for k, v in s1.model.state_dict().items() if k.startswith("tokenizer.")}
    assert tok.keys() == s0.keys() and all(torch.equal(tok[k], s0[k]) for k in s0)  # loaded and never trained
    hp = s1.provenance["hyperparameters"]
    assert hp["mask_ratio_min"] == 0.7 and hp["diffusion_batch_mul"] == 4


def test_stage2_freezes_mar_encoder_blocks_trains_decoder_and_head(runs):
    d, out, losses = runs
    ls = losses[2]
    assert _mean(ls, -5, None) < 0.7 * _mean(ls, 0, 5)
    s1 = load_checkpoint(d / "s1.safetensors").model.state_dict()
    s2 = load_checkpoint(d / "s2.safetensors")
    assert s2.config.module == "segmentation" and s2.provenance["init"]["module"] == "pretrain"
    sd = s2.model.state_dict()
    enc = [k for k in sd if k.startswith("mar.encoder_blocks.")]
    assert enc and all(torch.equal(sd[k], s1[k]) for k in enc)  # bit-identical
    for prefix in ("mar.decoder_blocks.", "mar.z_proj.", "kl_encoder."):  # handed over, then trained
        keys = [k for k in sd if k.startswith(prefix) and sd[k].is_floating_point()]
        src = {k: s1[k.replace("kl_encoder.", "tokenizer.encoder.")] for k in keys}
        assert any(not torch.equal(sd[k], src[k]) for k in keys), prefix
    assert s2.provenance["loss"] == "2*ce + 1*dice"
    assert 0.0 <= out[2]["validation"]["dice"] <= 1.0


def test_stage1_to_stage2_hand_over_loads_marked_weights(runs, tmp_path):
    """Marker values written into a stage-1 checkpoint are where stage 2 starts."""
    from napari_genseg.training.tasks import MarSegTrainConfig
    from napari_genseg.training.tasks.base import RunContext
    from napari_genseg.training.tasks.marseg import MarSegTask
    from napari_genseg.training.distributed import Dist

    d, _, _ = runs
    ck = load_checkpoint(d / "s1.safetensors")
    m = ck.model
    with torch.no_grad():
        m.tokenizer.encoder.conv_in.weight[0, 0, 0, 0] = 3.25
        m.tokenizer.quant_conv.bias[1] = -2.5  # the posterior-mean half -> stage 2's quant_conv
        m.mar.fake_latent[0, 5] = 123.0
        m.mar.encoder_blocks[1].attn.qkv.weight[2, 3] = -7.75
        m.mar.decoder_blocks[0].mlp.fc1.bias[4] = 9.5
    marked = tmp_path / "marked.safetensors"
    save_checkpoint(marked, m, ck.family, ck.config_name, ck.config, ck.class_names, ck.input, ck.provenance)
    cfg = MarSegTrainConfig.from_dict(_cfg(tmp_path / "x.safetensors", stage=2, init=str(marked)))
    task = MarSegTask(cfg, RunContext(torch.device("cpu"), "fp32", Dist(), quiet=True))
    model = task.build_model().model
    assert model.mar.fake_latent[0, 5] != 123.0  # fresh model
    task.prepare(model, resuming=False)
    assert model.kl_encoder.conv_in.weight[0, 0, 0, 0].item() == 3.25
    assert model.quant_conv.bias[1].item() == -2.5
    assert model.mar.fake_latent[0, 5].item() == 123.0
    assert model.mar.encoder_blocks[1].attn.qkv.weight[2, 3].item() == -7.75
    assert model.mar.decoder_blocks[0].mlp.fc1.bias[4].item() == 9.5
    assert task.init_meta["module"] == "pretrain" and "hand-over" in task.init_meta["how"]


def test_a_checkpoint_of_the_wrong_stage_is_one_line(runs, tmp_path):
    d, _, _ = runs
    with pytest.raises(CheckpointError, match=r"stage-0 \(autoencoder\) checkpoint; stage 2 starts from a stage 1 or "
                                              r"stage 2 checkpoint"):
        train(_cfg(tmp_path / "x.safetensors", stage=2, init=str(d / "s0.safetensors"), steps=1))


class _Crash(Exception):
    pass


def test_stage1_crash_and_resume_equals_one_run(runs, tmp_path):
    """Mask ratio, orders, diffusion steps and noise all draw from the restored RNGs."""
    d, _, _ = runs
    kw = dict(stage=1, steps=5, lr=1e-3, val_every=2, save_every=2, init=str(d / "s0.safetensors"))
    whole = train(_cfg(tmp_path / "a.safetensors", **kw))

    def crash(step, loss):
        if step == 3:
            raise _Crash

    with pytest.raises(_Crash):
        train(_cfg(tmp_path / "b.safetensors", **kw), on_step=crash)
    resumed = train(_cfg(tmp_path / "c.safetensors", resume=str(tmp_path / "b.safetensors"), **kw))
    assert whole["step"] == resumed["step"] == 5
    wa = load_checkpoint(tmp_path / "a.safetensors").model.state_dict()
    wb = load_checkpoint(tmp_path / "c.safetensors").model.state_dict()
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_pretrain_mar_command_is_stage_1(runs, tmp_path, capsys):
    d, _, _ = runs
    out = tmp_path / "pm.safetensors"
    assert main(["pretrain-mar", "--model", "marseg_tiny", "--init", str(d / "s0.safetensors"), "--data",
                 "phantom:1", "--steps", "2", "--batch-size", "2", "--holdout-slices", "none", "--grid", "resize",
                 "--device", "cpu", "--threads", "1", "--no-augment", "--quiet", "--out", str(out)]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["config"]["module"] == "pretrain" and meta["provenance"]["stage"] == 1
    assert main(["pretrain-mar", "--model", "msa2net_tiny", "--data", "phantom:1", "--out", str(out)]) == 2
    assert "pretrain-mar trains MARSeg configs" in capsys.readouterr().err


# ----------------------------------------------------------------------------- unlabelled data
def _write_nifti(path, data, spacing=(3.5, 3.5, 3.0)):
    """(z, y, x) HU -> a NIfTI stored (x, y, z)."""
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data.transpose(2, 1, 0)).astype(np.int16),
                             np.diag([*spacing, 1.0])), str(path))
    return path


def test_image_spec_excludes_its_blocks_and_needs_no_labels(tmp_path):
    from napari_genseg.phantom import make_phantom

    vol = make_phantom(seed=3, shape=(20, 48, 48), spacing=(3.0, 3.5, 3.5)).to_volume().data
    p = _write_nifti(tmp_path / "ct.nii.gz", vol)
    assert D.parse_data_spec(f"image:{p}!12:16,0:2") == ("image", {"path": str(p), "exclude": [(12, 16), (0, 2)]})
    with pytest.raises(D.DataSpecError, match="not A:B"):
        D.parse_data_spec(f"image:{p}!a:b")
    cases, split = D.make_split(D.load_sources([f"image:{p}!12:16,0:2"]), holdout="auto", holdout_gap=1,
                                holdout_size=4)
    c = cases[0]
    assert c.kind == "image" and not c.labels.any() and c.meta["unlabelled"]
    used = {z for _, zs in split.train + split.val for z in zs}
    assert used and not used & {0, 1, 12, 13, 14, 15}
    assert {"source": f"image:{p}!12:16,0:2", "kind": "excluded", "slices": "0-1,12-15"} in split.description["strategy"]
    with pytest.raises(D.DataSpecError, match="outside 0..20"):
        D.load_sources([f"image:{p}!18:25"])
    # stages 0-1 train on it; stage 2 and the segmentation task refuse it (it has no labels)
    s = train(_cfg(tmp_path / "u.safetensors", data=[f"image:{p}!12:16"], stage=0, steps=2, holdout_size=4))
    assert s["step"] == 2
    for kw in (dict(stage=2), dict(model="msa2net_tiny", img_size=32, grid="resize")):
        with pytest.raises(D.DataSpecError, match="unlabelled image cannot train"):
            train(dict(_cfg(tmp_path / "v.safetensors", data=[f"image:{p}"], steps=1), **kw))


# ----------------------------------------------------------------------------- inference
def test_predictor_runs_the_lean_build_with_fake_latent_and_the_recorded_input(runs):
    from napari_genseg.predictors import MarSegPredictor, make_predictor

    d, _, _ = runs
    ck = load_checkpoint(d / "s2.safetensors")
    pred = make_predictor(ck, device="cpu", precision="fp32", return_probs=True)
    assert isinstance(pred, MarSegPredictor) and pred.model.cfg.inference_only
    assert not hasattr(pred.model.mar, "diffloss") and pred.in_chans == 3
    rng = np.random.default_rng(0)
    hu = rng.uniform(-300, 400, (3, 40, 40)).astype(np.float32)
    hu[1, :20] = -1000.0
    pred.set_image(hu, (3.5, 3.5))
    x = pred._x
    assert x.shape == (3, 3, 32, 32) and torch.equal(x[:, 0], x[:, 2])
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0  # HU window -> [-1, 1]
    out = pred.predict()
    # the same as the full (training) model with fake_latent in its buffer, slice by slice
    full = ck.model.eval()
    with torch.no_grad():
        ref = torch.cat([full(x[i:i + 1]) for i in range(3)])
        ref = pred.grid.from_model(ref, (40, 40), (3.5, 3.5)).softmax(1)
    assert out["labels"].shape == (3, 40, 40)
    assert np.allclose(out["probs"].astype(np.float32), ref.numpy(), atol=2e-3)


def test_segment_cli_with_a_stage2_checkpoint_and_one_line_errors(runs, tmp_path, capsys, monkeypatch):
    from napari_genseg.phantom import make_phantom

    d, _, _ = runs
    vol = make_phantom(seed=7, shape=(6, 48, 48), spacing=(3.0, 3.5, 3.5)).to_volume().data
    ct = _write_nifti(tmp_path / "ct.nii.gz", vol)
    run = ["--device", "cpu", "--threads", "1", "--quiet"]
    out = tmp_path / "mask.nii.gz"
    assert main(["segment", str(ct), "--model", "marseg_tiny", "--checkpoint", str(d / "s2.safetensors"),
                 "--out", str(out), *run]) == 0
    m = np.asarray(nib.load(str(out)).dataobj)
    assert m.shape == (48, 48, 6) and set(np.unique(m).tolist()) <= {0, 1, 2}
    capsys.readouterr()
    # a stage-1 checkpoint is no segmentation model
    assert main(["segment", str(ct), "--model", "marseg_tiny", "--checkpoint", str(d / "s1.safetensors"),
                 "--out", str(tmp_path / "m1.nii.gz"), *run]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stage-1 (pretrain) checkpoint, not a segmentation model" in err[0]
    # the family name without shipped demo weights
    monkeypatch.setenv("GENSEG_MODELS_DIR", str(tmp_path / "no_models"))
    assert main(["segment", str(ct), "--model", "marseg", "--out", str(tmp_path / "m2.nii.gz"), *run]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'marseg' has no shipped demo checkpoint" in err[0]


def test_evaluate_and_models_know_marseg(runs, capsys):
    d, _, _ = runs
    assert main(["evaluate", str(d / "s2.safetensors"), "phantom:1@500", "--baseline", "hu"]) == 0
    out = capsys.readouterr().out
    assert "liver" in out and "hu_baseline" in out
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "marseg_paper [paper]" in out and "marseg_demo" in out and "marseg_tiny" in out


def test_stage0_trains_on_random_crops_and_validates_whole_slices(tmp_path, monkeypatch):
    from napari_genseg.models.marseg import KLAutoencoder
    from napari_genseg.training.config import TrainOptionError

    seen = []
    orig = KLAutoencoder.loss

    def spy(self, x, *a, **kw):
        seen.append(tuple(x.shape[-2:]))
        return orig(self, x, *a, **kw)

    monkeypatch.setattr(KLAutoencoder, "loss", spy)
    s = train(_cfg(tmp_path / "c.safetensors", stage=0, steps=3, stage0_crop=16, lr=1e-3))
    assert seen == [(16, 16)] * 3 and s["validation"]["slices"] > 0
    assert json.loads((tmp_path / "c.json").read_text())["provenance"]["hyperparameters"]["stage0_crop"] == 16
    with pytest.raises(TrainOptionError, match="stage0_crop 18 must be a multiple of 4"):
        train(_cfg(tmp_path / "d.safetensors", stage=0, steps=1, stage0_crop=18))


def test_gamma_augmentation_keeps_the_minus_one_to_one_input_range():
    """Gamma acts on [0, 1]: a [-1, 1] window goes there and back (air stays -1, not clamped to 0)."""
    from napari_genseg.preprocessing import Normalization

    norm = Normalization.from_dict(MARSEG_NORMALIZATION)
    aug = D.Augment(p_intensity=1.0, hu_scale=0.0, hu_shift=0.0, noise_hu=0.0, gamma=0.5, p_spatial=0.0,
                    p_elastic=0.0)
    x = torch.full((1, 8, 8), -1000.0)
    x[:, :, 4:] = 75.0  # mid-window: 0 in [-1, 1]
    y = torch.zeros(8, 8, dtype=torch.long)
    out, _ = D.augment_and_normalize(aug, norm, x, y, torch.Generator().manual_seed(3))
    assert float(out.min()) == -1.0 and -1.0 < float(out[0, 0, 4]) < 1.0 and float(out[0, 0, 4]) != 0.0
