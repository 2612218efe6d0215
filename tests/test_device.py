"""One device and precision rule for inference and training."""

from __future__ import annotations

import warnings

import pytest
import torch

from napari_genseg import device as D


def test_device_fallback():
    assert D.resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.warns(UserWarning, match="CUDA"):
            assert D.resolve_device("cuda").type == "cpu"
        assert D.resolve_device("auto").type in ("cpu", "mps")


def test_precision_rule(monkeypatch):
    cpu = torch.device("cpu")
    assert D.resolve_precision("auto", cpu) == "fp32"
    assert D.resolve_precision("bf16", cpu) == "bf16"  # opt-in
    assert D.resolve_precision("fp32", torch.device("cuda")) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert D.resolve_precision("auto", torch.device("cuda")) == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert D.resolve_precision("auto", torch.device("cuda")) == "bf16"
    with pytest.raises(ValueError, match="precision"):
        D.resolve_precision("int8", cpu)


def test_fp16_on_cpu_runs_fp32_with_one_warning(monkeypatch):
    monkeypatch.setattr(D, "_WARNED", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [D.resolve_precision("fp16", torch.device("cpu")) for _ in range(3)] == ["fp32"] * 3
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "fp16" in msgs[0] and "fp32" in msgs[0]
