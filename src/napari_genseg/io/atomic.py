"""Atomic file output: write to a temporary file beside the target, then rename over it.

``check_writable_folder`` tells before any work whether such a write can land in a folder.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import InputError

__all__ = ["atomic_path", "same_file", "default_mode", "check_writable_folder"]


def default_mode() -> int:
    """0o666 minus the process umask (what a plain open() would create)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _suffix(path: Path) -> str:
    name = path.name
    for multi in (".nii.gz", ".tar.gz"):
        if name.endswith(multi):
            return multi
    return path.suffix


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path (same folder, same suffix); on success rename it to ``path``.

    On any error the temporary file is removed and an existing ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_suffix(path))
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, default_mode())  # mkstemp creates 0600
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def same_file(a: str | os.PathLike | None, b: str | os.PathLike | None) -> bool:
    """True when both name the same existing file or the same resolved path."""
    if not a or not b:
        return False
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_writable_folder(folder: str | os.PathLike) -> None:
    """Raise :class:`~napari_genseg.errors.InputError` unless files can be created in ``folder``:
    it exists as a writable folder, or its nearest existing ancestor is one (``atomic_path``
    creates the missing folders). Probes by creating and removing an empty temporary file in that
    folder (``os.access`` passes for root even where nothing can be written); creates nothing else."""
    folder = Path(folder).absolute()
    anc = folder
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise InputError(f"cannot write into {folder}: {anc} is a file, not a folder")
    # os.access says yes to root everywhere (read-only mounts, /sys, /proc): really create a file
    try:
        fd, probe = tempfile.mkstemp(prefix=".genseg-probe-", dir=anc)
    except OSError as exc:
        raise InputError(f"cannot write into {folder}: creating a file in {anc} failed "
                         f"({exc.strerror or type(exc).__name__})") from None
    os.close(fd)
    os.unlink(probe)
