"""ONNX export and the ONNX Runtime backend: outputs against torch, dynamic batch, the cache keyed
by the checkpoint's SHA-256, the runtime choice (``resolve_backend``), the CLI and the sidecar."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_genseg import export as E
from napari_genseg.predictors import resolve_backend
from napari_genseg.predictors.base import PredictorOptionError
from napari_genseg.volume import Volume

ort = pytest.importorskip("onnxruntime", reason="the onnx extra (napari-genseg[onnx]) is not installed")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # (tests/conftest.py)


from _doubles import tiny_checkpoint as _tiny_checkpoint  # noqa: E402 (tests/_doubles.py)


def _session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _rel_diff(model, sess, x: torch.Tensor) -> float:
    with torch.inference_mode():
        ref = model(x).numpy()
    got = sess.run(None, {"image": x.numpy()})[0]
    assert got.shape == ref.shape
    return float(np.abs(got - ref).max() / ref.std())


@pytest.mark.parametrize("name", ["msa2net_tiny", "marseg_tiny"])
def test_onnx_export_matches_torch_with_dynamic_batch(tmp_path, name):
    """opset 17, batch axis symbolic; ONNX Runtime within 1e-4 of the output std of torch at
    batch sizes other than the one traced (2)."""
    import onnx

    from napari_genseg.models import registry

    torch.manual_seed(0)
    model = registry.create_model(name).eval()
    c = model.config
    path = E.export_onnx(model, tmp_path / "m.onnx", c.in_chans, c.img_size)
    proto = onnx.load(str(path))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param == "batch" and not dim0.HasField("dim_value")
    sess = _session(path)
    for b in (1, 3):
        x = torch.randn(b, c.in_chans, c.img_size, c.img_size, generator=torch.Generator().manual_seed(b))
        assert _rel_diff(model, sess, x) <= 1e-4
    assert not list(tmp_path.glob(".m.onnx*"))  # no temporary file left behind


def test_shipped_demo_exports_from_the_cli(tmp_path, capsys):
    """``genseg export msa2net --format onnx --out DIR``: NAME.onnx + NAME.json; the shipped demo's
    ONNX logits equal torch's within 1e-4 of their std."""
    from napari_genseg.cli import main
    from napari_genseg.models.checkpoints import resolve_model

    assert main(["export", "msa2net", "--format", "onnx", "--out", str(tmp_path / "x")]) == 0
    onnx_path, meta_path = tmp_path / "x" / "msa2net_demo.onnx", tmp_path / "x" / "msa2net_demo.json"
    assert f"wrote {onnx_path}" in capsys.readouterr().out
    meta = json.loads(meta_path.read_text())
    ckpt = resolve_model("msa2net")
    assert meta["class_names"] == ckpt.class_names and meta["input"] == ckpt.input
    assert meta["onnx"]["opset"] == 17 and meta["checkpoint_sha256"] == E.checkpoint_sha256(ckpt)
    x = torch.randn(2, 1, ckpt.config.img_size, ckpt.config.img_size, generator=torch.Generator().manual_seed(1))
    assert _rel_diff(ckpt.model.eval(), _session(onnx_path), x) <= 1e-4


