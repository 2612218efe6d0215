#!/usr/bin/env bash
# Set up (if needed) and run the main job: the built-in phantom CT + the default model.
#   bash scripts/demo.sh              napari opens with the plugin docked and the result shown
#   bash scripts/demo.sh --headless   writes the mask (.nii.gz) and an overlay PNG to genseg-demo/
# Without a display, the GUI form runs under xvfb-run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
if [[ " $* " != *" --headless "* && -z "${DISPLAY:-}" ]]; then
  exec xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/genseg demo "$@"
fi
exec .venv/bin/genseg demo "$@"
