"""Whole-process checks of the GUI plugin (fresh interpreters under the test X server)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.gui


def _run(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GENSEG_ALLOW_TRITON"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


def test_plugin_survives_loading_msa2net_after_the_canvas():
    """Regression: triton's LLVM segfaulted the viewer when the Segment dock loaded MSA²Net
    (timm -> torchvision -> triton) after the GL canvas existed (Mesa llvmpipe)."""
    out = _run(
        "import napari\n"
        "v = napari.Viewer(show=True)\n"  # the OpenGL canvas exists before the plugin loads a model
        "from napari_genseg.ui._run import load_model\n"
        "ck = load_model('msa2net', None)\n"  # the shipped demo weights: builds the timm backbone
        "import timm\n"
        "m = timm.create_model('maxvit_rmlp_pico_rw_256', pretrained=False, num_classes=0)\n"
        "v.close()\n"
        "print('ok', ck.family)\n"
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok msa2net")


def test_importing_the_plugin_leaves_triton_to_other_plugins():
    """The work-around is scoped: importing the plugin's widgets, reader and writer (and loading a
    model in a process without an LLVM-based GL canvas) does not hide triton from anyone."""
    out = _run(
        "import sys\n"
        "import napari_genseg.ui, napari_genseg.ui.segment_widget, napari_genseg.ui.arseg_explorer\n"
        "import napari_genseg.ui._io\n"
        "from napari_genseg.ui._run import load_model\n"
        "load_model('arseg', None)\n"
        "assert sys.modules.get('triton', 'absent') is not None, 'triton blocked'\n"
        "import triton\n"
        "print('ok')\n"
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