def test_shipped_arseg_demo_exports_encoder_and_decoder(tmp_path):
    """The shipped AR-Seg demo's two exported pieces against torch (1e-4 of the output std)."""
    from napari_genseg.cli import main
    from napari_genseg.models.checkpoints import resolve_model

    assert main(["export", "arseg", "--out", str(tmp_path)]) == 0
    model = resolve_model("arseg").model.eval()
    c = model.cfg
    x = torch.rand(2, c.in_chans, c.img_size, c.img_size, generator=torch.Generator().manual_seed(2))
    ids = torch.randint(0, c.vocab_size, (3, model.num_tokens), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        emb, logits = model.embed(x).numpy(), model.decode(ids).numpy()
    got = _session(tmp_path / "arseg_demo.image_encoder.onnx").run(None, {"image": x.numpy()})[0]
    assert np.abs(got - emb).max() <= 1e-4 * emb.std()
    got = _session(tmp_path / "arseg_demo.mask_decoder.onnx").run(None, {"tokens": ids.numpy()})[0]
    assert np.abs(got - logits).max() <= 1e-4 * logits.std()


def test_export_refuses_a_family_without_an_exporter(double_checkpoint, tmp_path, capsys):
    from napari_genseg.cli import main

    rc = main(["export", "testdouble", "--checkpoint", str(double_checkpoint), "--out", str(tmp_path / "x")])
    assert rc == 2 and "testdouble models are not exported yet" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_arseg_exports_its_image_encoder_and_mask_decoder(arseg_tiny_checkpoint, tmp_path):
    """``genseg export arseg``: NAME.image_encoder.onnx (image -> embedding) and
    NAME.mask_decoder.onnx (token ids -> mask logits), each within 1e-4 of torch's output std at a
    batch size other than the traced one; the JSON says what stays in torch (the prefix pass that
    fills the KV cache, the sampling)."""
    from napari_genseg.cli import main
    from napari_genseg.models.checkpoints import load_checkpoint

    assert main(["export", "arseg", "--checkpoint", str(arseg_tiny_checkpoint), "--out", str(tmp_path / "x")]) == 0
    meta = json.loads((tmp_path / "x" / "arseg_tiny.json").read_text())
    assert sorted(meta["onnx"]["pieces"]) == ["image_encoder", "mask_decoder", "segmentor_step"]
    assert "KV cache" in meta["onnx"]["not_exported"]
    model = load_checkpoint(arseg_tiny_checkpoint).model.eval()
    c = model.cfg
    x = torch.rand(3, c.in_chans, c.img_size, c.img_size, generator=torch.Generator().manual_seed(3))
    enc = _session(tmp_path / "x" / "arseg_tiny.image_encoder.onnx")
    with torch.inference_mode():
        ref = model.embed(x).numpy()
    assert np.abs(enc.run(None, {"image": x.numpy()})[0] - ref).max() <= 1e-4 * ref.std()
    ids = torch.randint(0, c.vocab_size, (5, model.num_tokens), generator=torch.Generator().manual_seed(5))
    dec = _session(tmp_path / "x" / "arseg_tiny.mask_decoder.onnx")
    with torch.inference_mode():
        ref = model.decode(ids).numpy()
    assert np.abs(dec.run(None, {"tokens": ids.numpy()})[0] - ref).max() <= 1e-4 * ref.std()


def test_arseg_segmentor_step_with_kv_cache_runs_every_scale_on_onnxruntime(arseg_tiny_checkpoint, tmp_path):
    """``genseg export arseg`` writes NAME.segmentor_step.onnx: one scale's tokens + the KV cache in,
    their logits + the grown cache out (dynamic batch, tokens, cache length). Chained on ONNX
    Runtime through scales 2..K, each step feeding the cache it returned to the next, at a batch
    size other than the traced one, its logits equal the segmentor's uncached teacher-forced pass
    (``NextScaleSegmentor.forward``) within 1e-4 of their std."""
    from napari_genseg.cli import main
    from napari_genseg.models.checkpoints import load_checkpoint
    from napari_genseg.nn.attention import KVCache

    out = tmp_path / "onnx"
    assert main(["export", "arseg", "--checkpoint", str(arseg_tiny_checkpoint), "--out", str(out)]) == 0
    meta = json.loads((out / "arseg_tiny.json").read_text())
    step_meta = meta["onnx"]["pieces"]["segmentor_step"]
    assert step_meta["file"] == "arseg_tiny.segmentor_step.onnx"
    assert step_meta["inputs"]["past_keys"][1] == "batch" and step_meta["outputs"]["present_keys"][3] == "total"
    model = load_checkpoint(arseg_tiny_checkpoint).model.eval()
    seg, q, c = model.segmentor, model.vq.quantizer, model.cfg
    g = torch.Generator().manual_seed(7)
    b = 3
    emb = torch.randn(b, c.embed_dim, c.embed_grid, c.embed_grid, generator=g)
    class_ids = torch.tensor([0, 2, 1])
    ids = torch.randint(0, c.vocab_size, (b, model.num_tokens), generator=g)
    with torch.inference_mode():
        teacher = q.teacher_inputs(ids)  # inputs of mask positions 1..L-1
        full = seg(emb, class_ids, teacher).numpy()  # (B, L, V): no cache
        cond, cls = seg.condition(emb, class_ids)
        cache = KVCache(seg.depth, seg.seq_len)
        seg.run(seg.prefix_tokens(cond, cls), cls, 0, cache)  # the prefix pass stays in torch
    past_k = torch.stack([k[:, :, : cache.length] for k in cache.k]).numpy()
    past_v = torch.stack([v[:, :, : cache.length] for v in cache.v]).numpy()
    sess = _session(out / "arseg_tiny.segmentor_step.onnx")
    o = q.offsets
    for k in range(1, len(c.patch_nums)):  # scale k+1 (1-based) at mask positions o[k]..o[k+1]-1
        inputs = teacher[:, o[k] - 1 : o[k + 1] - 1].numpy()
        logits, past_k, past_v = sess.run(None, {"inputs": inputs, "class_ids": class_ids.numpy(),
                                                 "past_keys": past_k, "past_values": past_v})
        ref = full[:, o[k] : o[k + 1]]
        assert logits.shape == ref.shape
        assert np.abs(logits - ref).max() <= 1e-4 * ref.std(), k
        assert past_k.shape[3] == seg.num_cond + o[k + 1] == past_v.shape[3]


def test_export_never_overwrites_the_checkpoint_config(tmp_path, capsys):
    """``genseg export`` into the checkpoint's own folder would write NAME.json over the
    checkpoint's config: refused with one line, nothing written, the checkpoint still loads."""
    from napari_genseg.cli import main
    from napari_genseg.models.checkpoints import load_checkpoint

    ck = _tiny_checkpoint(tmp_path)
    before = ck.with_suffix(".json").read_bytes()
    rc = main(["export", "msa2net_tiny", "--checkpoint", str(ck), "--out", str(tmp_path)])
    assert rc == 2 and "refusing to overwrite the checkpoint's config" in capsys.readouterr().err
    assert ck.with_suffix(".json").read_bytes() == before and not (tmp_path / "msa2net_tiny.onnx").exists()
    load_checkpoint(ck)


def test_arseg_on_onnxruntime_agrees_with_torch(arseg_tiny_checkpoint):
    """AR-Seg with ORT encoder and decoder (sampling in torch, same seed): the same votes and
    labels as the torch predictor up to rare threshold ties; coarse-scale decodes stay in torch."""
    from napari_genseg.engine import run_to_end, run_volume
    from napari_genseg.models.checkpoints import load_checkpoint
    from napari_genseg.predictors import OrtArSegPredictor, make_predictor

    ckpt = load_checkpoint(arseg_tiny_checkpoint)
    fast = make_predictor(ckpt, device="cpu", backend="auto", n_samples=4, seed=1)
    ref = make_predictor(ckpt, device="cpu", backend="torch", n_samples=4, seed=1)
    assert isinstance(fast, OrtArSegPredictor) and fast.precision == "fp32"
    vol = _ct(z=2, hw=24)
    a = run_to_end(run_volume(fast, vol, batch_size=2))
    b = run_to_end(run_volume(ref, vol, batch_size=2))
    assert a.backend == "onnxruntime"
    assert (a.labels == b.labels).mean() > 0.99
    np.testing.assert_array_equal(a.extras["tokens"][0], b.extras["tokens"][0])
    votes_a, masks_a = fast.decode_progression(a.extras["tokens"][0], (24, 24))
    votes_b, masks_b = ref.decode_progression(b.extras["tokens"][0], (24, 24))
    np.testing.assert_array_equal(votes_a[:-1], votes_b[:-1])  # partial scales: torch in both
    assert (masks_a == masks_b).mean() > 0.99


def test_backend_choice(monkeypatch):
    """auto = ONNX Runtime for an exportable family on the CPU in fp32; torch otherwise. An explicit
    onnxruntime that cannot run is a one-line InputError."""
    from napari_genseg import device as D

    monkeypatch.setattr(D, "cpu_bf16_support", lambda: (True, "x86 CPU with AVX512_BF16"))
    assert resolve_backend("auto", "msa2net", "cpu") == "onnxruntime"
    assert resolve_backend("auto", "marseg", "cpu", "fp32") == "onnxruntime"
    assert resolve_backend("auto", "arseg", "cpu") == "onnxruntime"  # encoder + decoder; sampling in torch
    assert resolve_backend("auto", "testdouble", "cpu") == "torch"
    assert resolve_backend("auto", "msa2net", "cpu", "bf16") == "torch"  # native bf16 asked: torch honours it
    assert resolve_backend("torch", "msa2net", "cpu") == "torch"
    with pytest.raises(PredictorOptionError, match="testdouble models are not exported"):
        resolve_backend("onnxruntime", "testdouble", "cpu")
    with pytest.raises(PredictorOptionError, match="backend must be one of"):
        resolve_backend("tensorrt", "msa2net", "cpu")
    monkeypatch.setattr(E, "onnxruntime_available", lambda: False)
    assert resolve_backend("auto", "msa2net", "cpu") == "torch"
    with pytest.raises(PredictorOptionError, match=r"napari-genseg\[onnx\]"):
        resolve_backend("onnxruntime", "msa2net", "cpu")


def _ct(z=3, hw=40):
    rng = np.random.default_rng(0)
    data = rng.integers(-1000, 400, size=(z, hw, hw)).astype(np.int16)
    data[:, 10:30, 10:30] = 60
    return Volume(data, spacing=(3.0, 0.8, 0.8))


def test_ort_predictor_agrees_with_torch_and_caches_by_checkpoint_hash(tmp_path, monkeypatch):
    """make_predictor(backend="auto") serves msa2net with ONNX Runtime through the engine; labels
    equal torch's (up to arg-max ties) and the probabilities agree; the export is cached under the
    checkpoint's SHA-256 and reused without exporting again."""
    from napari_genseg.engine import run_to_end, run_volume
    from napari_genseg.models.checkpoints import load_checkpoint
    from napari_genseg.predictors import OrtSegmentationPredictor, SegmentationPredictor, make_predictor

    ckpt = load_checkpoint(_tiny_checkpoint(tmp_path))  # the session's cache (conftest)
    vol = _ct()
    fast = make_predictor(ckpt, device="cpu", backend="auto", return_probs=True)
    assert isinstance(fast, OrtSegmentationPredictor) and fast.precision == "fp32"
    ref = make_predictor(ckpt, device="cpu", return_probs=True)  # the library default: torch
    assert type(ref) is SegmentationPredictor
    a = run_to_end(run_volume(fast, vol, batch_size=2))
    b = run_to_end(run_volume(ref, vol, batch_size=2))
    assert a.backend == "onnxruntime" and b.backend == "torch"
    assert (a.labels == b.labels).mean() > 0.999
    np.testing.assert_allclose(a.probs.astype(np.float32), b.probs.astype(np.float32), atol=2e-3)

    cached = E.cache_dir() / "onnx" / f"msa2net-{E.export_cache_key(ckpt)}-model-opset17-r{E.EXPORT_RECIPE}.onnx"
    assert fast.onnx_path == str(cached) and cached.is_file()
    monkeypatch.setattr(E, "export_onnx", lambda *a, **k: pytest.fail("exported again"))
    assert make_predictor(ckpt, device="cpu", backend="onnxruntime").onnx_path == str(cached)


def test_auto_falls_back_to_torch_when_the_export_fails(tmp_path, monkeypatch):
    import warnings

    from napari_genseg import device as D
    from napari_genseg.models.checkpoints import load_checkpoint
    from napari_genseg.predictors import SegmentationPredictor, make_predictor

    monkeypatch.setenv("GENSEG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(D, "_WARNED", set())

    def broken(*a, **k):
        raise E.ExportError("the ONNX export differs from torch")

    monkeypatch.setattr(E, "export_onnx", broken)
    ckpt = load_checkpoint(_tiny_checkpoint(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pred = make_predictor(ckpt, device="cpu", backend="auto")
    assert type(pred) is SegmentationPredictor and pred.backend == "torch"
    assert any("running torch" in str(w.message) for w in caught)
    with pytest.raises(E.ExportError):
        make_predictor(ckpt, device="cpu", backend="onnxruntime")


def test_cli_segment_records_the_backend(tmp_path, monkeypatch, capsys):
    import nibabel as nib

    from napari_genseg.cli import main

    ck = _tiny_checkpoint(tmp_path)
    vol = _ct()
    ct = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(vol.data.transpose(2, 1, 0)), np.diag([0.8, 0.8, 3.0, 1.0])), str(ct))
    run = ["--device", "cpu", "--threads", "1", "--quiet"]
    records = {}
    for backend in ("onnxruntime", "torch", "auto"):
        out = tmp_path / f"{backend}.nii.gz"
        assert main(["segment", str(ct), "--model", "msa2net_tiny", "--checkpoint", str(ck), "--out", str(out),
                     "--backend", backend, *run]) == 0
        records[backend] = json.loads(out.with_name(f"{backend}.json").read_text())["inference"]
    assert records["onnxruntime"]["backend"]["name"] == "onnxruntime"
    assert records["onnxruntime"]["backend"]["onnxruntime"] == ort.__version__
    assert records["torch"]["backend"]["name"] == "torch" and "onnxruntime" not in records["torch"]["backend"]
    assert records["auto"]["backend"]["name"] == "onnxruntime" and records["auto"]["backend_requested"] == "auto"
    capsys.readouterr()
    rc = main(["segment", str(ct), "--model", "msa2net_tiny", "--checkpoint", str(ck), "--out",
               str(tmp_path / "gpu.nii.gz"), "--backend", "onnxruntime", "--device", "cuda", "--quiet"])
    if not torch.cuda.is_available():  # cuda falls back to the CPU with a warning: ORT runs there
        assert rc == 0
    else:
        assert rc == 2 and "runs on the CPU" in capsys.readouterr().err


def test_ort_predictor_follows_the_protocol(tmp_path):
    from napari_genseg.models.checkpoints import load_checkpoint
    from napari_genseg.predictors import Predictor, make_predictor

    pred = make_predictor(load_checkpoint(_tiny_checkpoint(tmp_path)), device="cpu", backend="onnxruntime")
    assert isinstance(pred, Predictor) and pred.backend == "onnxruntime" and pred.threads == 1


@pytest.mark.gui
def test_segment_dock_backend_choice_is_recorded(make_napari_viewer_proxy, qtbot, tmp_path):
    """The dock's backend box reaches the predictor; the run record names the backend that ran."""
    from napari_genseg.run_record import RUN_KEY
    from napari_genseg.ui.layers import image_layer_data
    from napari_genseg.ui.segment_widget import SegmentWidget

    viewer = make_napari_viewer_proxy()
    d, kw, _ = image_layer_data(_ct(z=2), "ct")
    viewer.add_image(d, **kw)
    w = SegmentWidget(viewer)
    w._model.value, w._checkpoint.value, w._device.value = "msa2net_tiny", str(_tiny_checkpoint(tmp_path)), "cpu"
    got = {}
    for backend in ("onnxruntime", "torch"):
        w._backend.value = backend
        assert w.run() is not None
        qtbot.waitUntil(lambda: w.worker is None, timeout=60000)
        layer = w._target
        got[backend] = (layer.metadata[RUN_KEY]["inference"]["backend"]["name"], np.array(layer.data))
    assert got["onnxruntime"][0] == "onnxruntime" and got["torch"][0] == "torch"
    assert (got["onnxruntime"][1] == got["torch"][1]).mean() > 0.999


def test_cli_bf16_without_native_support_warns_once_and_runs_fp32_on_ort(tmp_path, monkeypatch):
    """--precision bf16 on a CPU without native bf16 and --backend auto: the precision warning is
    shown (not used up by the early backend check), the run is fp32 on ONNX Runtime."""
    import warnings

    import nibabel as nib

    from napari_genseg import device as D
    from napari_genseg.cli import main

    monkeypatch.setattr(D, "_WARNED", set())
    monkeypatch.setattr(D, "cpu_bf16_support", lambda: (False, "x86 CPU without AVX512_BF16 or AMX-BF16"))
    ck = _tiny_checkpoint(tmp_path)
    ct = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(_ct().data.transpose(2, 1, 0)), np.diag([0.8, 0.8, 3.0, 1.0])), str(ct))
    out = tmp_path / "m.nii.gz"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["segment", str(ct), "--model", "msa2net_tiny", "--checkpoint", str(ck), "--out", str(out),
                     "--precision", "bf16", "--device", "cpu", "--threads", "1", "--quiet"]) == 0
    msgs = [str(w.message) for w in caught if "bf16" in str(w.message)]
    assert len(msgs) == 1 and "no native bf16" in msgs[0]
    inf = json.loads(out.with_name("m.json").read_text())["inference"]
    assert inf["precision"] == "fp32" and inf["precision_requested"] == "bf16" and inf["backend"]["name"] == "onnxruntime"


