"""Memory of a full-size run (issue #12, "Memory for full-size CT"): the whole-volume steps make
no wider or repeated copies of the volume than they need. Peaks are traced with ``tracemalloc``
(numpy reports its buffers to it) on small arrays, so the tests are fast."""

from __future__ import annotations

import tracemalloc
import weakref

import numpy as np
import pytest

from napari_genseg.checks import apply_hu_offset
from napari_genseg.volume import Volume


def _peak(fn, *args, **kwargs):
    """(result, peak bytes allocated above the start while ``fn`` ran)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start, _ = tracemalloc.get_traced_memory()
        out = fn(*args, **kwargs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return out, peak - start


@pytest.mark.parametrize("dtype, offset, out_dtype", [(np.int16, -1024, np.int16), (np.uint16, -1024, np.int16),
                                                      (np.int16, 0.5, np.float32), (np.float32, 24.0, np.float32)])
def test_hu_offset_makes_one_array_of_the_output_size(dtype, offset, out_dtype):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 3000, (32, 128, 128)).astype(dtype)  # 1 MB: the ufunc buffers (~130 kB) are small
    vol = Volume(data, spacing=(1, 1, 1))
    out, peak = _peak(apply_hu_offset, vol, offset)
    assert out.data.dtype == out_dtype
    np.testing.assert_array_equal(out.data, data.astype(np.float64) + offset)
    # old code: an int32 copy plus the int32 sum (4x an int16 volume) or a float32 copy plus the sum
    assert peak < 1.25 * out.data.nbytes, peak / out.data.nbytes


def _organ_labels(shape=(40, 128, 128)):
    """uint8 labels: a liver with a hole and strays, a spleen in two large pieces (both rules act)."""
    lab = np.zeros(shape, np.uint8)
    lab[4:36, 20:100, 10:70] = 1
    lab[15:20, 50:60, 30:40] = 0  # a hole
    lab[2, 5, 5] = lab[38, 120, 120] = lab[20, 110, 100] = 1  # strays
    lab[5:20, 30:60, 90:120] = 2
    lab[24:36, 30:60, 90:120] = 2  # a second large spleen piece
    return lab


def test_postprocess_peak_stays_near_the_label_arrays():
    from napari_genseg.postprocessing import default_postprocess, postprocess

    names = ["background", "liver", "spleen"]
    lab = _organ_labels()
    postprocess(lab[:, :64, :64], names, default_postprocess(names), (2.0, 1.0, 1.0))  # imports, caches
    (out, rep), peak = _peak(postprocess, lab, names, default_postprocess(names), (2.0, 1.0, 1.0))
    assert rep.by_name("liver").removed_voxels == 3 and rep.by_name("liver").filled_voxels == 500
    assert rep.flags and out.dtype == np.uint8
    # the result (1x), the uint16 components (2x) and one bool mask; the old code kept int32
    # component labels, np.nonzero's int64 triples and np.isin/np.bincount int64 copies: ~12x
    assert peak < 4.5 * lab.nbytes, peak / lab.nbytes


def test_centroid_and_component_slices_match_the_direct_computation():
    from scipy import ndimage as ndi

    from napari_genseg.postprocessing import _big_slices, _centroid, _label, _sizes

    lab = _organ_labels()
    mask = lab == 1
    np.testing.assert_allclose(_centroid(mask), [v.mean() for v in np.nonzero(mask)], rtol=1e-12)
    comp, n = _label(lab == 2, ndi.generate_binary_structure(3, 3))
    assert comp.dtype == np.uint16 and n == 2
    np.testing.assert_array_equal(_sizes(comp, n), np.bincount(comp.ravel())[1:])
    assert _big_slices(comp, [2], 3) == [z + 3 for z in np.nonzero((comp == 2).any(axis=(1, 2)))[0]]


def test_postprocess_in_place_cleans_the_given_labels_like_a_copy():
    from napari_genseg.postprocessing import default_postprocess, postprocess

    names = ["background", "liver", "spleen"]
    spec = default_postprocess(names)
    lab = _organ_labels()
    ref, rep_ref = postprocess(lab, names, spec, (2.0, 1.0, 1.0))
    assert lab[2, 5, 5] == 1  # the default leaves the input alone
    same, rep = postprocess(lab, names, spec, (2.0, 1.0, 1.0), in_place=True)
    assert same is lab and lab[2, 5, 5] == 0
    np.testing.assert_array_equal(same, ref)
    assert rep.to_dict() == rep_ref.to_dict()


def test_cli_postprocesses_the_run_labels_in_place(monkeypatch):
    """The CLI keeps no raw label volume beside the cleaned one (``in_place=True``), and its
    predictor (ONNX Runtime session, arena) is released before the post-processing runs."""
    import napari_genseg.postprocessing as post
    from napari_genseg import cli

    seen = {}
    real = post.postprocess

    def spy(labels, *args, **kwargs):
        seen.update(kwargs)
        seen["predictor_alive"] = made[0]() is not None
        out, rep = real(labels, *args, **kwargs)
        seen["same"] = out is labels
        return out, rep

    monkeypatch.setattr(post, "postprocess", spy)

    class Pred:
        class_names = ["background", "liver"]
        backend = "torch"

        def set_image(self, x, spacing):
            self.n = len(x)

        def predict(self):
            out = np.zeros((self.n, 16, 16), np.uint8)
            out[:, 4:12, 4:12] = 1
            return {"labels": out}

        def release(self):
            pass

    import types

    made = []

    def make(*a, **k):
        p = Pred()
        made.append(weakref.ref(p))
        return p

    monkeypatch.setattr("napari_genseg.predictors.make_predictor", make)
    monkeypatch.setattr("napari_genseg.threads.configure_threads", lambda n=None: 1)
    ckpt = types.SimpleNamespace(class_names=Pred.class_names, postprocess={"liver": {"single_component": True}})
    args = types.SimpleNamespace(slices=None, device="cpu", precision="fp32", grid=None, backend="torch",
                                 batch_size=2, quiet=True, postprocess=True, threads=1)
    vol = Volume(np.zeros((4, 16, 16), np.int16), spacing=(2.0, 1.0, 1.0))
    res = cli.segment_volume(vol, ckpt, args, "case")
    assert seen.get("in_place") is True and seen["same"]
    assert not seen["predictor_alive"]  # the model's runtime is gone before the whole-volume step
    assert res.labels[0, 5, 5] == 1


def test_ort_session_keeps_no_activation_arena(monkeypatch):
    """ONNX Runtime's CPU arena keeps a batch's activations (and grows by powers of two) for the
    session's life; without it they go back after each batch (-45 MiB at batch 4, 512x512)."""
    ort = pytest.importorskip("onnxruntime")
    from napari_genseg.predictors.ort import ort_session

    seen = {}
    monkeypatch.setattr(ort, "InferenceSession", lambda path, so, providers: seen.setdefault("so", so))
    ort_session("model.onnx", threads=1)
    assert seen["so"].enable_cpu_mem_arena is False


