"""Layering: models/engine/io/metrics import without napari or Qt; the npe2 manifest is valid."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_core_layers_import_without_napari_or_qt():
    code = (
        "import sys\n"
        "for m in ('napari', 'qtpy', 'PyQt6', 'PyQt5', 'PySide6', 'magicgui'):\n"
        "    sys.modules[m] = None\n"
        "import napari_genseg.models.registry as r, napari_genseg.engine, napari_genseg.io,\\\n"
        "    napari_genseg.preprocessing, napari_genseg.volume, napari_genseg.cli\n"
        "import importlib\n"
        "for m in ('metrics', 'phantom', 'baselines', 'training'):\n"
        "    try:\n"
        "        importlib.import_module('napari_genseg.' + m)\n"
        "    except ModuleNotFoundError as e:\n"
        "        if e.name != 'napari_genseg.' + m: raise\n"
        "r.list_families()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_manifest_is_valid_and_named_after_distribution():
    from npe2 import PluginManifest

    mf = PluginManifest.from_distribution("napari-genseg")
    assert mf.name == "napari-genseg"
    assert {w.display_name for w in mf.contributions.widgets} >= {"Segment CT"}
    pats = mf.contributions.readers[0].filename_patterns
    assert "*.nii.gz" in pats and "*.gz" not in pats
    for cmd in mf.contributions.commands:
        mod, _, attr = cmd.python_name.partition(":")
        __import__(mod)
        assert hasattr(sys.modules[mod], attr), cmd.python_name