def test_int8_backend_quantises_the_matmul_weights_and_records_it(tmp_path, capsys):
    """``--backend onnxruntime-int8`` (opt-in): the cached export with its MatMul/Gemm weights
    dynamically quantised to int8 (``MatMulInteger`` / ``DynamicQuantizeLinear`` nodes, int8
    initialisers, a smaller file), logits close to fp32 torch's (not equal), the sidecar records
    the backend and its precision; AR-Seg has no int8 path (one-line InputError)."""
    pytest.importorskip("onnx")
    import nibabel as nib
    import onnx

    from napari_genseg.cli import main
    from napari_genseg.models.checkpoints import load_checkpoint
    from napari_genseg.predictors import OrtInt8SegmentationPredictor, make_predictor

    ck = _tiny_checkpoint(tmp_path)
    ckpt = load_checkpoint(ck)
    pred = make_predictor(ckpt, device="cpu", backend="onnxruntime-int8")
    assert isinstance(pred, OrtInt8SegmentationPredictor) and pred.backend == "onnxruntime-int8"
    qpath = E.cached_onnx(ckpt, quantization="int8")
    assert pred.onnx_path == str(qpath) and qpath.name.endswith("-int8.onnx")
    graph = onnx.load(str(qpath)).graph
    ops = [n.op_type for n in graph.node]
    # every MatMul with a weight (an initialiser) is quantised; activation x activation ones stay
    inits = {t.name for t in graph.initializer}
    assert ops.count("MatMulInteger") > 0 and ops.count("DynamicQuantizeLinear") > 0
    assert not [n for n in graph.node if n.op_type == "MatMul" and any(i in inits for i in n.input)]
    assert any(t.data_type == onnx.TensorProto.INT8 for t in graph.initializer)
    assert qpath.stat().st_size < E.cached_onnx(ckpt).stat().st_size
    x = torch.randn(3, 1, ckpt.config.img_size, ckpt.config.img_size, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        ref = ckpt.model.eval()(x).numpy()
    got = pred.forward(x).numpy()
    err = np.abs(got - ref).max() / ref.std()
    assert 1e-6 < err < 0.2, err  # quantised: close, not equal

    vol = _ct()
    ct = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(vol.data.transpose(2, 1, 0)), np.diag([0.8, 0.8, 3.0, 1.0])), str(ct))
    out = tmp_path / "int8.nii.gz"
    assert main(["segment", str(ct), "--model", "msa2net_tiny", "--checkpoint", str(ck), "--out", str(out),
                 "--backend", "onnxruntime-int8", "--device", "cpu", "--threads", "1", "--quiet"]) == 0
    rec = json.loads(out.with_name("int8.json").read_text())["inference"]
    assert rec["backend"]["name"] == "onnxruntime-int8" and rec["precision"] == "int8-dynamic"
    assert resolve_backend("onnxruntime-int8", "marseg", "cpu") == "onnxruntime-int8"
    with pytest.raises(PredictorOptionError, match="no int8"):
        resolve_backend("onnxruntime-int8", "arseg", "cpu")


