"""The wheel alone is a working install: build it, install it into a fresh venv outside the
checkout and segment a CT with the default model (its shipped weights come from the wheel).

The fresh venv reuses the already installed dependencies (torch, timm, nibabel ...) of the
interpreter running the tests through a ``.pth`` line, so nothing is downloaded; that interpreter's
editable install of this package is not seen (paths added by a ``.pth`` file do not run the
``.pth`` files inside them), and PYTHONPATH is removed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900, **kw)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def _source_copy(dst: Path) -> Path:
    """What an sdist holds (MANIFEST.in): project files, src/ and models/, no build leftovers."""
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        if (REPO / name).is_file():
            shutil.copy(REPO / name, dst / name)
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "shipped", "*.pyc")
    shutil.copytree(REPO / "src", dst / "src", ignore=skip)
    shutil.copytree(REPO / "models", dst / "models", ignore=skip)
    return dst


def test_wheel_installs_and_segments_with_the_shipped_model(ct_case, tmp_path):
    src = _source_copy(_mkdir(tmp_path / "source"))
    dist = _mkdir(tmp_path / "dist")
    build = _run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "--no-index",
                  "-w", dist, src])
    assert "is deprecated" not in build.stdout + build.stderr  # e.g. license as a TOML table
    [wheel] = dist.glob("napari_genseg-*.whl")
    assert wheel.stat().st_size > 20e6  # the two demo checkpoints are inside
    sample = REPO / "src" / "napari_genseg" / "data" / "ct_thorax_abdomen_unlabeled.nii.gz"
    with zipfile.ZipFile(wheel) as zf:  # the sample CT "Abdominal CT (real)" and its Apache-2.0 notice
        names = set(zf.namelist())
        for f in ("ct_thorax_abdomen_unlabeled.nii.gz", "NOTICE.md", "LICENSE-Apache-2.0.txt", "__init__.py"):
            assert f"napari_genseg/data/{f}" in names, f
        assert zf.read("napari_genseg/data/ct_thorax_abdomen_unlabeled.nii.gz") == sample.read_bytes()

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    py = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    here = sysconfig.get_paths()
    (site / "_genseg_test_deps.pth").write_text("\n".join(dict.fromkeys([here["purelib"], here["platlib"]])) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "GENSEG_MODELS_DIR")}
    env["HF_HUB_OFFLINE"] = "1"
    # --ignore-installed: the reused environment's own (editable) napari-genseg must not count
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "--ignore-installed",
          wheel], env=env)
    work = _mkdir(tmp_path / "elsewhere")
    where = _run([py, "-c", "import napari_genseg.models.checkpoints as c; print(c.__file__); "
                  "print(c.shipped_checkpoint('msa2net')); "
                  "from napari_genseg.data import sample_ct_path; print(sample_ct_path())"],
                 cwd=work, env=env).stdout.split()
    assert hashlib.sha256(Path(where[-1]).read_bytes()).digest() == hashlib.sha256(sample.read_bytes()).digest()
    for p in where:
        assert Path(p).resolve().is_relative_to(venv.resolve()), where
        assert not Path(p).resolve().is_relative_to(REPO), where

    n = nib.load(str(ct_case.path)).shape[2]
    a, b = n // 2 - 4, n // 2 + 4
    out = work / "mask.nii.gz"
    genseg = venv / ("Scripts/genseg.exe" if os.name == "nt" else "bin/genseg")
    seg = _run([genseg, "segment", ct_case.path, "--out", out, "--slices", f"{a}:{b}", "--device", "cpu",
                "--threads", "1", "--quiet"], cwd=work, env=env)
    got = np.asarray(nib.load(str(out)).dataobj)[..., a:b]
    ref = np.isin(np.asarray(nib.load(str(ct_case.labels)).dataobj)[..., a:b], ct_case.liver_ids)
    dice = 2.0 * float(((got == 1) & ref).sum()) / float((got == 1).sum() + ref.sum())
    print(f"wheel {wheel.name} {wheel.stat().st_size / 1e6:.1f} MB; {seg.stderr.strip()}; "
          f"liver Dice {dice:.3f} on {ct_case.source} slices {a}:{b}")
    assert dice > 0.8

    # the main job from the wheel alone: the shipped sample CT, mask + sidecar + overlay PNG
    demo = _run([genseg, "demo", "--headless", "--slices", "104:106", "--out", work / "demo", "--device", "cpu",
                 "--threads", "1", "--quiet"], cwd=work, env=env)
    assert "liver" in demo.stdout and " mL" in demo.stdout
    for f in ("mask.nii.gz", "mask.json", "overlay.png"):
        assert (work / "demo" / f"abdomen_ct_msa2net_{f}").is_file(), f


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True)
    return p
