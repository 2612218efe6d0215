"""MSA²Net: configs, parameter counts, official-checkpoint import, fidelity, forward/backward."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fidelity_utils import formula_input, official_state_dict  # tests/ is on pythonpath

from napari_genseg.models import registry
from napari_genseg.models.checkpoints import load_state_dict_report
from napari_genseg.models.msa2net import (
    PAPER_PARAMS,
    RELEASED_PARAMS,
    Msa2NetConfig,
    Msa2NetDecoderLayer,
    detect_variant,
    export_official,
    import_official,
)

FIDELITY = Path(__file__).resolve().parents[2].parent / "shared" / "fidelity"
VARIANT_FIXTURES = {"paper": "msa2net_paper", "released": "msa2net_released"}
CONFIG_NAMES = ("msa2net_paper", "msa2net_released", "msa2net_demo", "msa2net_tiny")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on the shared 2-core CPU, 2 OpenMP threads competing with other jobs
    run these models 3-20x slower than one (measured); restored after the module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _fixture(variant: str) -> Path:
    path = FIDELITY / VARIANT_FIXTURES[variant]
    if not (path / "keys.json").is_file() or not (path / "output.npy").is_file():
        pytest.skip(f"fidelity fixture missing: {path}")
    return path


def _meta_model(name: str, **overrides) -> torch.nn.Module:
    with torch.device("meta"):
        return registry.create_model(name, **overrides)


# ----------------------------------------------------------------------------- configs, registry


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_json_round_trip(name):
    entry = registry.get_entry(name)
    cfg = entry.config
    assert entry.family == "msa2net"
    rebuilt = type(cfg)(**json.loads(json.dumps(dataclasses.asdict(cfg))))
    assert rebuilt == cfg
    assert registry.config_from_dict("msa2net", registry.config_to_dict(cfg)) == cfg


def test_registry_family():
    family = registry.get_family("msa2net")
    assert family.import_official is import_official
    assert family.kind == "segmentation"
    assert registry.get_entry("msa2net").name == "msa2net_paper"
    assert {e.name for e in registry.list_configs("msa2net")} == set(CONFIG_NAMES)
    assert registry.get_entry("msa2net_paper").paper and registry.get_entry("msa2net_released").paper


@pytest.mark.parametrize(
    "bad",
    [
        dict(variant="v2"),
        dict(token_layout="scrambled"),
        dict(img_size=100),
        dict(in_chans=2),
        dict(num_classes=0),
        dict(img_size=224.0),
    ],
)
def test_config_validation(bad):
    with pytest.raises((ValueError, TypeError)):
        Msa2NetConfig(**bad)


def test_config_normalises_types():
    cfg = Msa2NetConfig(**{**dataclasses.asdict(Msa2NetConfig()), "layer_scale_init": 1})
    assert isinstance(cfg.layer_scale_init, float)


# ----------------------------------------------------------------------------- parameter counts


def test_parameter_counts_match_spec():
    paper = registry.count_parameters(_meta_model("msa2net_paper"))
    released = registry.count_parameters(_meta_model("msa2net_released"))
    assert paper == PAPER_PARAMS == registry.get_entry("msa2net_paper").expected_params
    assert released == RELEASED_PARAMS == registry.get_entry("msa2net_released").expected_params
    assert round(paper / 1e6, 2) == 112.77
    assert round(released / 1e6, 2) == 93.66
    encoder = sum(p.numel() for p in _meta_model("msa2net_paper").backbone.backbone.parameters())
    assert round(encoder / 1e6, 2) == 64.13


def test_demo_config_size():
    model = _meta_model("msa2net_demo")
    n = registry.count_parameters(model)
    assert n * 2 <= 20e6  # fp16 weights <= 20 MB
    assert model.config.num_classes == 3


# ----------------------------------------------------------------------------- importer


@pytest.mark.parametrize("variant", ["paper", "released"])
def test_state_dict_keys_equal_official(variant):
    """Our paper/released state dicts carry exactly the official keys and shapes."""
    path = _fixture(variant)
    official = {k: tuple(shape) for k, shape, _ in json.loads((path / "keys.json").read_text())}
    ours = {
        k: tuple(v.shape)
        for k, v in export_official(_meta_model(f"msa2net_{variant}").state_dict()).items()
    }
    assert ours == official


def test_import_round_trip_paper():
    source = _meta_model("msa2net_paper")
    official_sd = export_official(source.state_dict())
    overrides, sd, notes = import_official(official_sd)
    assert overrides["variant"] == "paper"
    assert overrides["token_layout"] == "official"
    assert overrides["num_classes"] == 9
    assert any("unused" in n or "never runs" in n for n in notes)
    target = _meta_model("msa2net", **overrides)
    report = load_state_dict_report(target, sd)
    assert (len(report.loaded), len(report.missing), len(report.unexpected), len(report.shape_mismatch)) == (
        1100,
        0,
        0,
        0,
    )
    # without the unused modules exactly those keys are reported, none dropped silently
    lean = _meta_model("msa2net", **{**overrides, "keep_unused_modules": False})
    report = load_state_dict_report(lean, sd)
    assert not report.missing and not report.shape_mismatch
    assert len(report.unexpected) == 124
    assert all(k.startswith(("backbone.conv.", "decoder_3.")) for k in report.unexpected)


def test_import_detects_released_and_keeps_unknown_keys():
    sd = export_official(_meta_model("msa2net_released", num_classes=5).state_dict())
    assert detect_variant(sd) == "released"
    sd["head.extra.weight"] = torch.zeros(3)
    overrides, out, _ = import_official(sd)
    assert overrides["variant"] == "released" and overrides["num_classes"] == 5
    assert "head.extra.weight" in out and len(out) == len(sd)
    report = load_state_dict_report(_meta_model("msa2net", **overrides), out)
    assert report.unexpected == ["head.extra.weight"]
    assert not report.missing and not report.shape_mismatch
    assert len(report.loaded) == 1060


def test_import_rejects_foreign_state_dicts():
    with pytest.raises(ValueError, match="sentinel"):
        import_official({"encoder.weight": torch.zeros(1)})
    sd = {"decoder_2.tran_layer1.norm1.weight": torch.zeros(1), "decoder_2.layer_lka_1.norm1.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="both"):
        import_official(sd)


# ----------------------------------------------------------------------------- fidelity


@pytest.mark.parametrize("variant", ["paper", "released"])
def test_fidelity_official_outputs(variant):
    path = _fixture(variant)
    meta = json.loads((path / "meta.json").read_text())
    overrides, sd, _ = import_official(official_state_dict(path / "keys.json"))
    assert overrides["variant"] == variant and overrides["token_layout"] == "official"
    model = registry.create_model("msa2net", **overrides).eval()
    report = load_state_dict_report(model, sd)
    assert not report.missing and not report.unexpected and not report.shape_mismatch, str(report)
    assert len(report.loaded) == meta["n_keys"]

    x = torch.from_numpy(formula_input(meta["input_shape"]))
    with torch.no_grad():
        out = model(x).numpy()
    expected = np.load(path / "output.npy")
    assert out.shape == expected.shape == tuple(meta["output_shape"])
    assert float(np.abs(out - expected).max()) <= 2e-4

    other = FIDELITY / VARIANT_FIXTURES["released" if variant == "paper" else "paper"] / "output.npy"
    if other.is_file():  # the check tells the variants apart
        assert float(np.abs(out - np.load(other)).max()) > 1e-2


# ----------------------------------------------------------------------------- forward / backward


@pytest.mark.parametrize("token_layout", ["spatial", "official"])
@pytest.mark.parametrize("variant", ["paper", "released"])
def test_tiny_forward_backward(variant, token_layout):
    torch.manual_seed(0)
    model = registry.create_model("msa2net_tiny", variant=variant, token_layout=token_layout)
    cfg = model.config
    x = torch.randn(2, cfg.in_chans, cfg.img_size, cfg.img_size)
    out = model(x)
    assert out.shape == (2, cfg.num_classes, cfg.img_size, cfg.img_size)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []  # without the official unused modules every parameter is used


def test_tiny_unused_modules_get_no_gradient_and_change_nothing():
    torch.manual_seed(0)
    lean = registry.create_model("msa2net_tiny").eval()
    full = registry.create_model("msa2net_tiny", keep_unused_modules=True).eval()
    report = load_state_dict_report(full, lean.state_dict())
    assert not report.unexpected and not report.shape_mismatch and report.missing
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(full(x), lean(x))


def test_tiny_autocast_bf16():
    torch.manual_seed(0)
    model = registry.create_model("msa2net_tiny").eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    corr = torch.corrcoef(torch.stack([out.float().flatten(), ref.flatten()]))[0, 1]
    assert corr > 0.98


@pytest.mark.parametrize("token_layout", ["spatial", "official"])
def test_token_layout_geometry(token_layout):
    """Spatial layout: a decoder stage is local (one skip pixel only moves nearby outputs);
    official layout: the raw .view scatters its effect across the whole map."""
    torch.manual_seed(0)
    dim, h = 16, 64
    layer = Msa2NetDecoderLayer(dim, block="lka", gated=True, token_layout=token_layout).eval()
    x1 = torch.randn(1, h * h, dim)
    skip = torch.randn(1, dim, h, h)
    bumped = skip.clone()
    bumped[:, :, 0, 0] += 10.0
    with torch.no_grad():
        diff = (layer(x1, bumped, h, h) - layer(x1, skip, h, h)).abs().amax(-1).reshape(2 * h, 2 * h)
    # receptive radius at h: MASAG 3 + 2 LKA blocks x 12 = 27 px -> < 2 * 28 output rows/cols
    far = torch.cat([diff[56:].flatten(), diff[:, 56:].flatten()]).max()
    if token_layout == "spatial":
        assert diff[0, 0] > 0 and far == 0
    else:
        assert far > 0