def test_export_cache_is_keyed_by_the_config_too(tmp_path):
    """Same weights file, another config that changes what the weights compute but no shape
    (MSA²Net's ``token_layout``): the cached export of the first config is not reused, and ONNX
    Runtime on the second one's file agrees with torch under the second config (the old cache,
    keyed by the weights' SHA-256 alone, served the first config's graph)."""
    from napari_genseg.models.checkpoints import load_checkpoint

    path = _tiny_checkpoint(tmp_path)
    first = load_checkpoint(path)
    a = E.cached_onnx(first)
    side = path.with_suffix(".json")
    meta = json.loads(side.read_text())
    assert meta["config"]["token_layout"] == "spatial"
    meta["config"]["token_layout"] = "official"
    side.write_text(json.dumps(meta))
    second = load_checkpoint(path)
    b = E.cached_onnx(second)
    assert a != b and E.checkpoint_sha256(first) == E.checkpoint_sha256(second)
    x = torch.randn(1, 1, second.config.img_size, second.config.img_size, generator=torch.Generator().manual_seed(1))
    assert _rel_diff(second.model, _session(b), x) < 1e-4
    assert _rel_diff(second.model, _session(a), x) > 1e-2  # the two configs compute different things


def test_a_lazy_checkpoint_runs_a_cached_export_without_building_the_torch_model(tmp_path, monkeypatch):
    """``load_checkpoint(lazy=True)`` + ``make_predictor(backend="onnxruntime")``: the first run
    builds the model to export it; a second process-like load finds the cached export and never
    builds the torch model (the CLI's path for every backend but torch); its labels equal the
    eager checkpoint's. A lazy checkpoint with a broken weights file raises the eager load's
    CheckpointError when the model is first read."""
    from napari_genseg.engine import run_to_end, run_volume
    from napari_genseg.models import checkpoints as C
    from napari_genseg.predictors import make_predictor

    monkeypatch.setenv("GENSEG_CACHE_DIR", str(tmp_path / "cache"))  # nothing cached yet
    path = _tiny_checkpoint(tmp_path)
    first = C.load_checkpoint(path, lazy=True)
    assert not first.built
    make_predictor(first, device="cpu", backend="onnxruntime")
    assert first.built  # the export needed it
    second = C.load_checkpoint(path, lazy=True)
    pred = make_predictor(second, device="cpu", backend="onnxruntime")
    vol = _ct()
    lazy_labels = run_to_end(run_volume(pred, vol, batch_size=2)).labels
    assert not second.built and second.class_names == ["background", "liver"]
    eager = make_predictor(C.load_checkpoint(path), device="cpu", backend="onnxruntime")
    np.testing.assert_array_equal(lazy_labels, run_to_end(run_volume(eager, vol, batch_size=2)).labels)

    path.write_bytes(path.read_bytes()[:100])  # truncated weights: same error as the eager load, later
    broken = C.load_checkpoint(path, lazy=True)
    with pytest.raises(C.CheckpointError, match="cannot read weights"):
        broken.model
    with pytest.raises(C.CheckpointError, match="cannot read weights"):
        C.load_checkpoint(path)