def _nifti(path, data_xyz, codes="RAS", slope=None, inter=None):
    """Write ``data_xyz`` (stored i, j, k) as NIfTI with stored axes ``codes`` (1 mm voxels)."""
    import nibabel as nib

    ornt = nib.orientations.axcodes2ornt(codes)
    aff = np.zeros((4, 4))
    aff[3, 3] = 1.0
    for i, (ax, flip) in enumerate(ornt):
        aff[int(ax), i] = flip
    img = nib.Nifti1Image(data_xyz, aff)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    nib.save(img, str(path))
    return path


@pytest.mark.parametrize("codes", ["LPS", "RAS", "PIR"])
def test_nifti_read_makes_one_volume_sized_array(tmp_path, monkeypatch, codes):
    """Reading a .nii.gz holds the voxels once (read slab by slab into the display array; the
    flips and transposes of the reorientation copy nothing). The old read kept the decompressed
    bytes twice (``GzipFile.read`` into nibabel's buffer) and then a reoriented copy: 2-3x."""
    import napari_genseg.io.nifti as nifti

    monkeypatch.setattr(nifti, "READ_SLAB_BYTES", 64 * 1024, raising=False)  # several slabs
    rng = np.random.default_rng(0)
    data = rng.integers(-1024, 2000, (128, 96, 80)).astype(np.int16)  # 2 MB
    path = _nifti(tmp_path / "ct.nii.gz", data, codes)
    nifti.read_nifti(path)  # imports, caches
    vol, peak = _peak(nifti.read_nifti, path)
    assert vol.data.dtype == np.int16 and vol.data.flags.c_contiguous
    ref = nifti.volume_from_array(data, vol.source_affine)  # the reorientation on the array in memory
    np.testing.assert_array_equal(vol.data, ref.data)
    assert peak < 1.3 * data.nbytes, peak / data.nbytes


