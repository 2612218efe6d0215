"""DICOM SEG write/read time for a synthetic CT series (one thread).

    PYTHONPATH=src .venv/bin/python benchmarks/dicom_seg.py [--size 512 --slices 100 --classes 3]

Writes a ``size``² × ``slices`` CT series with pydicom (tests/_dicom_series.py), reads it, paints
``classes`` box-shaped classes (liver, spleen, kidney_right ... through most slices) and times:
``write_dicom_seg`` (re-reading the source headers, highdicom encoding, atomic save) and
``read_seg_labels`` (the SEG back onto the volume's grid); checks the round trip is exact.
Median of ``--repeat`` runs. Timing: one thread (``OMP_NUM_THREADS=1``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from _dicom_series import Series  # noqa: E402

from napari_genseg.io import read_dicom_series  # noqa: E402
from napari_genseg.io.dicom_seg import segment_classes, write_dicom_seg  # noqa: E402
from napari_genseg.io.seg_reference import read_seg_labels  # noqa: E402

NAMES = ["background", "liver", "spleen", "kidney_right", "kidney_left", "pancreas"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--slices", type=int, default=100)
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        s = Series(rows=args.size, cols=args.size, n=args.slices, pixel_spacing=(0.7, 0.7),
                   extra={"FrameOfReferenceUID": "1.2.826.0.1.3680043.9.7.1.9"})
        s.write(tmp / "ct")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vol = read_dicom_series(tmp / "ct")
        lab = np.zeros(vol.shape, np.uint8)
        z, y, x = vol.shape
        for c in range(1, args.classes + 1):
            x0 = (c - 1) * x // (args.classes + 1)
            lab[z // 10: z - z // 10, y // 4: 3 * y // 4, x0 + 4: x0 + x // (args.classes + 2)] = c
        names = NAMES[: args.classes + 1]
        w_times, r_times = [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            out = write_dicom_seg(tmp / "seg.dcm", lab, vol, names)
            w_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            back = read_seg_labels(out, vol, segments=segment_classes(out, names))
            r_times.append(time.perf_counter() - t0)
            assert np.array_equal(back, lab), "round trip differs"
        size_mb = out.stat().st_size / 1e6
    print(f"series {args.size}x{args.size}x{args.slices}, {args.classes} classes, "
          f"{int(lab.astype(bool).sum())} foreground voxels; OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")
    print(f"write_dicom_seg: median {np.median(w_times):.2f} s (runs {', '.join(f'{t:.2f}' for t in w_times)})")
    print(f"read_seg_labels: median {np.median(r_times):.2f} s (runs {', '.join(f'{t:.2f}' for t in r_times)})")
    print(f"SEG file {size_mb:.1f} MB; round trip exact")
    return 0


if __name__ == "__main__":
    sys.exit(main())
