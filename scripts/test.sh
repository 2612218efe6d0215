#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite; GUI tests draw on Xvfb via pytest-xvfb.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
