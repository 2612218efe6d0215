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
    monkeypatch.setattr(D, "cpu_bf16_support", lambda: (True, "x86 CPU with AVX512_BF16"))
    assert D.resolve_precision("auto", cpu) == "fp32"  # native bf16 or not: auto is fp32 on a CPU
    assert D.resolve_precision("bf16", cpu) == "bf16"  # opt-in, honoured where native
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


def _native(monkeypatch, native: bool):
    reason = "x86 CPU with AVX512_BF16" if native else "x86 CPU without AVX512_BF16 or AMX-BF16; torch kernels: AVX2"
    monkeypatch.setattr(D, "cpu_bf16_support", lambda: (native, reason))
    monkeypatch.setattr(D, "_WARNED", set())


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_cpu_is_honoured_only_where_native(monkeypatch, native):
    """bf16 asked on a CPU: bf16 where the CPU has native bf16; fp32 with ONE warning naming the
    reason where it has not (emulated bf16 is many times slower); ``auto`` is fp32 either way."""
    from napari_genseg.predictors import SegmentationPredictor
    from napari_genseg.preprocessing import Normalization, SliceGrid

    _native(monkeypatch, native)
    cpu = torch.device("cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [D.resolve_precision("bf16", cpu) for _ in range(3)]
        pred = SegmentationPredictor(torch.nn.Conv2d(1, 2, 1), ["bg", "fg"], Normalization("hu_window", -100, 100),
                                     SliceGrid(8), device="cpu", precision="bf16")
        assert D.resolve_precision("auto", cpu) == "fp32"
    msgs = [str(w.message) for w in caught]
    if native:
        assert got == ["bf16"] * 3 and pred.precision == "bf16" and msgs == []
    else:
        assert got == ["fp32"] * 3 and pred.precision == "fp32"
        assert len(msgs) == 1 and "AVX512_BF16" in msgs[0] and "fp32" in msgs[0] and "native" in msgs[0]
    # a GPU's bf16 is never judged by the CPU's flags
    assert D.resolve_precision("bf16", torch.device("cuda")) == "bf16"


def _fake_cpuinfo(tmp_path, monkeypatch, machine: str, line: str | None):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\n" + (line + "\n" if line else "") + "\nprocessor\t: 1\n")
    monkeypatch.setattr(D.platform, "machine", lambda: machine)
    real = D._proc_cpu_flags
    monkeypatch.setattr(D, "_proc_cpu_flags", lambda path=str(f): real(path))
    D.cpu_bf16_support.cache_clear()


@pytest.mark.parametrize("machine, line, native", [
    ("x86_64", "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni", True),
    ("x86_64", "flags\t\t: fpu sse2 avx2 amx_tile amx_bf16", True),
    ("x86_64", "flags\t\t: fpu sse2 avx2 fma", False),  # the AVX2-only EPYC of issue 12
    ("x86_64", "flags\t\t: fpu avx2 avx512f avx512_vnni", False),  # AVX-512 without BF16
    ("aarch64", "Features\t: fp asimd sve bf16 i8mm", True),
    ("aarch64", "Features\t: fp asimd crc32", False),
    ("riscv64", "isa\t\t: rv64imafdc", False),
])
def test_cpu_bf16_detection_reads_the_cpu_flags(tmp_path, monkeypatch, machine, line, native):
    _fake_cpuinfo(tmp_path, monkeypatch, machine, line)
    try:
        got, reason = D.cpu_bf16_support()
        assert got is native and D.cpu_native_bf16() is native
        assert ("without" in reason or "no native" in reason) is (not native)
    finally:
        D.cpu_bf16_support.cache_clear()


def test_help_states_the_bf16_rule_not_a_speed_claim(capsys):
    from napari_genseg.cli import main

    with pytest.raises(SystemExit):
        main(["segment", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "native" in text and "AVX512_BF16" in text and "faster" not in text


def test_cpu_model_name_reads_the_model_name_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14 96-Core Processor\n")
    assert D.cpu_model_name(str(info)) == "AMD EPYC 9R14 96-Core Processor"
    assert D.cpu_model_name(str(tmp_path / "absent")) != ""  # platform's name, or "unknown CPU"
