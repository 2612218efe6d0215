#!/usr/bin/env bash
# Set up a fresh machine: Xvfb + Qt xcb libraries (apt, when missing), a venv in .venv,
# the pinned torch first, then the package with its qt, testing, onnx and openvino extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PKGS=(xvfb xauth libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0
  libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 libdbus-1-3
  libgl1 libegl1 libfontconfig1 libglib2.0-0)
missing=()
for p in "${APT_PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  echo "setup: installing torch==2.14.1 torchvision==0.29.1 (pinned, first)"
  .venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
fi
if ! .venv/bin/python -c "import napari_genseg, napari, pytestqt, pytest_xvfb" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.genseg-installed ]; then
  echo "setup: installing napari-genseg[qt,testing,onnx,openvino] (editable)"
  .venv/bin/python -m pip install -q -e ".[qt,testing,onnx,openvino]"
  touch .venv/.genseg-installed
fi
