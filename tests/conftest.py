"""Shared fixtures: the ../shared/data folder, a CT case that exists without it (real CT or the
phantom), and a test double model (tests only).

``GENSEG_SHARED_DIR`` points the fixtures at another shared folder; a missing one makes them
behave as on a clone without ``../shared`` (``GENSEG_SHARED_DIR=/nonexistent pytest tests/test_cli.py``
runs the CLI tests on the phantom).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _ct_cases import CtCase, find_ct_case, real_data_dir  # noqa: E402
from _doubles import ThresholdConfig, ThresholdNet, register_double  # noqa: E402


@pytest.fixture(scope="session")
def ct_case(tmp_path_factory) -> CtCase:
    """A labelled CT every clone has: the real CT from ../shared, or the phantom without it."""
    return find_ct_case(tmp_path_factory.mktemp("ct_case"))


@pytest.fixture(scope="session", autouse=True)
def _export_cache(tmp_path_factory):
    """Exported models (ONNX Runtime backend) go to a cache of the test session, not the user's."""
    old = os.environ.get("GENSEG_CACHE_DIR")
    os.environ["GENSEG_CACHE_DIR"] = str(tmp_path_factory.mktemp("genseg_cache"))
    yield
    if old is None:
        os.environ.pop("GENSEG_CACHE_DIR", None)
    else:
        os.environ["GENSEG_CACHE_DIR"] = old


def pytest_runtest_teardown(item):
    """After a viewer test the process holds Mesa's LLVM (Xvfb's llvmpipe): a later test that
    imports timm would load triton and crash (see napari_genseg.ui._triton); apply the docks' guard."""
    if item.get_closest_marker("gui") is not None:
        from napari_genseg.ui._triton import block_triton_if_unsafe

        block_triton_if_unsafe()


@pytest.fixture
def shared_data() -> Path:
    data = real_data_dir()
    if not data.is_dir():
        pytest.skip(f"shared data not found at {data} (clone the project beside ../shared)")
    return data


@pytest.fixture
def abdomen_ct(shared_data) -> Path:
    p = shared_data / "ct-abdomen" / "ct_abdomen_small.nii.gz"
    if not p.is_file():
        pytest.skip(f"{p} missing")
    return p


@pytest.fixture
def double_checkpoint(tmp_path) -> Path:
    """A project-format checkpoint of the test double (3 classes)."""
    from napari_genseg.models.checkpoints import save_checkpoint

    register_double()
    cfg = ThresholdConfig()
    return save_checkpoint(
        tmp_path / "double.safetensors", ThresholdNet(cfg), "testdouble", "testdouble_small", cfg,
        ["background", "soft", "dense"],
        {"normalization": {"kind": "hu_window", "low": -200.0, "high": 200.0}, "grid": "resize"},
        provenance={"test": True},
    )


@pytest.fixture
def exact_double_checkpoint(ct_case, tmp_path) -> Path:
    """The test double on a grid that holds ``ct_case``'s slices without resampling (its own
    in-plane spacing, a square grid as large as the larger side): every mask voxel is then the
    double's HU band of that very voxel (< -100 HU: 0, -100..100: 1, > 100: 2)."""
    import nibabel as nib

    from napari_genseg.models.checkpoints import save_checkpoint

    register_double()
    img = nib.load(str(ct_case.path))
    sx, sy = (float(v) for v in img.header.get_zooms()[:2])
    cfg = ThresholdConfig(img_size=int(max(img.shape[:2])))
    return save_checkpoint(
        tmp_path / "exact_double.safetensors", ThresholdNet(cfg), "testdouble", "testdouble_small", cfg,
        ["background", "soft", "dense"],
        {"normalization": {"kind": "hu_window", "low": -200.0, "high": 200.0}, "grid": "spacing",
         "spacing_mm": [sy, sx]},
    )


@pytest.fixture
def slow_double_checkpoint(tmp_path) -> Path:
    from napari_genseg.models.checkpoints import save_checkpoint

    register_double()
    cfg = ThresholdConfig(delay_s=0.15)
    return save_checkpoint(
        tmp_path / "slow.safetensors", ThresholdNet(cfg), "testdouble", "testdouble_small", cfg,
        ["background", "soft", "dense"],
        {"normalization": {"kind": "hu_window", "low": -200.0, "high": 200.0}, "grid": "resize"},
    )


@pytest.fixture
def arseg_tiny_checkpoint(tmp_path) -> Path:
    """A project-format checkpoint of ``arseg_tiny`` with seeded random weights (classes:
    background, lesion, organ)."""
    import torch

    from napari_genseg.models import registry
    from napari_genseg.models.checkpoints import save_checkpoint

    entry = registry.get_entry("arseg_tiny")
    torch.manual_seed(0)
    model = registry.get_family("arseg").build(entry.config)
    return save_checkpoint(tmp_path / "arseg_tiny.safetensors", model, "arseg", "arseg_tiny", entry.config,
                           ["background", "lesion", "organ"], {"normalization": {"kind": "minmax"}, "grid": "resize"})


@pytest.fixture
def one_torch_thread():
    """One torch intra-op thread for the test, restored after it: on a shared, loaded 2-core CPU
    the tiny models of the tests run several times faster on one thread than on the default."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def roi_everything_checkpoint(tmp_path):
    """arseg_tiny as a 40 mm ROI checkpoint whose every sample marks its whole crop (mask decoder
    output bias +30): the consensus is then exactly the box (the Box and Edit tab tests)."""
    import torch

    from napari_genseg.models import registry
    from napari_genseg.models.checkpoints import save_checkpoint

    entry = registry.get_entry("arseg_tiny")
    torch.manual_seed(0)
    model = registry.get_family("arseg").build(entry.config)
    with torch.no_grad():
        model.vq.decoder.conv_out.weight.zero_()
        model.vq.decoder.conv_out.bias.fill_(30.0)
    inp = {"normalization": {"kind": "hu_window", "low": -125, "high": 275}, "grid": "resize",
           "roi": {"fov_mm": 40.0}}
    return save_checkpoint(tmp_path / "roi.safetensors", model, "arseg", "arseg_tiny", entry.config,
                           ["background", "liver_lesion"], inp)
