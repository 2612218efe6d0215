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