def test_scaled_nifti_read_has_no_float64_volume(tmp_path, monkeypatch):
    """int16 voxels with scl_slope/scl_inter become float32 HU without a float64 volume between
    (the old read took nibabel's float64 scaling of the whole volume: 2x the float32 result)."""
    import napari_genseg.io.nifti as nifti

    monkeypatch.setattr(nifti, "READ_SLAB_BYTES", 64 * 1024, raising=False)
    rng = np.random.default_rng(1)
    data = rng.integers(0, 3000, (128, 96, 80)).astype(np.int16)
    path = _nifti(tmp_path / "scaled.nii.gz", data, "LPS", slope=0.5, inter=-1024.0)
    nifti.read_nifti(path)
    vol, peak = _peak(nifti.read_nifti, path)
    assert vol.data.dtype == np.float32 and vol.meta["scl_inter"] == -1024.0
    np.testing.assert_array_equal(vol.data, np.transpose(data * 0.5 - 1024.0, (2, 1, 0)).astype(np.float32))
    assert peak < 1.3 * vol.data.nbytes, peak / vol.data.nbytes


def _rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc heap, /proc")
def test_engine_gives_a_batch_s_freed_heap_back():
    """A batch's activations freed inside the heap (below glibc's mmap threshold, with live
    blocks after them) stay in the RSS until ``malloc_trim``: the engine trims during the run (at
    most once a second) and at its end, so they are not held beside the whole-volume arrays that
    come next (~100 MB at batch 4 for the MSA²Net demo on ONNX Runtime). The old engine left
    them: +48 MB here."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim
    except AttributeError:
        pytest.skip("no glibc malloc_trim")
    from napari_genseg.engine import run_to_end, run_volume

    class Activations:
        """A predictor whose batch allocates 192 x 256 kB and frees them, keeping a small block
        allocated after them (as a runtime keeps its outputs), so the heap top is not free."""

        class_names = ["background", "x"]
        backend = "torch"
        keep: list = []

        def set_image(self, x, spacing):
            self.n = len(x)

        def predict(self):
            big = np.ones(4 << 20, np.uint8)  # freed: raises the mmap threshold to 4 MB
            del big
            acts = [np.ones(256 << 10, np.uint8) for _ in range(192)]
            self.keep.append(np.ones(192 << 10, np.uint8))  # lands above them, at the heap top
            del acts
            return {"labels": np.zeros((self.n, 8, 8), np.uint8)}

        def release(self):
            pass

    vol = Volume(np.zeros((4, 8, 8), np.int16), spacing=(1, 1, 1))
    run_to_end(run_volume(Activations(), vol, batch_size=2))  # warm-up: the heap has grown once
    import gc

    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)
    before = _rss_bytes()
    run_to_end(run_volume(Activations(), vol, batch_size=2))
    grown = _rss_bytes() - before
    assert grown < 16 << 20, grown / 2**20
