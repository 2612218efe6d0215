"""The opt-in OpenVINO backend (``--backend openvino``, ``predictors.ov``; issue #12).

* f32: the exported tiny configs compiled by OpenVINO give torch's logits within the export
  test's tolerance (1e-4 of the logits' std) and its labels through the engine;
* precision rule: ``--precision bf16`` compiles with OpenVINO's bf16 hint only where the CPU
  computes bf16 natively (the detection is patched, so the tests do not depend on this CPU),
  otherwise one warning and f32; ``auto`` is f32 and never picks OpenVINO;
* the CLI sidecar records the backend, OpenVINO's version and the precision that ran; a family
  without an OpenVINO path and a missing package are one-line errors.

Skipped where ``openvino`` (extra ``napari-genseg[openvino]``) is not installed.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("openvino", reason="the openvino extra (napari-genseg[openvino]) is not installed")

from napari_genseg import device as D  # noqa: E402
from napari_genseg.predictors import ov as OV  # noqa: E402
from napari_genseg.predictors.base import PredictorOptionError  # noqa: E402
from napari_genseg.volume import Volume  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # (tests/conftest.py)


from _doubles import tiny_checkpoint as _tiny_checkpoint  # noqa: E402 (tests/_doubles.py)


def _ct(z=3, hw=40):
    rng = np.random.default_rng(0)
    data = rng.integers(-1000, 400, size=(z, hw, hw)).astype(np.int16)
    data[:, 10:30, 10:30] = 60
    return Volume(data, spacing=(3.0, 0.8, 0.8))


def _write_ct(path):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.ascontiguousarray(_ct().data.transpose(2, 1, 0)), np.diag([0.8, 0.8, 3.0, 1.0])),
             str(path))
    return path


@pytest.mark.parametrize("name", ["msa2net_tiny", "marseg_tiny"])
def test_openvino_f32_matches_torch_for_the_tiny_configs(tmp_path, name):
    from napari_genseg.engine import run_to_end, run_volume
    from napari_genseg.models.checkpoints import load_checkpoint
    from napari_genseg.predictors import OpenVinoSegmentationPredictor, Predictor, make_predictor

    ckpt = load_checkpoint(_tiny_checkpoint(tmp_path, name))
    pred = make_predictor(ckpt, device="cpu", precision="fp32", backend="openvino")
    assert isinstance(pred, OpenVinoSegmentationPredictor) and isinstance(pred, Predictor)
    assert pred.backend == "openvino" and pred.precision == "fp32" and pred.threads == 1
    assert "float32" in str(pred.compiled.get_property("INFERENCE_PRECISION_HINT"))
    c, s = getattr(ckpt.config, "in_chans", 1), ckpt.config.img_size
    x = torch.randn(3, c, s, s, generator=torch.Generator().manual_seed(1))  # 3 calls of one slice
    with torch.inference_mode():
        ref = ckpt.model.eval()(x).numpy()
    got = pred.forward(x).numpy()
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.abs(got - ref).max() / ref.std() <= 1e-4
    vol = _ct()
    a = run_to_end(run_volume(pred, vol, batch_size=2))
    b = run_to_end(run_volume(make_predictor(ckpt, device="cpu", backend="torch"), vol, batch_size=2))
    assert a.backend == "openvino" and (a.labels == b.labels).mean() > 0.999


def test_bf16_runs_openvino_bf16_only_where_the_cpu_has_it(tmp_path, monkeypatch):
    """Native bf16 (patched): the model is compiled with the bf16 hint and the predictor says
    bf16. Without it: one warning naming the reason, f32. ``auto`` is f32."""
    from napari_genseg.models.checkpoints import load_checkpoint
    from napari_genseg.predictors import make_predictor

    compiled, one = [], []
    real = OV.compile_openvino

    def recording(path, precision="fp32", *a, **k):
        compiled.append(precision)
        if not one:  # compiled once in f32: runs on any CPU; the choice is what is tested
            one.append(real(path, "fp32", *a, **k))
        return one[0]

    monkeypatch.setattr(OV, "compile_openvino", recording)
    ckpt = load_checkpoint(_tiny_checkpoint(tmp_path))

    monkeypatch.setattr(D, "_WARNED", set())
    monkeypatch.setattr(D, "cpu_bf16_support", lambda: (True, "x86 CPU with AVX512_BF16"))
    monkeypatch.setattr(OV, "_plugin_bf16", lambda: True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        native = make_predictor(ckpt, device="cpu", precision="bf16", backend="openvino")
        auto = make_predictor(ckpt, device="cpu", precision="auto", backend="openvino")
    assert compiled == ["bf16", "fp32"] and native.precision == "bf16" and auto.precision == "fp32"
    assert not [w for w in caught if "bf16" in str(w.message)]

    compiled.clear()
    monkeypatch.setattr(D, "cpu_bf16_support", lambda: (False, "x86 CPU without AVX512_BF16 or AMX-BF16"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            emulated = make_predictor(ckpt, device="cpu", precision="bf16", backend="openvino")
    msgs = [str(w.message) for w in caught if "bf16" in str(w.message)]
    assert compiled == ["fp32", "fp32"] and emulated.precision == "fp32"
    assert len(msgs) == 1 and "no native bf16" in msgs[0] and "running fp32" in msgs[0]

    # native bf16 on the CPU, but OpenVINO's plugin does not offer it: f32 with its own warning
    compiled.clear()
    monkeypatch.setattr(D, "cpu_bf16_support", lambda: (True, "x86 CPU with AVX512_BF16"))
    monkeypatch.setattr(OV, "_plugin_bf16", lambda: False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert make_predictor(ckpt, device="cpu", precision="bf16", backend="openvino").precision == "fp32"
    assert compiled == ["fp32"] and any("OpenVINO's CPU plugin offers no BF16" in str(w.message) for w in caught)


def test_backend_choice_openvino(monkeypatch):
    """``openvino`` is asked for, never picked by ``auto``; a family without the path, a GPU or
    a missing package are one-line InputErrors."""
    from napari_genseg import export as E
    from napari_genseg.predictors import BACKENDS, resolve_backend

    assert "openvino" in BACKENDS
    assert resolve_backend("openvino", "msa2net", "cpu", "bf16") == "openvino"
    assert resolve_backend("openvino", "marseg", "cpu") == "openvino"
    assert resolve_backend("auto", "msa2net", "cpu", "fp32") != "openvino"
    monkeypatch.setattr(E, "onnxruntime_available", lambda: False)
    assert resolve_backend("auto", "msa2net", "cpu", "fp32") == "torch"  # not OpenVINO either
    with pytest.raises(PredictorOptionError, match="no OpenVINO path"):
        resolve_backend("openvino", "arseg", "cpu")
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(PredictorOptionError, match="runs on the CPU"):
        resolve_backend("openvino", "msa2net", "cuda")
    monkeypatch.setattr(OV, "openvino_available", lambda: False)
    with pytest.raises(PredictorOptionError, match=r"napari-genseg\[openvino\]"):
        resolve_backend("openvino", "msa2net", "cpu")


def test_cli_segment_records_the_openvino_backend(tmp_path, monkeypatch, capsys):
    import openvino

    from napari_genseg.cli import main

    ck = _tiny_checkpoint(tmp_path)
    ct = _write_ct(tmp_path / "ct.nii.gz")
    out = tmp_path / "ov.nii.gz"
    assert main(["segment", str(ct), "--model", "msa2net_tiny", "--checkpoint", str(ck), "--out", str(out),
                 "--backend", "openvino", "--device", "cpu", "--threads", "1", "--quiet"]) == 0
    inf = json.loads(out.with_name("ov.json").read_text())["inference"]
    assert inf["backend"]["name"] == "openvino" and inf["backend_requested"] == "openvino"
    assert inf["backend"]["openvino"] == openvino.__version__ and inf["precision"] == "fp32"

    monkeypatch.setattr(D, "_WARNED", set())
    monkeypatch.setattr(D, "cpu_bf16_support", lambda: (False, "x86 CPU without AVX512_BF16 or AMX-BF16"))
    out2 = tmp_path / "ov_bf16.nii.gz"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["segment", str(ct), "--model", "msa2net_tiny", "--checkpoint", str(ck), "--out", str(out2),
                     "--backend", "openvino", "--precision", "bf16", "--device", "cpu", "--threads", "1",
                     "--quiet"]) == 0
    assert len([w for w in caught if "no native bf16" in str(w.message)]) == 1
    inf = json.loads(out2.with_name("ov_bf16.json").read_text())["inference"]
    assert inf["precision"] == "fp32" and inf["precision_requested"] == "bf16"

    capsys.readouterr()
    rc = main(["segment", str(ct), "--model", "arseg", "--out", str(tmp_path / "a.nii.gz"), "--backend", "openvino",
               "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "no OpenVINO path" in err and len(err.strip().splitlines()) == 1


@pytest.mark.gui
def test_segment_dock_runs_the_openvino_backend(make_napari_viewer_proxy, qtbot, tmp_path):
    """The dock's backend box offers openvino; the run record names it."""
    from napari_genseg.run_record import RUN_KEY
    from napari_genseg.ui.layers import image_layer_data
    from napari_genseg.ui.segment_widget import SegmentWidget

    viewer = make_napari_viewer_proxy()
    d, kw, _ = image_layer_data(_ct(z=2), "ct")
    viewer.add_image(d, **kw)
    w = SegmentWidget(viewer)
    w._model.value, w._checkpoint.value, w._device.value = "msa2net_tiny", str(_tiny_checkpoint(tmp_path)), "cpu"
    assert "openvino" in w._backend.choices
    w._backend.value = "openvino"
    assert w.run() is not None
    qtbot.waitUntil(lambda: w.worker is None, timeout=60000)
    inf = w._target.metadata[RUN_KEY]["inference"]
    assert inf["backend"]["name"] == "openvino" and inf["precision"] == "fp32"
