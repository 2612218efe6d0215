"""On-disk cache of image embeddings (AR-Seg: the SAM/MedSAM ViT-B encoder costs ~15-40 s per slice
on a CPU), so a second run on the same slice (another seed, N, target class or threshold) costs only
the segmentor. No napari, no Qt.

What an entry is signed by (the *signature*, a JSON-able dict; the file name is its SHA-256):

* ``input``: SHA-256, shape and dtype of the one slice's model input exactly as fed to the encoder
  (after the grid resampling and the normalisation, ``base.model_input``): any change of the pixels,
  of the slice, of the window or of the grid changes it;
* ``weights``: SHA-256 of every tensor of the model's ``state_dict`` (a superset of the encoder's
  weights: a re-trained checkpoint never meets an old entry) and its whole JSON config;
* ``preprocessing``: the normalisation record, the grid (mode, size, spacing) and the encoder's size;
* ``runtime``: backend (torch / onnxruntime), device type and precision (a bf16 embedding is not an
  fp32 one).

A stored entry is used only when its recorded signature equals the one asked for and the SHA-256 of
its embedding bytes matches; anything else (another signature under the same name, a truncated or
corrupt file, an unreadable one) is *refused*: counted in ``stats["refused"]``, deleted, and the
embedding recomputed and stored again. Nothing is reused silently.

Location: ``$GENSEG_CACHE_DIR/embeddings`` when that variable is set, else the user cache folder
(``export.cache_dir()``: ``platformdirs.user_cache_dir("napari-genseg")``, e.g.
``~/.cache/napari-genseg/embeddings`` on Linux); a predictor's ``embedding_cache`` option (a folder,
or ``"off"``) overrides it. Size: at most ``max_bytes`` on disk (default 2 GiB, or
``$GENSEG_EMBEDDING_CACHE_MB``); the least recently used entries (file mtime, touched on every hit)
are deleted first. Writes are atomic (``io.atomic.atomic_path``), so several processes may share a
folder. Besides the disk, each cache keeps the last embeddings it saw in memory (``memory_bytes``),
so a second run of the same predictor needs no file read at all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import time
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch

from ..errors import InputError
from ..io.atomic import atomic_path, check_writable_folder

__all__ = ["EmbeddingCache", "CacheOptionError", "default_embedding_dir", "weights_digest", "tensor_digest",
           "embedding_signature", "FORMAT", "DEFAULT_MAX_BYTES"]

log = logging.getLogger(__name__)

#: bumped when the entry layout or the signature's meaning changes (older entries then miss)
FORMAT = 1
#: default disk budget (2 GiB: ~500 SAM ViT-B slices of 256 x 64 x 64 fp32)
DEFAULT_MAX_BYTES = 2 * 1024**3
#: default memory budget of one cache (64 SAM ViT-B slices)
DEFAULT_MEMORY_BYTES = 256 * 1024**2
#: entry names: the signature's SHA-256
_ENTRY = re.compile(r"^[0-9a-f]{64}\.pt$")
#: temporary files of interrupted writes older than this are removed during eviction
_STALE_TMP_S = 3600.0
_OFF = ("off", "none", "no", "false", "0", "disabled")


class CacheOptionError(InputError, ValueError):
    """An embedding-cache option that cannot be used (an unwritable folder, a bad size)."""


def default_embedding_dir() -> Path:
    """``$GENSEG_CACHE_DIR/embeddings``, else ``<user cache folder>/napari-genseg/embeddings``
    (the folder the exported ONNX models use, ``export.cache_dir()``)."""
    from ..export import cache_dir

    return cache_dir() / "embeddings"


def _default_max_bytes() -> int:
    env = os.environ.get("GENSEG_EMBEDDING_CACHE_MB")
    if not env:
        return DEFAULT_MAX_BYTES
    try:
        mb = float(env)
    except ValueError:
        raise CacheOptionError(f"GENSEG_EMBEDDING_CACHE_MB must be a number of MiB, not {env!r}") from None
    if not (math.isfinite(mb) and mb >= 0):
        raise CacheOptionError(f"GENSEG_EMBEDDING_CACHE_MB must be a finite number >= 0, not {env!r}")
    return int(mb * 1024**2)


def _tensor_bytes(t: torch.Tensor):
    """The raw bytes of ``t`` (any dtype, bf16 included) as a buffer for hashlib."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return t.view(torch.uint8).numpy() if t.numel() else b""


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 (hex) of a tensor's raw bytes (its shape and dtype are not part of it)."""
    return hashlib.sha256(_tensor_bytes(t)).hexdigest()


