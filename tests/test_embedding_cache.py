"""AR-Seg image-embedding cache (``predictors.embedding_cache``): a rerun with another seed or N skips
the encoder; any change of the image, the weights, the preprocessing or the precision misses; the
disk budget evicts the least recently used entry; a corrupt entry is recomputed; "off" caches nothing.

The encoder calls are counted on the model (``ArSeg.embed``), the one place an embedding is computed.
"""

from __future__ import annotations

import os
from pathlib import Path
import time

import numpy as np
import pytest
import torch

from napari_genseg.models.checkpoints import load_checkpoint
from napari_genseg.predictors import ArSegPredictor, make_predictor
from napari_genseg.predictors.embedding_cache import (
    CacheOptionError,
    EmbeddingCache,
    default_embedding_dir,
    weights_digest,
)
from napari_genseg.preprocessing import Normalization


def _slices(seed=0, n=2, hw=(40, 36)) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 300, (n, *hw)).astype(np.float32)


def _counting(model) -> list:
    """Count ``model.embed`` calls (slices embedded per call)."""
    calls, real = [], model.embed

    def embed(x):
        calls.append(int(x.shape[0]))
        return real(x)

    model.embed = embed
    return calls


def _predictor(ck_path, cache, **opts) -> tuple[ArSegPredictor, list]:
    """A predictor on a freshly loaded model (as the explorer makes one per run) and its call count."""
    p = make_predictor(load_checkpoint(ck_path), device="cpu", precision="fp32", embedding_cache=cache, **opts)
    return p, _counting(p.model)


def _run(p, slices, spacing=(1.5, 1.0)) -> dict:
    p.set_image(slices, spacing)
    return p.predict()


def _files(folder) -> list[str]:
    return sorted(f.name for f in folder.glob("*.pt")) if folder.is_dir() else []


def test_rerun_with_another_seed_and_n_skips_the_encoder(arseg_tiny_checkpoint, tmp_path):
    folder, x = tmp_path / "emb", _slices()
    p1, c1 = _predictor(arseg_tiny_checkpoint, folder, n_samples=4, seed=0)
    _run(p1, x)
    assert c1 == [2] and len(_files(folder)) == 2  # one entry per slice
    # another process-like run: new model object, another seed, N, class and threshold
    p2, c2 = _predictor(arseg_tiny_checkpoint, folder, n_samples=7, seed=3, target_class=2, threshold=0.3)
    out2 = _run(p2, x)
    assert c2 == [] and p2.embedding_cache.stats["disk_hits"] == 2
    # the cached embedding is the computed one: the same samples as a run without any cache
    p3, c3 = _predictor(arseg_tiny_checkpoint, "off", n_samples=7, seed=3, target_class=2, threshold=0.3)
    out3 = _run(p3, x)
    assert c3 == [2]
    for k in ("tokens", "votes", "labels"):
        np.testing.assert_array_equal(out2[k], out3[k])


def test_same_predictor_reruns_from_memory(arseg_tiny_checkpoint, tmp_path):
    folder, x = tmp_path / "emb", _slices()
    p, calls = _predictor(arseg_tiny_checkpoint, folder, n_samples=2)
    _run(p, x)
    for f in folder.glob("*.pt"):
        f.unlink()  # no disk entry left: the second run must come from memory
    p.n, p.seed = 5, 9
    _run(p, x)
    assert calls == [2] and p.embedding_cache.stats["memory_hits"] == 2
    # a batch with one known and one new slice embeds only the new one
    _run(p, np.stack([x[1], _slices(seed=5, n=1)[0]]))
    assert calls == [2, 1]


