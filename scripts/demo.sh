#!/usr/bin/env bash
# Set up (if needed) and run the main job: the shipped real abdomen CT ("Abdominal CT (real)",
# TotalSegmentator test data, Apache-2.0) + the default model.
#   bash scripts/demo.sh              napari opens with the CT, the Segment dock and the result
#   bash scripts/demo.sh --headless   prints per-class volumes (mL) and writes the mask (.nii.gz + .json
#                                     sidecar) and an overlay PNG to genseg-demo/
#   --input phantom                   the synthetic phantom instead (prints Dice vs its reference labels)
#   --input CT.nii.gz | DICOM folder  another CT;  --slices a:b  only those slices
# Without a display, the GUI form runs under xvfb-run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
if [[ " $* " != *" --headless "* && -z "${DISPLAY:-}" ]]; then
  exec xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/genseg demo "$@"
fi
exec .venv/bin/genseg demo "$@"