def test_a_corrupted_cached_export_is_exported_again(tmp_path, monkeypatch):
    """A cached ONNX file truncated on disk used to raise ONNX Runtime's InvalidProtobuf traceback
    on every later run until the user found and deleted it; now it is removed and exported again
    (one warning), and the run's labels equal a clean run's."""
    import warnings

    from napari_genseg import device as D
    from napari_genseg.engine import run_to_end, run_volume
    from napari_genseg.models.checkpoints import load_checkpoint
    from napari_genseg.predictors import make_predictor

    monkeypatch.setenv("GENSEG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(D, "_WARNED", set())
    ckpt = load_checkpoint(_tiny_checkpoint(tmp_path))
    vol = _ct()
    first = make_predictor(ckpt, device="cpu", backend="onnxruntime")
    ref = run_to_end(run_volume(first, vol, batch_size=2)).labels
    path = E.cached_onnx_path(ckpt)
    path.write_bytes(path.read_bytes()[:5000])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = make_predictor(ckpt, device="cpu", backend="onnxruntime")
    assert any("could not be loaded" in str(w.message) and "exporting it again" in str(w.message) for w in caught)
    assert path.stat().st_size > 5000
    np.testing.assert_array_equal(run_to_end(run_volume(again, vol, batch_size=2)).labels, ref)


def test_the_export_cache_is_pruned_least_recently_used_first(tmp_path, monkeypatch):
    """Every config edit or new weights used to add an export that was never deleted (exports
    under an old key are never read again). Now a new export prunes ``cache_dir()/onnx`` to its
    budget, least recently used first (a cache hit touches its file), never the run's own files."""
    import os

    from napari_genseg.models.checkpoints import load_checkpoint

    monkeypatch.setenv("GENSEG_CACHE_DIR", str(tmp_path / "cache"))
    ckpt = load_checkpoint(_tiny_checkpoint(tmp_path))
    size = E.cached_onnx(ckpt).stat().st_size  # the default budget (4 GiB) deletes nothing
    E.cached_onnx_path(ckpt).unlink()
    folder = tmp_path / "cache" / "onnx"
    old, used = folder / "msa2net-old-model-opset17-r1.onnx", folder / "msa2net-used-model-opset17-r1.onnx"
    for i, f in enumerate((old, used)):  # `used` was read more recently
        f.write_bytes(b"x" * 400_000)
        os.utime(f, (1_000_000 + i, 1_000_000 + i))
    other = folder / "notes.txt"
    other.write_text("not an export")
    assert E.prune_export_cache(max_bytes=10**9) == []
    monkeypatch.setenv("GENSEG_EXPORT_CACHE_MB", str((size + 500_000) / 2**20))
    path = E.cached_onnx(ckpt)  # a new export: prunes
    assert path.is_file() and used.is_file() and other.is_file()
    assert not old.exists()
    # a hit touches its file and deletes nothing
    os.utime(path, (2_000_000, 2_000_000))
    assert E.cached_onnx(ckpt) == path and path.stat().st_mtime > 2_000_000 and used.is_file()
    # the run's own files stay even over a zero budget; everything else goes
    assert E.prune_export_cache(keep=[path], max_bytes=0) == [used]
    assert path.is_file()


@pytest.mark.parametrize("value", ["lots", "-1", "nan"])
def test_a_bad_export_cache_budget_is_one_line(monkeypatch, value):
    monkeypatch.setenv("GENSEG_EXPORT_CACHE_MB", value)
    with pytest.raises(E.ExportError, match="GENSEG_EXPORT_CACHE_MB must be"):
        E.export_cache_budget()
