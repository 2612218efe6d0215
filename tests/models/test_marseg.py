"""MARSeg: configs, registry, parameter counts, fidelity, official import, stages 0-2 APIs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fidelity_utils import FIDELITY_DIR, formula_input, official_state_dict  # tests/ on pythonpath

from napari_genseg.models import registry
from napari_genseg.models.checkpoints import (
    CheckpointError,
    import_official_checkpoint,
    load_checkpoint,
    load_state_dict_report,
)
from napari_genseg.models.marseg import (
    CONFIGS,
    PAPER_BN_STATS,
    PAPER_INFERENCE_PARAMS,
    PAPER_PARAMS,
    STAGE2_GROUPS,
    KLAutoencoder,
    MarPretrainer,
    MarSeg,
    MarSegConfig,
    export_official,
    import_kl16_autoencoder,
    import_official,
    load_official,
    sample_mask_ratio,
)
from napari_genseg.models.marseg.diffusion import DiffusionHead, space_timesteps
from napari_genseg.models.marseg.mar import mask_from_orders, random_orders

TINY = CONFIGS["marseg_tiny"]


@pytest.fixture(autouse=True)
def _one_thread(request):
    """Tiny models run faster on one thread on the shared 2-core CPU; the fidelity test keeps
    the default."""
    if request.node.name.startswith("test_fidelity"):
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _tiny(**overrides) -> MarSeg:
    torch.manual_seed(0)
    return MarSeg(dataclasses.replace(TINY, **overrides))


def _images(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 1, size, size, generator=g) * 2 - 1
    return x.expand(-1, 3, -1, -1).contiguous()  # 3 identical channels, as the official input


# ----------------------------------------------------------------------------- configs, registry
@pytest.mark.parametrize("name", ["marseg_paper", "marseg_demo", "marseg_tiny"])
def test_config_json_round_trip(name):
    cfg = CONFIGS[name]
    back = MarSegConfig(**json.loads(json.dumps(dataclasses.asdict(cfg))))
    assert back == cfg
    assert isinstance(back.vae_ch_mult, tuple) and isinstance(back.layer_indices, tuple)
    assert registry.config_from_dict("marseg", registry.config_to_dict(cfg)) == cfg


def test_paper_config_is_the_official_model():
    cfg = CONFIGS["marseg_paper"]
    assert (cfg.img_size, cfg.in_chans, cfg.num_classes) == (256, 3, 3)
    assert (cfg.vae_ch, cfg.vae_ch_mult, cfg.vae_num_res_blocks, cfg.vae_embed_dim) \
        == (128, (1, 1, 2, 2, 4), 2, 16)
    assert (cfg.mar_width, cfg.mar_depth, cfg.mar_heads, cfg.buffer_size) == (768, 12, 12, 64)
    assert (cfg.seq_len, cfg.vae_stride, cfg.latent_scale) == (256, 16, 0.2325)
    assert (cfg.diffloss_depth, cfg.diffloss_width, cfg.diffusion_steps, cfg.num_sampling_steps) \
        == (6, 1024, 1000, 100)
    assert cfg.layer_indices == (8, 9, 10, 11) and cfg.diffusion_batch_mul == 4
    assert cfg.noise_schedule == "cosine" and cfg.mask_ratio_min == 0.7


@pytest.mark.parametrize(
    "bad",
    [
        {"img_size": 250},  # not a multiple of the tokenizer stride 16
        {"mar_heads": 7},
        {"layer_indices": (8, 12)},
        {"layer_indices": (9, 9)},
        {"vae_norm_groups": 48},
        {"vae_attn_levels": (5,)},
        {"noise_schedule": "sigmoid"},
        {"num_sampling_steps": 2000},
        {"mask_ratio_min": 1.0},
        {"ca_reduction": 5},
        {"sa_kernel": 6},
        {"num_classes": 0},
        {"inference_only": 1},
        {"attn_dropout": 1.0},
    ],
)
def test_config_validation(bad):
    with pytest.raises((ValueError, TypeError)):
        dataclasses.replace(CONFIGS["marseg_paper"], **bad)


def test_registry_entries():
    fam = registry.get_family("marseg")
    assert fam.kind == "marseg" and fam.import_official is import_official
    assert fam.default_config == "marseg_paper"
    assert {e.name for e in registry.list_configs("marseg")} == {"marseg_paper", "marseg_demo", "marseg_demo_kl8",
                                                                  "marseg_tiny"}
    paper = registry.get_entry("marseg_paper")
    assert paper.paper and paper.expected_params == PAPER_PARAMS


def test_the_kl8_demo_has_twice_the_token_grid_of_the_kl16_demo():
    """marseg_demo_kl8: KL-8 tokenizer (3 downsamplings), so 32x32 tokens at 256² and logits on
    that grid (the FPN head predicts at the token grid); the rest as marseg_demo."""
    kl16, kl8 = CONFIGS["marseg_demo"], CONFIGS["marseg_demo_kl8"]
    assert (kl16.vae_stride, kl8.vae_stride) == (16, 8)
    assert (kl16.seq_len, kl8.seq_len) == (16 * 16, 32 * 32)
    assert dataclasses.replace(kl8, vae_ch_mult=kl16.vae_ch_mult, vae_attn_levels=kl16.vae_attn_levels) == kl16
    torch.manual_seed(0)
    model = registry.create_model("marseg_demo_kl8", img_size=64).eval()
    with torch.inference_mode():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 3, 64, 64)


# ----------------------------------------------------------------------------- parameter counts
def test_parameter_counts():
    """The official model's numbers: 244,648,667 parameters, +8,192 BatchNorm statistics in its
    state dict (596 entries with the 8 num_batches_tracked); 206,928,827 run by segmentation."""
    with torch.device("meta"):
        full = registry.create_model("marseg_paper")
        inf = registry.create_model("marseg_paper", inference_only=True)
        demo = registry.create_model("marseg_demo")
    assert registry.count_parameters(full) == PAPER_PARAMS == 244_648_667
    sd = full.state_dict()
    assert sum(v.numel() for k, v in sd.items() if k.endswith(("running_mean", "running_var"))) \
        == PAPER_BN_STATS == 8_192
    assert sum(v.numel() for v in sd.values()) == PAPER_PARAMS + PAPER_BN_STATS + 8
    assert len(sd) == 596
    assert full.num_inference_parameters() == PAPER_INFERENCE_PARAMS == 206_928_827
    assert registry.count_parameters(inf) == inf.num_inference_parameters() == PAPER_INFERENCE_PARAMS
    parts = {n: registry.count_parameters(getattr(full, n))
             for n in ("kl_encoder", "quant_conv", "gpaf", "head")}
    assert parts == {"kl_encoder": 28_265_760, "quant_conv": 528, "gpaf": 6_599_048, "head": 2_624_259}
    assert registry.count_parameters(full.mar.diffloss) == 35_749_920
    assert registry.count_parameters(full.mar.encoder_blocks) == 85_054_464
    # the demo ships in fp16: <= 25 MB even with its diffusion head
    assert 2 * registry.count_parameters(demo) <= 25e6
    assert 2e6 <= registry.count_parameters(demo) <= 12e6


# ----------------------------------------------------------------------------- fidelity
@pytest.mark.slow  # ~20 s on an idle 2-core CPU (245 M formula weights, two 256² slices)
def test_fidelity_official_fixture(capsys):
    """The official MARSeg output for formula weights and input, through the importer, in fp32.

    The fixture's logits vary only ~0.003 across pixels, so the bound is tight (5e-5). Measured
    on a 2-core AVX2 EPYC: max |diff| 4.5e-7 in fp32 (1 or 2 threads) and 3.9e-7 with the model
    in fp64, i.e. both are at the fixture's own fp32 rounding, 100x inside the bound: unlike AR-Seg's
    mask autoencoder (near-ties in an argmin), nothing here amplifies reduction-order rounding, so
    fp32 is compared and no CPU's reduction order decides the result. Per-stage statistics of
    meta.json (tokenizer moments, quant_conv, last encoder/decoder block, first GPAF, head) are
    checked too, to localise a mismatch.
    """
    folder = FIDELITY_DIR / "marseg"
    if not (folder / "keys.json").is_file() or not (folder / "output.npy").is_file():
        pytest.skip(f"fidelity fixture missing: {folder}")
    official = official_state_dict(folder / "keys.json")
    assert any(k.startswith("mar.diffloss.") for k in official)
    ov, sd, notes = import_official(official)
    cfg = dataclasses.replace(CONFIGS["marseg_paper"], **ov)
    assert cfg.inference_only and cfg.layer_indices == (8, 9, 10, 11)
    with torch.device("meta"):  # no random init of 207 M parameters: every entry is loaded below
        model = MarSeg(cfg)
    model = model.to_empty(device="cpu").eval()
    report = load_state_dict_report(model, sd)
    # 596 official entries: 60 diffusion-head keys, the diffusion position embedding, mask token,
    # class embedding and 6 keys of the 3 unused 3x3 convs are dropped, and reported
    assert report.ok and len(report.loaded) == 527, str(report)
    assert "dropped 60 key(s): the diffusion head" in notes
    assert "dropped 6 key(s): the head's unused 3x3 convs" in notes
    assert {"dropped 1 key(s): mask_token", "dropped 1 key(s): class_emb.weight",
            "dropped 1 key(s): diffusion_pos_embed_learned"} <= set(notes)
    meta = json.loads((folder / "meta.json").read_text())
    stages = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: stages.__setitem__(name, o))
             for name, m in (("encoder", model.kl_encoder), ("quant_conv", model.quant_conv),
                             ("mar.encoder_blocks.11", model.mar.encoder_blocks[11]),
                             ("mar.decoder_blocks.11", model.mar.decoder_blocks[11]),
                             ("fusion_projection_modules.0", model.gpaf[0].proj_out),
                             ("decoder", model.head))]
    x = torch.from_numpy(formula_input(meta["input_shape"]))
    with torch.no_grad():
        out = model(x).numpy()
    for h in hooks:
        h.remove()
    ref = np.load(folder / "output.npy")
    assert out.shape == ref.shape == (2, 3, 256, 256)
    worst = float(np.abs(out - ref).max())
    with capsys.disabled():
        print(f"\n[marseg fidelity] fp32 max |diff| {worst:.2e} ({torch.get_num_threads()} threads)")
    assert worst <= 5e-5
    for name, (st,) in meta["stage_stats"].items():
        got = stages[name]
        assert tuple(got.shape) == tuple(st["shape"]), name
        assert abs(float(got.mean()) - st["mean"]) <= 1e-4 * max(1.0, abs(st["std"])), name
        assert abs(float(got.std()) - st["std"]) <= 1e-4 * max(1.0, st["std"]), name
        np.testing.assert_allclose(got.flatten()[:8].numpy(), st["first8"], rtol=1e-4, atol=1e-4 * st["std"])


# ----------------------------------------------------------------------------- forward / backward
def test_tiny_forward_shapes_batching_and_input_check():
    model = _tiny().eval()
    x = _images(3)
    with torch.no_grad():
        out = model(x)
        one = model(x[1:2])
    assert out.shape == (3, 3, 32, 32) and torch.isfinite(out).all()
    torch.testing.assert_close(out[1:2], one, rtol=1e-4, atol=1e-5)  # slices are independent
    feats = model.forward_features(x[:1])
    assert [tuple(f.shape) for f in feats] == [(1, 16, 8, 8)] * 2
    with pytest.raises(ValueError, match="expects input"):
        model(torch.zeros(1, 3, 48, 48))
    with pytest.raises(ValueError, match="expects input"):
        model(torch.zeros(1, 1, 32, 32))


def test_inference_build_equals_full_build():
    full = _tiny().eval()
    inf = _tiny(inference_only=True).eval()
    report = load_state_dict_report(inf, full.state_dict())
    assert not report.missing and not report.shape_mismatch
    assert sorted(report.unexpected) == sorted(
        k for k in full.state_dict() if k.startswith(("mar.diffloss.", "mar.mask_token", "mar.class_emb",
                                                      "mar.diffusion_pos_embed", "head.fpn_convs.1.")))
    x = _images(2)
    with torch.no_grad():
        torch.testing.assert_close(inf(x), full(x))


def test_backward_reaches_everything_the_forward_runs():
    model = _tiny().train()
    x = _images(2)
    target = torch.randint(0, 3, (2, 32, 32), generator=torch.Generator().manual_seed(1))
    F.cross_entropy(model(x), target).backward()
    unused = tuple(model.unused_at_inference())
    for k, p in model.named_parameters():
        if k.startswith(unused):
            assert p.grad is None, k
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), k


def test_class_label_uses_class_embedding_and_label_drop():
    model = _tiny().eval()
    x = _images(2)
    with torch.no_grad():
        plain = model(x)
        labelled = model(x, class_label=torch.tensor([0, 2]))
    assert not torch.allclose(plain, labelled)
    model.train()
    cond = model.mar.condition(4000, torch.zeros(4000, dtype=torch.long), torch.Generator().manual_seed(0))
    dropped = (cond == model.mar.fake_latent).all(1).float().mean().item()
    assert abs(dropped - TINY.label_drop_prob) < 0.02
    with pytest.raises(ValueError, match="no class embedding"):
        _tiny(inference_only=True)(x, class_label=torch.tensor([0, 1]))


# ----------------------------------------------------------------------------- stage 2 split
def test_stage2_parameter_groups_and_freeze():
    """Trainable in stage 2: KL-16 encoder + quant_conv, MAR embeddings/norm, MAR decoder, GPAF,
    head; frozen: the MAR encoder blocks (and what segmentation never runs)."""
    model = _tiny()
    groups = model.freeze_for_stage2()
    assert [g["name"] for g in groups] == list(STAGE2_GROUPS)
    named = dict(model.named_parameters())
    in_groups = {id(p) for g in groups for p in g["params"]}
    for k, p in named.items():
        frozen = k.startswith(("mar.encoder_blocks.", "mar.diffloss.", "mar.mask_token",
                               "mar.diffusion_pos_embed", "head.fpn_convs.1."))
        assert p.requires_grad is (not frozen), k
        assert (id(p) in in_groups) is (not frozen), k
    tok = next(g for g in groups if g["name"] == "tokenizer")
    # KL-16 encoder + quant_conv (8 -> 4 channels: 36 parameters)
    assert sum(p.numel() for p in tok["params"]) == registry.count_parameters(model.kl_encoder) + 36
    x = _images(2)
    target = torch.randint(0, 3, (2, 32, 32), generator=torch.Generator().manual_seed(2))
    F.cross_entropy(model(x), target).backward()
    assert all(p.grad is None for p in model.mar.encoder_blocks.parameters())
    assert model.mar.z_proj.weight.grad is not None
    assert model.mar.decoder_blocks[0].attn.qkv.weight.grad is not None
    # the pure variant does not touch requires_grad
    fresh = _tiny()
    fresh.stage2_param_groups()
    assert all(p.requires_grad for p in fresh.parameters())


# ----------------------------------------------------------------------------- stage 1 (MAR)
def _truncnorm_cdf(x: np.ndarray, lo: float) -> np.ndarray:
    nd = lambda v: 0.5 * (1 + np.vectorize(math.erf)(np.asarray(v) / math.sqrt(2)))  # noqa: E731
    a = nd((lo - 1) / 0.25)
    return (nd((x - 1) / 0.25) - a) / (0.5 - a)


def test_mask_ratio_is_the_truncated_normal():
    g = torch.Generator().manual_seed(0)
    draws = np.array([sample_mask_ratio(0.7, g) for _ in range(4000)])
    assert draws.min() >= 0.7 and draws.max() <= 1.0
    # mean of N(1, 0.25) truncated to [0.7, 1]: 1 - 0.25 (phi(0) - phi(-1.2)) / (Phi(0) - Phi(-1.2))
    phi = lambda v: math.exp(-v * v / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    mean = 1 - 0.25 * (phi(0) - phi(-1.2)) / (0.5 - 0.5 * (1 + math.erf(-1.2 / math.sqrt(2))))
    assert abs(draws.mean() - mean) < 0.004
    xs = np.sort(draws)
    ks = np.abs(np.arange(1, len(xs) + 1) / len(xs) - _truncnorm_cdf(xs, 0.7)).max()
    assert ks < 1.63 / math.sqrt(len(xs))  # Kolmogorov-Smirnov at 1 %
    # reproducible from the generator
    assert sample_mask_ratio(0.7, torch.Generator().manual_seed(5)) \
        == sample_mask_ratio(0.7, torch.Generator().manual_seed(5))


def test_random_orders_and_masks():
    orders = random_orders(3, 64, torch.Generator().manual_seed(0))
    assert (orders.sort(1).values == torch.arange(64)).all()
    assert not torch.equal(orders[0], orders[1])
    mask = mask_from_orders(orders, 45)
    assert (mask.sum(1) == 45).all()
    assert (mask.gather(1, orders[:, :45]) == 1).all()


def _pretrainer() -> MarPretrainer:
    torch.manual_seed(0)
    return MarPretrainer(TINY).train()


def test_stage1_loss_is_finite_seeded_and_trains_only_mar(monkeypatch):
    model = _pretrainer()
    x = _images(2)
    seen = {}
    real = DiffusionHead.forward

    def spy(self, target, z, mask=None, generator=None):
        seen.update(target=target.shape, z=z.shape, masked=float(mask.sum()))
        return real(self, target, z, mask, generator)

    monkeypatch.setattr(DiffusionHead, "forward", spy)
    out = model.loss(x, generator=torch.Generator().manual_seed(3))
    assert torch.isfinite(out["loss"]) and out["loss"].item() > 0
    n, mul = TINY.seq_len, TINY.diffusion_batch_mul
    assert 0.7 <= out["mask_ratio"] <= 1.0 and out["num_masked"] == math.ceil(n * out["mask_ratio"])
    # diffusion_batch_mul copies of every token, the loss over the masked ones
    assert seen["target"] == (2 * n * mul, TINY.token_dim) and seen["z"] == (2 * n * mul, TINY.mar_width)
    assert seen["masked"] == 2 * out["num_masked"] * mul
    out["loss"].backward()
    assert all(p.grad is None for p in model.tokenizer.parameters())
    assert model.mar.encoder_blocks[0].attn.qkv.weight.grad is not None
    assert model.mar.diffloss.net.input_proj.weight.grad is not None
    again = model.loss(x, generator=torch.Generator().manual_seed(3))["loss"]
    other = model.loss(x, generator=torch.Generator().manual_seed(4))["loss"]
    torch.testing.assert_close(again, out["loss"])
    assert not torch.allclose(other, out["loss"])
    assert not model.tokenizer.training  # frozen tokenizer stays in eval mode


def test_diffusion_loss_ignores_unmasked_tokens():
    torch.manual_seed(0)
    head = DiffusionHead(token_dim=4, cond_dim=8, width=16, depth=2)
    torch.nn.init.normal_(head.net.final_layer.linear.weight)  # not the zero init
    target, z = torch.randn(10, 4), torch.randn(10, 8)
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 1.0])
    base = head(target, z, mask, torch.Generator().manual_seed(0))
    changed = target.clone()
    changed[mask == 0] += 5.0
    torch.testing.assert_close(head(changed, z, mask, torch.Generator().manual_seed(0)), base)
    changed[0] += 5.0
    assert not torch.allclose(head(changed, z, mask, torch.Generator().manual_seed(0)), base)


def test_respacing_matches_iddpm():
    steps = space_timesteps(1000, 100)
    assert len(steps) == 100 and steps[0] == 0 and steps[-1] == 999 and steps[:3] == [0, 10, 20]
    head = DiffusionHead(token_dim=4, cond_dim=8, width=16, depth=1)
    d = head.gen_diffusion
    assert d.num_timesteps == 100 and (d.betas > 0).all() and (d.betas <= 1).all()
    # respacing keeps the cumulative noise level of the kept steps
    base = np.cumprod(1 - head.train_diffusion.betas)
    np.testing.assert_allclose(np.cumprod(1 - d.betas), base[steps], rtol=1e-9)


def test_mar_generation_is_seeded():
    model = _pretrainer().eval()
    a = model.generate(2, num_iter=3, generator=torch.Generator().manual_seed(0))
    b = model.generate(2, num_iter=3, generator=torch.Generator().manual_seed(0))
    c = model.generate(1, num_iter=3, cfg=2.0, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 3, 32, 32) and torch.isfinite(a).all() and torch.equal(a, b)
    assert c.shape == (1, 3, 32, 32) and torch.isfinite(c).all()


def test_pretrainer_hands_over_to_segmentation():
    pre = _pretrainer().eval()
    seg, report = pre.to_segmentation(num_classes=3, inference_only=True)
    assert not report.unexpected and not report.shape_mismatch
    assert all(k.startswith(("gpaf.", "head.")) for k in report.missing) and report.missing
    x = _images(2)
    with torch.no_grad():
        mean = pre.tokenizer.encode(x).mode() * TINY.latent_scale
        torch.testing.assert_close(seg.eval().encode_latents(x), mean)


# ----------------------------------------------------------------------------- stage 0 (KL-16)
def test_kl_autoencoder_shapes_and_loss():
    torch.manual_seed(0)
    ae = KLAutoencoder.from_config(TINY)
    x = _images(2)
    post = ae.encode(x)
    assert post.mean.shape == (2, 4, 8, 8)
    assert (post.kl() >= 0).all()
    out = ae.loss(x, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"]) and out["reconstruction"].shape == x.shape
    out["loss"].backward()
    assert ae.logvar.grad is not None and ae.decoder.conv_out.weight.grad is not None
    assert ae.encoder.conv_in.weight.grad is not None
    again = ae.loss(x, generator=torch.Generator().manual_seed(0))["loss"]
    torch.testing.assert_close(again, out["loss"])
    with torch.device("meta"):
        paper = KLAutoencoder.from_config(CONFIGS["marseg_paper"])
    assert registry.count_parameters(paper.encoder) == 28_265_760  # = the official tokenizer encoder


# ----------------------------------------------------------------------------- official checkpoints
def _args(**kw) -> argparse.Namespace:
    base = dict(model="mar_tiny", img_size=32, vae_path="kl16.ckpt", vae_embed_dim=4, vae_stride=4,
                patch_size=1, class_num=3, buffer_size=4, diffloss_d=2, diffloss_w=32,
                num_sampling_steps="10", diffusion_batch_mul=4, mask_ratio_min=0.7, attn_dropout=0.1,
                proj_dropout=0.1, label_drop_prob=0.1, device="cuda", lr=None, blr=1e-4,
                layer_indices=[0, 1], grad_checkpointing=False)
    base.update(kw)
    return argparse.Namespace(**base)


def test_import_finetuned_marseg_checkpoint(tmp_path, capsys):
    """Ewha-AI/MARSeg format: ckpt['model'] with official keys, ckpt['args'] a Namespace (the one
    class allowed by weights_only loading). Pinned report: the tiny model's 210 official entries,
    of which 33 are training-only and dropped (diffusion head 28, its position embedding, mask
    token, class embedding, 2 keys of the unused 3x3 conv): loaded 177, missing 0, unexpected 0."""
    src = _tiny().eval()
    official = export_official(src.state_dict(), "marseg")
    assert any(k.startswith("initial_projection_modules.0.") for k in official)
    path = tmp_path / "checkpoint-best.pth"
    torch.save({"model": official, "optimizer": {}, "epoch": 7, "scaler": {}, "args": _args()}, path)
    model, cfg, report = load_official(path, base=CONFIGS["marseg_paper"])
    assert capsys.readouterr().out == ""  # nothing printed, in particular no "Loaded"
    assert (len(report.loaded), len(report.missing), len(report.unexpected), len(report.shape_mismatch)) \
        == (177, 0, 0, 0), str(report)
    assert len(official) == 210
    assert cfg.inference_only and cfg.layer_indices == (0, 1) and cfg.num_sampling_steps == 10
    assert (cfg.mar_width, cfg.mar_depth, cfg.mar_heads, cfg.img_size, cfg.buffer_size) == (128, 2, 2, 32, 4)
    assert "configuration read from ckpt['args']" in report.notes
    assert "dropped 28 key(s): the diffusion head" in report.notes
    x = _images(2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x))


def test_import_mar_pretraining_checkpoint(tmp_path):
    """LTH14/mar format: ckpt['model'] and ckpt['model_ema'], keys without 'mar.'. Pinned report
    of the EMA weights into the full tiny MARSeg: loaded 92 (every MAR entry), missing 118
    (KL-16 encoder, quant_conv, GPAF, head: stage 2 trains them), unexpected 0."""
    src = _tiny()
    mar_sd = export_official(src.state_dict(), "mar")
    ema = {k: v + 1.0 if v.is_floating_point() else v for k, v in mar_sd.items()}
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": mar_sd, "model_ema": ema, "epoch": 400, "args": _args(model="mar_tiny")}, path)
    model, cfg, report = load_official(path, base=TINY, weights="model_ema")
    assert (len(report.loaded), len(report.missing), len(report.unexpected), len(report.shape_mismatch)) \
        == (92, 118, 0, 0), str(report)
    assert all(k.startswith("mar.") for k in report.loaded)
    assert all(k.startswith(("kl_encoder.", "quant_conv.", "gpaf.", "head.")) for k in report.missing)
    assert not cfg.inference_only and "weights: ckpt['model_ema'] (the file also has 'model')" in report.notes
    torch.testing.assert_close(model.mar.z_proj.weight, ema["z_proj.weight"])


def test_import_kl16_checkpoint(tmp_path):
    """KL-16 format (LDM AutoencoderKL): only encoder.* feeds MARSeg. Pinned report into the tiny
    MARSeg: loaded 72 (the encoder), missing 138, unexpected 0; the decoder (86 keys),
    quant_conv and post_quant_conv (2 each) are dropped and reported."""
    torch.manual_seed(1)
    ae = KLAutoencoder.from_config(TINY)
    sd = {k: v for k, v in ae.state_dict().items() if k != "logvar"}
    path = tmp_path / "kl16.ckpt"
    torch.save({"model": sd}, path)
    model, cfg, report = load_official(path, base=TINY)
    assert (len(report.loaded), len(report.missing), len(report.unexpected), len(report.shape_mismatch)) \
        == (72, 138, 0, 0), str(report)
    assert all(k.startswith("kl_encoder.") for k in report.loaded)
    assert "dropped 86 key(s): decoder.* (segmentation uses the KL-16 encoder only)" in report.notes
    assert "dropped 2 key(s): quant_conv.* (segmentation uses the KL-16 encoder only)" in report.notes
    torch.testing.assert_close(model.kl_encoder.conv_in.weight, ae.encoder.conv_in.weight)
    # the whole autoencoder (stage 0/1) takes every key
    ov, mapped, notes = import_kl16_autoencoder(sd)
    whole = KLAutoencoder.from_config(dataclasses.replace(TINY, **ov))
    assert load_state_dict_report(whole, mapped).missing == ["logvar"]


def test_weights_only_refuses_other_classes(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": export_official(_tiny().state_dict(), "marseg"), "args": _args(),
                "extra": Path("/tmp")}, path)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_official(path)


def test_unrecognised_or_empty_checkpoints_are_errors(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"state_dict": {"backbone.weight": torch.zeros(2)}}, path)
    with pytest.raises(CheckpointError, match="not a MARSeg, MAR or KL-16 state dict"):
        load_official(path)
    torch.save({"model_ema": {"z_proj.weight": torch.zeros(2)}}, path)
    with pytest.raises(CheckpointError, match="no 'model' entry"):
        load_official(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_official(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"incomplete fine-tuned MARSeg .* mar.z_proj.weight is missing"):
        import_official({"decoder.cls_seg.weight": torch.zeros(3, 256, 1, 1)})


def test_cli_import_path_builds_a_project_checkpoint(tmp_path):
    """``genseg import marseg`` (checkpoints.import_official_checkpoint: no args available there,
    so the last blocks are taken as layer_indices) writes a checkpoint that loads strictly."""
    src = _tiny().eval()
    path = tmp_path / "marseg_official.pth"
    torch.save({"model": export_official(src.state_dict(), "marseg"), "args": _args()}, path)
    out, report = import_official_checkpoint("marseg", path, tmp_path / "imported",
                                             class_names=["background", "liver", "spleen"])
    assert (len(report.loaded), len(report.missing), len(report.unexpected)) == (177, 0, 0), str(report)
    ck = load_checkpoint(out, expect_model="marseg")
    assert ck.config.layer_indices == (0, 1) and ck.config.inference_only
    assert ck.input["normalization"] == {"kind": "hu_window", "low": -125.0, "high": 275.0,
                                         "out_min": -1.0, "out_max": 1.0}
    x = _images(1)
    with torch.no_grad():
        torch.testing.assert_close(ck.model(x), src(x))