def test_changed_image_weights_or_preprocessing_miss(arseg_tiny_checkpoint, tmp_path):
    folder, x = tmp_path / "emb", _slices(n=1)
    p, calls = _predictor(arseg_tiny_checkpoint, folder)
    _run(p, x)
    assert calls == [1]
    # one voxel changed by 1 HU
    y = x.copy()
    y[0, 20, 18] += 1.0
    p2, c2 = _predictor(arseg_tiny_checkpoint, folder)
    _run(p2, y)
    assert c2 == [1]
    # another pixel spacing only (same pixels): the checkpoint's grid is "resize", the input equal,
    # so this one is a hit; the slice index plays no part, the pixels do
    p3, c3 = _predictor(arseg_tiny_checkpoint, folder)
    _run(p3, x, spacing=(0.7, 0.7))
    assert c3 == []
    # changed weights: one encoder weight nudged in place on a loaded model
    p4, c4 = _predictor(arseg_tiny_checkpoint, folder)
    with torch.no_grad():
        next(p4.model.image_encoder.parameters()).add_(1e-3)
    _run(p4, x)
    assert c4 == [1]
    assert len(_files(folder)) == 3


def test_changed_normalisation_record_misses_even_for_the_same_input(arseg_tiny_checkpoint, tmp_path):
    """A slice spanning exactly -1000..1000 HU: per-image min-max and a -1000..1000 HU window give
    the same encoder input, yet another recorded normalisation is another entry."""
    from napari_genseg.predictors.base import model_input

    x = np.full((1, 40, 36), -1000.0, np.float32)
    x[:, :, 18:] = 1000.0
    x[:, 10:30, 5:30] = np.random.default_rng(0).uniform(-900, 900, (20, 25))
    folder = tmp_path / "emb"
    p, calls = _predictor(arseg_tiny_checkpoint, folder)
    _run(p, x)
    window = Normalization(kind="hu_window", low=-1000.0, high=1000.0)
    same = [model_input(x, (1.5, 1.0), p.grid, n, p.device) for n in (p.norm, window)]
    torch.testing.assert_close(same[0], same[1], rtol=0, atol=0)
    p2, c2 = _predictor(arseg_tiny_checkpoint, folder)
    p2.norm = window
    _run(p2, x)
    assert calls == [1] and c2 == [1] and len(_files(folder)) == 2


def test_signature_parts_each_change_the_entry(tmp_path):
    """At the cache level, with the same input tensor: weights, preprocessing and precision each
    give another entry; the same signature is a hit."""
    cache = EmbeddingCache(tmp_path, memory_bytes=0)
    x = torch.rand(1, 1, 8, 8)
    calls = []

    def enc(t):
        calls.append(1)
        return t.mean(1, keepdim=True) * 2

    base = {"format": 1, "weights": {"sha256": "a"}, "preprocessing": {"grid": "resize"},
            "runtime": {"precision": "fp32"}}
    variants = [base, {**base, "weights": {"sha256": "b"}}, {**base, "preprocessing": {"grid": "spacing"}},
                {**base, "runtime": {"precision": "bf16"}}]
    for sig in variants:
        cache.embed(x, sig, enc)
    assert len(calls) == 4 and len(_files(tmp_path)) == 4
    out = cache.embed(x, dict(base), enc)
    assert len(calls) == 4
    torch.testing.assert_close(out, x.mean(1, keepdim=True) * 2, rtol=0, atol=0)


def test_weights_digest_follows_in_place_changes(arseg_tiny_checkpoint):
    m = load_checkpoint(arseg_tiny_checkpoint).model
    d0 = weights_digest(m)
    assert weights_digest(load_checkpoint(arseg_tiny_checkpoint).model) == d0  # same weights, another object
    with torch.no_grad():
        next(m.parameters()).mul_(1.0001)
    assert weights_digest(m) != d0


