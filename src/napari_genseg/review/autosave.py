"""Never lose review work: autosave of the working mask and the review state, and its restore.

Pure python/numpy. An image is recognised by its content, not its file name:
:func:`image_key` is the SHA-256 of the voxel bytes, shape, dtype and spacing (mm, rounded to
1 µm), so the same CT opened again from another path or as another series copy finds its autosave.

:class:`Autosaver` writes ``<folder>/<key[:24]>.genseg-autosave.npz`` (the mask, compressed, and
the review state as JSON) atomically (``io/atomic.py``: a crash mid-write leaves the previous
autosave intact) every ``every_edits`` edits or ``every_seconds`` seconds after an unsaved edit,
whichever comes first. The folder is the user's choice: the output's folder or, by default,
:func:`default_autosave_dir` (``$GENSEG_AUTOSAVE_DIR`` or the platform's user data folder,
e.g. ``~/.local/share/napari-genseg/autosave``). Nothing leaves the machine.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io.atomic import atomic_path

__all__ = ["image_key", "default_autosave_dir", "autosave_path", "AutosaveInfo", "find_autosave",
           "load_autosave", "Autosaver", "AUTOSAVE_SUFFIX"]

AUTOSAVE_SUFFIX = ".genseg-autosave.npz"


def image_key(data: np.ndarray, spacing) -> str:
    """SHA-256 (hex) of an image's voxels (C order), shape, dtype and spacing (sz, sy, sx) mm."""
    a = np.ascontiguousarray(np.asarray(data))
    h = hashlib.sha256()
    sp = ",".join(f"{float(s):.3f}" for s in spacing)
    h.update(f"{a.shape}|{a.dtype.str}|{sp}|".encode())
    flat = a.reshape(-1).view(np.uint8)
    step = 1 << 24
    for i in range(0, flat.size, step):
        h.update(flat[i : i + step].data)
    return h.hexdigest()


def default_autosave_dir() -> Path:
    """``$GENSEG_AUTOSAVE_DIR`` when set, else ``<user data dir>/napari-genseg/autosave``."""
    env = os.environ.get("GENSEG_AUTOSAVE_DIR")
    if env:
        return Path(env)
    try:
        from platformdirs import user_data_dir

        return Path(user_data_dir("napari-genseg", appauthor=False)) / "autosave"
    except ImportError:  # platformdirs comes with napari; the pure package may lack it
        return Path.home() / ".napari-genseg" / "autosave"


def autosave_path(folder: str | os.PathLike, key: str) -> Path:
    return Path(folder) / f"{key[:24]}{AUTOSAVE_SUFFIX}"


@dataclass
class AutosaveInfo:
    """An autosave found for an image: where, when (ISO time), edits recorded, mask name."""

    path: Path
    saved: str
    edits: int
    mask_name: str

    def describe(self) -> str:
        return f"autosave of {self.mask_name or 'a mask'} from {self.saved} ({self.edits} edits)"


def _read(path: Path) -> tuple[np.ndarray, dict]:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(bytes(z["meta"]).decode())
        if "protect" in z.files:
            meta["protect"] = np.unpackbits(z["protect"], count=int(np.prod(meta["protect_shape"]))).reshape(
                meta["protect_shape"]).astype(bool)
        return np.array(z["mask"]), meta


def find_autosave(folder: str | os.PathLike, key: str) -> AutosaveInfo | None:
    """The autosave of the image with content hash ``key`` in ``folder``, or None (also for an
    unreadable file or one whose recorded key differs)."""
    p = autosave_path(folder, key)
    if not p.is_file():
        return None
    try:
        with np.load(p, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
    except (OSError, ValueError, KeyError):
        return None
    if meta.get("image_key") != key:
        return None
    edits = int(sum((meta.get("review") or {}).get("edits") or [0]))
    return AutosaveInfo(p, str(meta.get("saved", "")), edits, str(meta.get("mask_name", "")))


def load_autosave(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """(mask (Z, H, W), meta: {"image_key", "saved", "mask_name", "review": ReviewState dict,
    "protect": (Z, H, W) bool voxels the reader painted (when saved), ...})."""
    return _read(Path(path))


class Autosaver:
    """Autosave of one image's review (see the module docstring).

    ``note_edit()`` after every edit; ``maybe_save(mask, review, **extra)`` saves when due and
    returns the path (None when not due); ``save`` saves now; ``clear`` removes the autosave
    (after the reader saved). ``clock`` is injectable for tests. Raises ``ValueError`` for
    non-positive intervals.
    """

    def __init__(self, folder: str | os.PathLike, key: str, every_edits: int = 10,
                 every_seconds: float = 60.0, mask_name: str = "", clock=time.monotonic):
        if every_edits < 1 or every_seconds <= 0:
            raise ValueError("autosave needs every_edits >= 1 and every_seconds > 0")
        self.folder = Path(folder)
        self.key = key
        self.every_edits = int(every_edits)
        self.every_seconds = float(every_seconds)
        self.mask_name = mask_name
        self.clock = clock
        self.pending = 0
        self._dirty_since: float | None = None
        self.last_path: Path | None = None

    @property
    def path(self) -> Path:
        return autosave_path(self.folder, self.key)

    def note_edit(self, n: int = 1) -> None:
        self.pending += int(n)
        if self._dirty_since is None:
            self._dirty_since = self.clock()

    def due(self) -> bool:
        if not self.pending:
            return False
        return self.pending >= self.every_edits or self.clock() - self._dirty_since >= self.every_seconds

    def maybe_save(self, mask: np.ndarray, review: dict, protect: np.ndarray | None = None, **extra) -> Path | None:
        return self.save(mask, review, protect, **extra) if self.due() else None

    def save(self, mask: np.ndarray, review: dict, protect: np.ndarray | None = None, **extra) -> Path:
        """Write the autosave now (atomic): the mask, the review state (``ReviewState.to_dict()``),
        optionally the protection mask (bool, bit-packed) and ``extra`` JSON keys; returns its path."""
        meta = {"image_key": self.key, "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "mask_name": self.mask_name, "review": review, **extra}
        arrays = {"mask": np.asarray(mask)}
        if protect is not None:
            arrays["protect"] = np.packbits(np.asarray(protect, dtype=bool).ravel())
            meta["protect_shape"] = list(np.shape(protect))
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
        with atomic_path(self.path) as tmp:
            tmp.write_bytes(buf.getvalue())
        self.pending = 0
        self._dirty_since = None
        self.last_path = self.path
        return self.path

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
        self.pending = 0
        self._dirty_since = None
