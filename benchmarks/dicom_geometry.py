"""DICOM geometry evidence: marker errors for gantry-tilted series, compressed syntaxes vs ground
truth, and the cost of resampling a tilted series for display.

    PYTHONPATH=src .venv/bin/python benchmarks/dicom_geometry.py [--size 512 --slices 200]

Tilted series (written with pydicom, 20° tilt, marker on the last slice) in three encodings:
prints the marker's error on screen (napari world = translate + index * scale, mm) and in the
written mask (world position of the marker's voxel under the written NIfTI affine vs the DICOM
position, mm). Runs against any version of the package (only load_volume/write_mask are used),
so it also measures the code before the fix. Compressed: the largest |difference| between the
read volume and dicom2nifti's ground-truth NIfTI at the same world positions (needs
../shared/data/dicom-robustness). Timing: one thread (``OMP_NUM_THREADS=1``).
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

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from _dicom_series import Series, nifti_world_lps, tilted_iop, world_of_display  # noqa: E402

from napari_genseg.io import load_volume, write_mask  # noqa: E402

TAN20 = float(np.tan(np.deg2rad(20)))
KINDS = {
    "tilted IOP + GantryDetectorTilt=20": dict(iop=tilted_iop(20), step=(0, 0, 2.5), gantry_tilt=20),
    "sheared positions, axial IOP": dict(step=(0, 2.5 * TAN20, 2.5)),
    "sheared positions + GantryDetectorTilt": dict(step=(0, -2.5 * TAN20, 2.5), gantry_tilt=-20),
}


def marker_errors(tmp: Path, n: int = 30) -> None:
    print(f"tilted series, {n} slices of 2.5 mm, marker at the last slice")
    print(f"{'kind':<40} {'screen mm':>10} {'voxels':>7} {'mask mm':>9} {'warned':>7}")
    for kind, kw in KINDS.items():
        s = Series(n=n, rows=48, cols=48, marker=(10, 40, n - 1), **kw)
        folder = tmp / kind.replace(" ", "_").replace("=", "").replace(",", "").replace("+", "")
        s.write(folder)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            vol = load_volume(folder)
        warned = any("deg" in str(w.message) for w in caught)
        p = s.world(*s.marker)
        peak = np.unravel_index(int(np.argmax(vol.data)), vol.shape)
        err = np.abs(world_of_display(vol, peak) - p)
        screen = float(np.linalg.norm(err))
        voxels = float(np.max(err / np.asarray(vol.spacing)[::-1]))  # largest per-axis error in voxels
        lab = np.zeros(vol.shape, np.uint8)  # a 3x3x3 block painted around the bright voxel
        z, y, x = peak
        lab[max(z - 1, 0):z + 2, max(y - 1, 0):y + 2, max(x - 1, 0):x + 2] = 1
        out = write_mask(folder.with_suffix(".nii.gz"), lab, like=vol)
        img = nib.load(str(out))
        stored = np.asarray(img.dataobj)
        hit = stored[s.marker] == 1 if stored.shape == (s.cols, s.rows, s.n) else False
        mask = float(np.linalg.norm(nifti_world_lps(img, s.marker) - p)) if hit else float("nan")
        print(f"{kind:<40} {screen:>10.2f} {voxels:>7.2f} {mask:>9.3f} {str(warned):>7}")


def compressed() -> None:
    base = ROOT.parent / "shared" / "data" / "dicom-robustness" / "dicom2nifti-compressed"
    if not base.is_dir():
        print(f"(compressed: {base} not found)")
        return
    print("compressed series vs dicom2nifti ground truth (all voxels, same world positions)")
    for name in ("compressed", "compressed_j2k", "compressed_jpeg", "compressed_jpegls", "compressed_rle"):
        folder = base / name / "001"
        import pydicom

        ts = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).file_meta.TransferSyntaxUID
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                vol = load_volume(folder)
        except Exception as exc:  # report, do not stop: this also runs against old code
            print(f"  {name:<18} {ts.name:<58} FAILED: {str(exc).splitlines()[0][:80]}")
            continue
        gt = nib.load(str(base / name / "001_ground_truth.nii.gz"))
        ref = np.asarray(gt.dataobj)
        ijk = np.indices(ref.shape).reshape(3, -1)
        ras = gt.affine[:3, :3] @ ijk + gt.affine[:3, 3:4]
        disp = np.linalg.inv(vol.display_affine_ras)
        xyz = np.rint(disp[:3, :3] @ ras + disp[:3, 3:4]).astype(int)
        diff = np.abs(vol.data[xyz[2], xyz[1], xyz[0]].astype(float) - ref.reshape(-1)).max()
        print(f"  {name:<18} {ts.name:<58} max |diff| = {diff:g} over {ref.size} voxels")


def timing(tmp: Path, size: int, slices: int) -> None:
    s = Series(n=slices, rows=size, cols=size, pixel_spacing=(0.5, 0.5), iop=tilted_iop(20),
               step=(0, 0, 0.625), name="IM{k:05d}")
    s.write(tmp / "big")
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vol = load_volume(tmp / "big")
    t_read = time.perf_counter() - t
    t = time.perf_counter()
    write_mask(tmp / "big.nii.gz", (vol.data > 0).astype(np.uint8), like=vol)
    t_write = time.perf_counter() - t
    print(f"tilted {size}x{size}x{slices} (20 deg): read + resample {t_read:.1f} s -> display {vol.shape}; "
          f"mask write-back {t_write:.1f} s (1 thread)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--slices", type=int, default=100)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        marker_errors(tmp)
        compressed()
        timing(tmp, a.size, a.slices)


if __name__ == "__main__":
    main()
