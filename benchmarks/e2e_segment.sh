#!/bin/bash
# Whole-process `genseg segment` on a synthetic 512x512x300 CT: wall time and peak RSS of each run,
# two source trees interleaved (e.g. a commit before a change and the working tree), export cache
# warmed first. Prints one line per run; asserts nothing.
#   bash benchmarks/e2e_segment.sh OLD_SRC NEW_SRC [ROUNDS]    (e.g. /tmp/old/src src 2)
set -euo pipefail
OLD_SRC=${1:?old source tree (its src/)}; NEW_SRC=${2:?new source tree}; ROUNDS=${3:-2}
PY=${PY:-.venv/bin/python}
WORK=$(mktemp -d)
export HF_HUB_OFFLINE=1 GENSEG_CACHE_DIR=$WORK/cache
PYTHONPATH=benchmarks:$NEW_SRC $PY -c "
from pathlib import Path; from memory import synthetic_ct, write_nifti
write_nifti(Path('$WORK/ct300.nii.gz'), synthetic_ct(300))"
for src in "$OLD_SRC" "$NEW_SRC"; do  # fill the export cache (a 2-slice run)
  PYTHONPATH=$src $PY -m napari_genseg.cli segment "$WORK/ct300.nii.gz" --slices 0:2 --threads 1 \
    --out "$WORK/warm.nii.gz" 2>/dev/null; rm -f "$WORK"/warm.*
done
for round in $(seq "$ROUNDS"); do
  for tag in old new; do
    src=$OLD_SRC; [ $tag = new ] && src=$NEW_SRC
    l0=$(cut -d' ' -f1 /proc/loadavg)
    /usr/bin/time -f "%e %M" -o "$WORK/t" env PYTHONPATH=$src $PY -m napari_genseg.cli segment \
      "$WORK/ct300.nii.gz" --threads 1 --out "$WORK/m_${tag}_$round.nii.gz" 2>/dev/null
    read -r wall rss < "$WORK/t"
    echo "$tag round $round: wall ${wall} s, peak RSS $((rss / 1024)) MB, load $l0 -> $(cut -d' ' -f1 /proc/loadavg)"
  done
done
rm -rf "$WORK"
