"""Whole-process checks of the GUI plugin (fresh interpreters under the test X server)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.gui

CODE = (
    "import napari\n"
    "v = napari.Viewer(show=True)\n"  # the OpenGL canvas exists before the plugin loads
    "import napari_genseg.ui.segment_widget\n"
    "import timm\n"  # timm -> torchvision -> torch._dynamo -> (triton)
    "m = timm.create_model('maxvit_rmlp_pico_rw_256', pretrained=False, num_classes=0)\n"
    "v.close()\n"
    "print('ok')\n"
)


def test_plugin_survives_loading_timm_after_the_canvas():
    """Regression: triton's LLVM segfaulted the viewer when loaded after the GL canvas (llvmpipe)."""
    env = {k: v for k, v in os.environ.items() if k != "GENSEG_ALLOW_TRITON"}
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