def test_size_limit_evicts_least_recently_used(tmp_path):
    x = torch.rand(3, 16, 16)
    probe = EmbeddingCache(tmp_path / "probe")
    probe.put({"k": 0}, x[0])
    entry = probe.disk_bytes()
    assert 16 * 16 * 4 < entry < 16 * 16 * 4 + 4096
    cache = EmbeddingCache(tmp_path / "c", max_bytes=2 * entry + entry // 2, memory_bytes=0)  # two fit
    sigs = [{"k": i} for i in range(3)]
    for i in (0, 1):
        cache.put(sigs[i], x[i])
    now = time.time()
    os.utime(cache.path(sigs[0]), (now - 100, now - 100))
    os.utime(cache.path(sigs[1]), (now - 50, now - 50))
    torch.testing.assert_close(cache.get(sigs[0]), x[0], rtol=0, atol=0)  # used: 0 is now the most recent
    cache.put(sigs[2], x[2])
    assert not cache.path(sigs[1]).exists()
    assert cache.path(sigs[0]).exists() and cache.path(sigs[2]).exists()
    assert cache.stats["evicted"] == 1 and cache.disk_bytes() <= cache.max_bytes
    assert cache.get(sigs[1]) is None and cache.stats["misses"] == 1


@pytest.mark.parametrize("damage", ["truncate", "garbage", "other_signature", "flipped_byte"])
def test_corrupt_entry_is_recomputed(arseg_tiny_checkpoint, tmp_path, damage):
    folder, x = tmp_path / "emb", _slices(n=1)
    p, calls = _predictor(arseg_tiny_checkpoint, folder, n_samples=3)
    want = _run(p, x)
    (path,) = folder.glob("*.pt")
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a torch file")
    elif damage == "other_signature":  # a valid entry of another slice under this name
        entry = torch.load(path, weights_only=True)
        entry["signature"] = entry["signature"].replace('"input":{', '"input":{"x":1,')
        torch.save(entry, path)
    else:  # one byte of the embedding changed: the checksum refuses it
        entry = torch.load(path, weights_only=True)
        entry["embedding"].view(-1)[0] += 1.0
        torch.save(entry, path)
    p2, c2 = _predictor(arseg_tiny_checkpoint, folder, n_samples=3)
    got = _run(p2, x)
    assert c2 == [1] and p2.embedding_cache.stats["refused"] == 1
    np.testing.assert_array_equal(got["tokens"], want["tokens"])
    # the entry is whole again: a third run reads it
    p3, c3 = _predictor(arseg_tiny_checkpoint, folder, n_samples=3)
    _run(p3, x)
    assert c3 == [] and p3.embedding_cache.stats["disk_hits"] == 1


def test_cache_off_embeds_every_time_and_writes_nothing(arseg_tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("GENSEG_CACHE_DIR", str(tmp_path / "root"))
    x = _slices(n=1)
    for off in ("off", False):
        p, calls = _predictor(arseg_tiny_checkpoint, off, n_samples=2)
        assert p.embedding_cache is None
        _run(p, x)
        _run(p, x)
        assert calls == [1, 1]
    assert not (tmp_path / "root").exists()


def test_default_folder_is_under_genseg_cache_dir(arseg_tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("GENSEG_CACHE_DIR", str(tmp_path / "root"))
    assert default_embedding_dir() == tmp_path / "root" / "embeddings"
    p, _ = _predictor(arseg_tiny_checkpoint, None, n_samples=2)
    _run(p, _slices(n=1))
    assert len(_files(tmp_path / "root" / "embeddings")) == 1


def test_unwritable_folder_is_one_input_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CacheOptionError, match="embedding cache"):
        EmbeddingCache.from_option(blocker / "sub")


def test_cli_embedding_cache_option(ct_case, arseg_tiny_checkpoint, tmp_path, capsys):
    from napari_genseg.cli import main

    run = ["segment", str(ct_case.path), "--model", "arseg", "--checkpoint", str(arseg_tiny_checkpoint),
           "--slices", "0:1", "--device", "cpu", "--threads", "1", "--quiet", "--no-postprocess"]
    folder = tmp_path / "emb"
    assert main([*run, "--out", str(tmp_path / "a.nii.gz"), "--embedding-cache", str(folder)]) == 0
    assert len(_files(folder)) == 1
    before = {f: (folder / f).stat().st_mtime_ns for f in _files(folder)}
    assert main([*run, "--out", str(tmp_path / "b.nii.gz"), "--embedding-cache", "off"]) == 0
    assert {f: (folder / f).stat().st_mtime_ns for f in _files(folder)} == before
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main([*run, "--out", str(tmp_path / "c.nii.gz"), "--embedding-cache", str(blocker / "d")]) == 2
    assert "embedding cache" in capsys.readouterr().err


def test_unwritable_default_folder_warns_and_keeps_memory_only(arseg_tiny_checkpoint, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("GENSEG_CACHE_DIR", str(blocker / "root"))
    with pytest.warns(UserWarning, match="memory only"):
        p, calls = _predictor(arseg_tiny_checkpoint, None, n_samples=2)
    assert p.embedding_cache.folder is None
    _run(p, _slices(n=1))
    _run(p, _slices(n=1))
    assert calls == [1]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "lots"])
def test_size_variable_must_be_a_finite_number_of_mib(monkeypatch, tmp_path, value):
    """``GENSEG_EMBEDDING_CACHE_MB=inf`` (or nan) gave an OverflowError/ValueError traceback."""
    monkeypatch.setenv("GENSEG_EMBEDDING_CACHE_MB", value)
    with pytest.raises(CacheOptionError, match="GENSEG_EMBEDDING_CACHE_MB") as ei:
        EmbeddingCache(tmp_path)
    assert "\n" not in str(ei.value)


def test_entry_evicted_by_another_process_during_the_read_is_a_plain_miss(tmp_path, monkeypatch):
    """Process A sees an entry, process B evicts it before A reads it, and B (or C) writes it
    again: A misses quietly and leaves the new entry alone (it was counted as refused, warned
    about and the fresh entry of the other process deleted)."""
    from napari_genseg.predictors import embedding_cache as ec

    sig, emb = {"k": 1}, torch.arange(12.0).reshape(3, 4)
    a, other = EmbeddingCache(tmp_path, memory_bytes=0), EmbeddingCache(tmp_path, memory_bytes=0)
    other.put(sig, emb)
    path = a.path(sig)
    real = torch.load

    def load_after_eviction(f, *args, **kw):
        Path(f).unlink()  # the other process evicts it ...
        try:
            return real(f, *args, **kw)
        finally:
            other.put(sig, emb)  # ... and writes it again

    monkeypatch.setattr(ec.torch, "load", load_after_eviction)
    assert a.get(sig) is None
    assert a.stats["refused"] == 0 and a.stats["misses"] == 1
    monkeypatch.setattr(ec.torch, "load", real)
    assert path.is_file() and torch.equal(a.get(sig), emb) and a.stats["disk_hits"] == 1


def test_weights_are_hashed_once_per_model_not_per_slice_or_run(arseg_tiny_checkpoint, tmp_path, monkeypatch):
    """The weights' digest (SAM ViT-B: ~360 MB) is part of every entry's signature: it is computed
    once per loaded model; later runs hash only their slices (input + stored embedding)."""
    from napari_genseg.predictors import embedding_cache as ec

    hashed, real = [], ec._tensor_bytes
    monkeypatch.setattr(ec, "_tensor_bytes", lambda t: hashed.append(t.numel()) or real(t))
    p, _ = _predictor(arseg_tiny_checkpoint, tmp_path / "emb", n_samples=2)
    n_weights = len(p.model.state_dict())
    counts = []
    for seed in range(3):
        hashed.clear()
        _run(p, _slices(seed=seed, n=2))
        counts.append(len(hashed))
    assert counts[0] == n_weights + 4 and counts[1:] == [4, 4]  # 2 inputs + 2 stored embeddings