#: model -> (fingerprint of its tensors' identity and in-place version counters, digest)
_WEIGHT_DIGESTS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 (hex) of a model's weights: every ``state_dict`` entry (name, dtype, shape, bytes)
    and its ``cfg`` (a dataclass) when it has one.

    Remembered per model object and recomputed when any tensor is replaced or modified in place
    (torch's version counters; ``load_state_dict`` and optimiser steps bump them): SAM ViT-B's
    ~400 MB hash once (~0.3 s) per loaded model, not once per run.
    """
    sd = model.state_dict(keep_vars=True)
    try:
        finger = tuple((k, v.data_ptr(), v._version, tuple(v.shape), str(v.dtype)) for k, v in sd.items())
    except RuntimeError:  # inference tensors keep no version counter: hash every time
        finger = None
    memo = _WEIGHT_DIGESTS.get(model)
    if finger is not None and memo is not None and memo[0] == finger:
        return memo[1]
    h = hashlib.sha256()
    cfg = getattr(model, "cfg", None)
    if dataclasses.is_dataclass(cfg):
        h.update(json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str).encode())
    for k, v in sd.items():
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(_tensor_bytes(v))
    digest = h.hexdigest()
    _WEIGHT_DIGESTS[model] = (finger, digest)
    return digest


def embedding_signature(model: torch.nn.Module, normalization, grid, backend: str, device, precision: str) -> dict:
    """The part of an entry's signature shared by every slice of a predictor (all but ``input``).

    ``normalization``: ``preprocessing.Normalization``; ``grid``: ``preprocessing.SliceGrid``;
    ``device``: a torch.device or its name; ``precision``: the precision that runs ("fp32", "bf16",
    "fp16"). Returns a JSON-able dict.
    """
    cfg = getattr(model, "cfg", None)
    return {
        "format": FORMAT,
        "weights": {"sha256": weights_digest(model), "model": type(model).__qualname__},
        "preprocessing": {
            "normalization": normalization.to_dict(),
            "grid": {"size": int(grid.size), **grid.to_meta()},
            "img_size": int(getattr(cfg, "img_size", grid.size)),
        },
        "runtime": {"backend": str(backend), "device": torch.device(device).type, "precision": str(precision)},
    }


def _canonical(sig: dict) -> str:
    return json.dumps(sig, sort_keys=True, separators=(",", ":"), default=str)


class EmbeddingCache:
    """Image embeddings in memory and on disk, signed and checked (see the module docstring).

    ``folder``: where entries go (created on first write); None = no disk layer. ``max_bytes``:
    disk budget, least recently used entries deleted beyond it (None = ``$GENSEG_EMBEDDING_CACHE_MB``
    or 2 GiB). ``memory_bytes``: budget of the in-memory layer (0 = none). ``stats`` counts
    ``memory_hits``, ``disk_hits``, ``misses``, ``refused`` (entries found but not used), ``evicted``
    and ``computed`` (slices embedded). Raises :class:`CacheOptionError` for a negative budget.
    """

    def __init__(self, folder: str | os.PathLike | None = None, max_bytes: int | None = None,
                 memory_bytes: int = DEFAULT_MEMORY_BYTES) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.max_bytes = _default_max_bytes() if max_bytes is None else int(max_bytes)
        self.memory_bytes = int(memory_bytes)
        if self.max_bytes < 0 or self.memory_bytes < 0:
            raise CacheOptionError("embedding cache sizes must be >= 0")
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._memory_used = 0
        self.stats = dict.fromkeys(("memory_hits", "disk_hits", "misses", "refused", "evicted", "computed"), 0)

    # ------------------------------------------------------------------ construction from an option
    @classmethod
    def from_option(cls, option=None) -> "EmbeddingCache | None":
        """The cache a predictor's ``embedding_cache`` option names.

        None or True: the default folder (``default_embedding_dir``; where it cannot be written,
        one warning and a cache in memory only); a path: that folder; False or "off" (also "none",
        "no", "0"): no cache at all (None is returned; every run embeds); an
        :class:`EmbeddingCache`: itself (shared between predictors). Raises
        :class:`CacheOptionError` when a folder given cannot be written.
        """
        if isinstance(option, EmbeddingCache):
            return option
        if option is False or (isinstance(option, str) and option.strip().lower() in _OFF):
            return None
        default = option is None or option is True
        folder = default_embedding_dir() if default else Path(option).expanduser()
        try:
            check_writable_folder(folder)
        except InputError as exc:
            if not default:
                raise CacheOptionError(f"embedding cache: {exc}") from None
            from ..device import warn_once

            warn_once(f"embedding cache: {exc}; embeddings are kept in memory only (set GENSEG_CACHE_DIR)")
            return cls(None)
        return cls(folder)

    # ------------------------------------------------------------------ keys and files
    @staticmethod
    def key(signature: dict) -> str:
        """The entry name of a signature: SHA-256 of its canonical JSON."""
        return hashlib.sha256(_canonical(signature).encode()).hexdigest()

    def path(self, signature: dict) -> Path | None:
        """Where the entry of ``signature`` lives on disk (None without a disk layer)."""
        return None if self.folder is None else self.folder / f"{self.key(signature)}.pt"

    # ------------------------------------------------------------------ get / put
    def get(self, signature: dict) -> torch.Tensor | None:
        """The stored embedding of ``signature`` (a CPU tensor), or None (then compute and ``put``)."""
        key = self.key(signature)
        hit = self._memory.get(key)
        if hit is not None:
            self._memory.move_to_end(key)
            self.stats["memory_hits"] += 1
            return hit
        t = self._read(signature, key)
        if t is None:
            self.stats["misses"] += 1
            return None
        self.stats["disk_hits"] += 1
        self._remember(key, t)
        return t

    def put(self, signature: dict, embedding: torch.Tensor) -> None:
        """Store one slice's embedding (any shape/dtype; kept as a CPU copy) under ``signature``.

        A disk write that fails (full disk, permissions) is logged and skipped: the run goes on.
        """
        key = self.key(signature)
        t = embedding.detach().to("cpu").contiguous().clone()
        self._remember(key, t)
        if self.folder is None:
            return
        nbytes = t.numel() * t.element_size()
        if nbytes > self.max_bytes:
            return
        entry = {"format": FORMAT, "signature": _canonical(signature), "sha256": tensor_digest(t),
                 "shape": list(t.shape), "dtype": str(t.dtype), "embedding": t}
        try:
            with atomic_path(self.folder / f"{key}.pt") as tmp:
                torch.save(entry, tmp)
        except OSError as exc:
            log.warning("embedding cache: could not write %s (%s)", self.folder, exc)
            return
        self.evict()

    def _read(self, signature: dict, key: str) -> torch.Tensor | None:
        if self.folder is None:
            return None
        path = self.folder / f"{key}.pt"
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            why = "its signature or checksum does not match"
        except FileNotFoundError:
            # another process evicted it between the look and the read: a plain miss (a refusal
            # would delete the entry that process may have written again meanwhile)
            return None
        except Exception as exc:  # noqa: BLE001 - truncated, corrupt, not a torch file: refuse, never crash
            entry, why = None, f"unreadable ({type(exc).__name__})"
        t = entry.get("embedding") if isinstance(entry, dict) else None
        ok = (isinstance(t, torch.Tensor) and entry.get("format") == FORMAT
              and entry.get("signature") == _canonical(signature)
              and list(t.shape) == entry.get("shape") and str(t.dtype) == entry.get("dtype")
              and tensor_digest(t) == entry.get("sha256"))
        if not ok:
            self.stats["refused"] += 1
            log.warning("embedding cache: entry %s refused (%s); recomputing", path.name, why)
            path.unlink(missing_ok=True)
            return None
        try:
            os.utime(path)  # least recently *used* goes first
        except OSError:
            pass
        return t

    def _remember(self, key: str, t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if size > self.memory_bytes:
            return
        old = self._memory.pop(key, None)
        if old is not None:
            self._memory_used -= old.numel() * old.element_size()
        self._memory[key] = t
        self._memory_used += size
        while self._memory_used > self.memory_bytes:
            _, dropped = self._memory.popitem(last=False)
            self._memory_used -= dropped.numel() * dropped.element_size()

    def clear_memory(self) -> None:
        """Forget the in-memory layer (the disk entries stay)."""
        self._memory.clear()
        self._memory_used = 0

    # ------------------------------------------------------------------ size limit
    def entries(self) -> list[tuple[float, int, Path]]:
        """(mtime, size in bytes, path) of every entry on disk, least recently used first."""
        if self.folder is None or not self.folder.is_dir():
            return []
        out = []
        now = time.time()
        with os.scandir(self.folder) as it:
            for e in it:
                try:
                    st = e.stat()
                except OSError:
                    continue
                if _ENTRY.match(e.name):
                    out.append((st.st_mtime, st.st_size, Path(e.path)))
                elif e.name.startswith(".") and e.name.endswith(".pt") and now - st.st_mtime > _STALE_TMP_S:
                    Path(e.path).unlink(missing_ok=True)  # left by a killed write
        return sorted(out, key=lambda r: (r[0], r[2].name))

    def disk_bytes(self) -> int:
        """Bytes the entries take on disk."""
        return sum(size for _, size, _ in self.entries())

    def evict(self) -> int:
        """Delete least recently used entries until the disk holds at most ``max_bytes``; returns
        how many were deleted."""
        rows = self.entries()
        total = sum(size for _, size, _ in rows)
        n = 0
        for _, size, path in rows:
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
            n += 1
        self.stats["evicted"] += n
        return n

    # ------------------------------------------------------------------ the predictor's entry point
    def embed(self, x: torch.Tensor, base: dict | Callable[[], dict],
              embed_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Embeddings (n, ...) of the model inputs x (n, C, S, S), slice by slice from the cache,
        the missing slices computed by ``embed_fn`` in one batch and stored.

        ``base``: the signature shared by the batch (``embedding_signature``), or a callable giving
        it (called once). The result is on ``x``'s device, in the order of ``x``.
        """
        base = base() if callable(base) else base
        sigs = [{**base, "input": {"sha256": tensor_digest(xi), "shape": list(xi.shape), "dtype": str(xi.dtype)}}
                for xi in x]
        found = [self.get(s) for s in sigs]
        missing = [i for i, t in enumerate(found) if t is None]
        if missing:
            fresh = embed_fn(x[missing] if len(missing) < len(found) else x)
            self.stats["computed"] += len(missing)
            for j, i in enumerate(missing):
                self.put(sigs[i], fresh[j])
                found[i] = fresh[j]
            if len(missing) == len(found):
                return fresh
        return torch.stack([t.to(x.device) for t in found])
