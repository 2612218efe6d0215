"""`genseg import msa2net` on an official-key state dict: report, project checkpoint, output."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fidelity_utils import FIDELITY_DIR, formula_input, official_state_dict


def test_import_official_msa2net_released(tmp_path, capsys):
    keys = FIDELITY_DIR / "msa2net_released" / "keys.json"
    if not keys.is_file():
        pytest.skip(f"fidelity fixtures missing at {FIDELITY_DIR}")
    sd = {f"module.{k}": v for k, v in official_state_dict(keys).items()}  # DataParallel prefix
    src = tmp_path / "official.pth"
    torch.save(sd, src)
    del sd
    from napari_genseg.cli import main
    from napari_genseg.models.checkpoints import load_checkpoint

    out = tmp_path / "imported.safetensors"
    assert main(["import", "msa2net", str(src), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "missing 0, unexpected 0, shape mismatch 0" in text and "released" in text
    ck = load_checkpoint(out)
    assert ck.config.variant == "released" and ck.config.token_layout == "official"
    assert ck.input["normalization"]["out_min"] == -1.0
    assert ck.report.ok and len(ck.class_names) == 9
    x = torch.from_numpy(formula_input((2, 1, 224, 224)))
    with torch.inference_mode():
        y = ck.model(x).numpy()
    ref = np.load(FIDELITY_DIR / "msa2net_released" / "output.npy")
    assert np.abs(y - ref).max() <= 2e-4


def test_import_refuses_pickles_and_foreign_dicts(tmp_path, capsys):
    from fractions import Fraction

    from napari_genseg.cli import main

    bad = tmp_path / "evil.pth"
    torch.save({"obj": Fraction(1, 3)}, bad)  # any non-tensor object: weights_only refuses it
    assert main(["import", "msa2net", str(bad), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "cannot read" in capsys.readouterr().err
    foreign = tmp_path / "foreign.pth"
    torch.save({"conv.weight": torch.zeros(2, 2)}, foreign)
    assert main(["import", "msa2net", str(foreign), "--out", str(tmp_path / "y.safetensors")]) == 2
    assert not (tmp_path / "y.safetensors").exists()


def _official_maskvq(tmp_path):
    """An official-layout mask autoencoder (``codes/MaskVQ`` key names) for a light AR-Seg: the
    file has no image encoder and no segmentor, so its import is partial."""
    import dataclasses

    from napari_genseg.models import registry

    cfg = dataclasses.replace(registry.get_entry("arseg_light").config, vq_ch=32, vq_norm_groups=32)
    torch.manual_seed(0)
    ours = registry.get_family("arseg").build(cfg).state_dict()
    official = {}
    for k, v in ours.items():
        if k == "vq.quantizer.codebook.weight":
            official["quantize.embedding.weight"] = v
        elif k.startswith("vq.quantizer.phi."):
            i, what = k.split(".")[3:5]
            official[f"quantize.quant_resi.qresi_ls.{i}.{what}"] = v
        elif k.startswith("vq."):
            official[k[len("vq."):]] = v
    official["quantize.ema_vocab_hit_SV"] = torch.zeros(8, cfg.vocab_size)  # a known training statistic
    official["loss.discriminator.w"] = torch.zeros(3)  # unknown to the importer: reported, not dropped
    src = tmp_path / "maskvq.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in official.items()}}, src)
    return src, ours


def test_partial_import_writes_nothing_unless_allowed_and_then_records_and_warns(tmp_path, capsys):
    import json

    from napari_genseg.cli import main
    from napari_genseg.models.checkpoints import UntrainedWeightsWarning, load_checkpoint

    src, ours = _official_maskvq(tmp_path)
    out = tmp_path / "vq.safetensors"
    assert main(["import", "arseg", str(src), "--out", str(out)]) == 2
    cap = capsys.readouterr()
    assert "missing" in cap.out and "unexpected: loss.discriminator.w" in cap.out
    assert "nothing written" in cap.err and "--allow-partial" in cap.err
    assert not out.exists() and not out.with_suffix(".json").exists()

    assert main(["import", "arseg", str(src), "--out", str(out), "--allow-partial"]) == 0
    cap = capsys.readouterr()
    assert f"wrote {out}" in cap.out and "image_encoder, segmentor kept random weights" in cap.err
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["untrained"] == ["image_encoder", "segmentor"]
    with pytest.warns(UntrainedWeightsWarning, match="image_encoder, segmentor"):
        ck = load_checkpoint(out)
    assert ck.untrained == ["image_encoder", "segmentor"]
    # the autoencoder weights that were in the file did load
    sd = ck.model.state_dict()
    for k in ("vq.encoder.conv_in.weight", "vq.quantizer.codebook.weight", "vq.quantizer.phi.3.bias"):
        torch.testing.assert_close(sd[k], ours[k])


def test_segment_with_a_partial_checkpoint_warns(ct_case, tmp_path, capsys):
    from _doubles import ThresholdConfig, ThresholdNet, register_double

    from napari_genseg.cli import main
    from napari_genseg.models.checkpoints import save_checkpoint

    register_double()
    cfg = ThresholdConfig()
    ck = save_checkpoint(tmp_path / "partial.safetensors", ThresholdNet(cfg), "testdouble", "testdouble_small", cfg,
                         ["background", "soft", "dense"],
                         {"normalization": {"kind": "hu_window", "low": -200.0, "high": 200.0}, "grid": "resize"},
                         untrained=["gain"])
    assert main(["segment", str(ct_case.path), "--model", "testdouble", "--checkpoint", str(ck),
                 "--out", str(tmp_path / "m.nii.gz"), "--slices", "0:1", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "warning: partial.safetensors was imported with --allow-partial: gain kept random weights" in err
