"""Build step only (all metadata is in pyproject.toml): put the shipped demo checkpoints into the wheel.

The repository keeps the demo weights with their model cards and training scripts in ``models/``.
A wheel must carry them too, or a plain ``pip install napari-genseg`` has no default model. This
``build_py`` copies ``models/*_demo.safetensors`` and their ``.json`` configs into
``napari_genseg/models/shipped/`` of the build, where
``napari_genseg.models.checkpoints.shipped_checkpoints_dir`` finds them. Editable installs skip
the copy (they read ``models/`` of the checkout).
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = ("*_demo.safetensors", "*_demo.json")


class BuildPyWithWeights(build_py):
    """``build_py`` plus the demo checkpoints (safetensors + JSON) from ``models/``."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        files = sorted(p for pattern in SHIPPED for p in (ROOT / "models").glob(pattern))
        if not any(p.suffix == ".safetensors" for p in files):
            raise SystemExit("models/ holds no *_demo.safetensors: the wheel would ship no default model")
        dst = Path(self.build_lib) / "napari_genseg" / "models" / "shipped"
        dst.mkdir(parents=True, exist_ok=True)
        for p in files:
            shutil.copyfile(p, dst / p.name)


setup(cmdclass={"build_py": BuildPyWithWeights})
