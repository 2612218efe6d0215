"""MARSeg inference paths added for CPU speed (benchmarks/marseg_official_speed.py):

* the bf16 opt-in predictor holds its Linear/Conv weights in bf16 where the CPU computes bf16
  natively (the detection is monkeypatched: the tests do not depend on this machine's CPU), and
  gives autocast's result without touching the caller's model;
* CPU inference feeds the KL encoder channels-last, with the values of the NCHW forward.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from napari_genseg import device as dev
from napari_genseg.models import registry
from napari_genseg.models.checkpoints import Checkpoint, LoadReport
from napari_genseg.predictors import MarSegPredictor, make_predictor
from napari_genseg.predictors.marseg import bf16_weights

_INPUT = {"normalization": {"kind": "hu_window", "low": -125.0, "high": 275.0, "out_min": -1.0, "out_max": 1.0},
          "grid": "resize"}
_MATMUL = (nn.Linear, nn.Conv2d)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # (tests/conftest.py)


def _ckpt() -> Checkpoint:
    torch.manual_seed(0)
    model = registry.create_model("marseg_tiny").eval()  # full build (inference_only False)
    return Checkpoint(model=model, family="marseg", config_name="marseg_tiny", config=model.cfg,
                      class_names=["background", "liver", "spleen"], input=_INPUT, provenance={}, path=None,
                      report=LoadReport())


def _slices() -> np.ndarray:
    rng = np.random.default_rng(0)
    hu = rng.uniform(-200, 300, (2, 40, 40)).astype(np.float32)
    hu[:, 10:30, 8:20] = 60.0  # an organ-like block
    return hu


def _native(monkeypatch, value: bool) -> None:
    monkeypatch.setattr(dev, "cpu_bf16_support", lambda: (value, "patched for the test"))


def test_bf16_predictor_on_a_native_cpu_holds_bf16_weights_and_matches_autocast(monkeypatch):
    _native(monkeypatch, True)
    ck = _ckpt()
    before = {k: v.clone() for k, v in ck.model.state_dict().items()}
    pred = make_predictor(ck, device="cpu", precision="bf16", backend="torch")
    assert isinstance(pred, MarSegPredictor) and pred.precision == "bf16"
    mods = [m for m in pred.model.modules() if isinstance(m, _MATMUL)]
    assert mods and all(p.dtype == torch.bfloat16 for m in mods for p in m.parameters(recurse=False))
    norms = [m for m in pred.model.modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d))]
    assert norms and all(p.dtype == torch.float32 for m in norms for p in m.parameters())
    assert pred.model.mar.fake_latent.dtype == torch.float32 and pred.model.cfg.inference_only
    # the caller's checkpoint model is untouched (dtype and values)
    after = ck.model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    # same values as bf16 autocast over the fp32 lean model (autocast casts those weights anyway)
    ref = MarSegPredictor.from_checkpoint(ck, device="cpu", precision="fp32")
    pred.set_image(_slices(), (3.0, 3.0))
    with torch.inference_mode():
        got = pred.forward(pred._x).float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = ref.model(pred._x).float()
        fp32 = ref.model(pred._x)
    assert got.dtype == torch.float32 and got.shape == (2, 3, 32, 32)
    assert torch.allclose(got, want, atol=2e-2, rtol=2e-2)
    assert (got - fp32).abs().max() < 0.1  # bf16, not something else
    labels = pred.predict()["labels"]
    ref.set_image(_slices(), (3.0, 3.0))
    assert labels.shape == (2, 40, 40) and (labels == ref.predict()["labels"]).mean() > 0.98


def test_bf16_asked_without_native_bf16_runs_the_fp32_weights(monkeypatch):
    _native(monkeypatch, False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pred = MarSegPredictor.from_checkpoint(_ckpt(), device="cpu", precision="bf16")
    assert pred.precision == "fp32"
    assert all(p.dtype == torch.float32 for p in pred.model.parameters())


def test_bf16_weights_copies_only_what_it_casts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Conv1d(8, 2, 1))
    copy = bf16_weights(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # original unchanged
    assert copy[0].weight.dtype == torch.bfloat16 and copy[2].bias.dtype == torch.bfloat16
    assert not copy[0].weight.requires_grad
    assert copy[1].weight.dtype == torch.float32 and copy[1].weight is not model[1].weight
    assert torch.equal(copy[0].weight.float(), model[0].weight.to(torch.bfloat16).float())
    with torch.no_grad():
        copy[1].weight.add_(1.0)  # the copy shares no storage with the original
    assert torch.equal(model[1].weight, torch.ones(8))


def test_cpu_inference_feeds_the_kl_encoder_channels_last_with_the_same_values():
    torch.manual_seed(0)
    model = registry.create_model("marseg_tiny", inference_only=True).eval()
    seen = []
    model.kl_encoder.conv_in.register_forward_hook(
        lambda m, inp, out: seen.append(inp[0].is_contiguous(memory_format=torch.channels_last)))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        fast = model(x)
    slow = model(x)  # autograd on: the NCHW path (training is unchanged)
    assert seen == [True, False]
    assert torch.allclose(fast, slow.detach(), atol=1e-5)


def test_cpu_predictor_runs_a_batch_slice_by_slice_with_the_batch_result():
    ck = _ckpt()
    pred = MarSegPredictor.from_checkpoint(ck, device="cpu", precision="fp32")
    sizes = []
    pred.model.register_forward_hook(lambda m, inp, out: sizes.append(inp[0].shape[0]))
    pred.set_image(np.concatenate([_slices(), _slices()[::-1]]), (3.0, 3.0))
    with torch.inference_mode():
        got = pred.forward(pred._x)
        whole = pred.model(pred._x)
    assert sizes == [1, 1, 1, 1, 4] and got.shape == (4, 3, 32, 32)
    assert torch.allclose(got, whole, atol=1e-5)


def test_marseg_kl_encoder_uses_fused_silu_with_swish_values():
    from napari_genseg.nn.ldm import ResnetBlock, swish

    torch.manual_seed(0)
    model = registry.create_model("marseg_tiny", inference_only=True).eval()
    blocks = [m for m in model.kl_encoder.modules() if isinstance(m, ResnetBlock)]
    assert blocks and all(b.act is torch.nn.functional.silu for b in blocks)
    assert model.kl_encoder.act is torch.nn.functional.silu
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        fast = model(x)
        for m in [model.kl_encoder, *blocks]:
            m.act = swish
        assert torch.allclose(model(x), fast, atol=1e-5)


def test_silu_resnet_block_inference_is_in_place_with_the_same_values():
    from napari_genseg.nn.ldm import ResnetBlock

    torch.manual_seed(0)
    blk = ResnetBlock(32, 64, 8, act=torch.nn.functional.silu).eval()
    x = torch.randn(2, 32, 8, 8)
    want = blk(x)  # autograd on: the out-of-place path
    calls = []
    blk.conv2.register_forward_hook(lambda m, i, o: calls.append(o.data_ptr()))
    with torch.no_grad():
        got = blk(x)
    assert got.data_ptr() == calls[-1]  # the residual sum landed in conv2's output
    assert torch.equal(got, want.detach())
