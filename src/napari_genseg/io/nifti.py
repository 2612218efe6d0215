"""NIfTI in and out with geometry preserved.

Reading reorients the stored voxels to the display convention of :mod:`napari_genseg.volume`
(closest canonical axes, no resampling; a sheared grid is the one exception, see
:mod:`napari_genseg.io.shear`) and keeps the original affine and header. Writing a
mask undoes that reorientation and writes it with the source's affine and header, atomically.
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..volume import DISPLAY_AXCODES, Volume
from .atomic import atomic_path, check_writable_folder, same_file
from .shear import DisplayGrid, display_grid, labels_to_source, measure_shear, resample_to_display

__all__ = [
    "VolumeReadError",
    "MaskWriteError",
    "read_nifti",
    "volume_from_array",
    "write_mask",
    "labels_to_stored",
    "is_nifti_path",
]


class VolumeReadError(InputError, ValueError):
    """An input that is not a readable CT volume (message is one line, for users)."""


class MaskWriteError(InputError, RuntimeError):
    """A mask that cannot be written where asked (not a ValueError: napari would swallow it)."""


def is_nifti_path(path: str | os.PathLike) -> bool:
    name = str(path).lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _display_ornt(affine: np.ndarray):
    import nibabel.orientations as no

    start = no.io_orientation(affine)
    return no.ornt_transform(start, no.axcodes2ornt(DISPLAY_AXCODES))


def volume_from_array(
    data_ijk: np.ndarray,
    affine_ras: np.ndarray,
    header=None,
    source_path: str | None = None,
    meta: dict | None = None,
    order: int = 1,
    fill: float | None = None,
) -> Volume:
    """Build a display-convention Volume from a stored array (i, j, k) and its RAS affine.

    An orthogonal grid is reoriented to the display axes without resampling. A sheared grid
    (gantry tilt, :func:`napari_genseg.io.shear.measure_shear`) is resampled onto the
    axis-aligned grid that covers it (``order`` 1 = trilinear, 0 = nearest for labels; voxels
    outside the source take ``fill``, default the source minimum) with a warning giving the
    angle; the exact affine is kept for writing masks back.
    """
    import nibabel.orientations as no

    affine_ras = np.asarray(affine_ras, dtype=np.float64)
    if not np.all(np.isfinite(affine_ras)):
        raise VolumeReadError("the affine holds NaN/inf")
    shear = measure_shear(affine_ras, data_ijk.shape)
    if shear.sheared:
        return _resampled_volume(data_ijk, affine_ras, shear, header, source_path, meta, order, fill)
    ornt = _display_ornt(affine_ras)
    disp_xyz = no.apply_orientation(data_ijk, ornt)
    disp_aff = affine_ras @ no.inv_ornt_aff(ornt, data_ijk.shape)
    cols = disp_aff[:3, :3]
    spacing_xyz = np.sqrt((cols**2).sum(axis=0))
    if np.any(spacing_xyz <= 0) or not np.all(np.isfinite(spacing_xyz)):
        raise VolumeReadError(f"invalid voxel size {spacing_xyz} in the affine")
    p = disp_aff[:3, 3]  # RAS of voxel (0,0,0)
    origin = (p[2] + 0.0, -p[1] + 0.0, -p[0] + 0.0)  # (S, P, L); + 0.0 drops -0.0
    meta = dict(meta or {})
    direction = cols / spacing_xyz
    # oblique when the directions are not the signed unit axes of LPS display
    expected = np.diag([-1.0, -1.0, 1.0])
    cosines = np.abs(np.sum(direction * expected, axis=0))
    obliquity = float(np.degrees(np.arccos(np.clip(cosines.min(), -1.0, 1.0))))
    meta["obliquity_deg"] = round(obliquity, 3)
    if obliquity > 0.01:
        meta["oblique"] = True
    meta["source_axcodes"] = "".join(no.aff2axcodes(affine_ras))
    data = np.ascontiguousarray(np.transpose(disp_xyz, (2, 1, 0)))
    return Volume(
        data=data,
        spacing=(spacing_xyz[2], spacing_xyz[1], spacing_xyz[0]),
        origin=origin,
        source_affine=affine_ras,
        ornt=ornt,
        source_shape=tuple(int(s) for s in data_ijk.shape),
        source_header=header,
        source_path=source_path,
        meta=meta,
    )


def _resampled_volume(data_ijk, affine_ras, shear, header, source_path, meta, order, fill) -> Volume:
    import nibabel.orientations as no

    grid = display_grid(affine_ras, data_ijk.shape)
    data = resample_to_display(data_ijk, affine_ras, grid, order=order, fill=fill)
    meta = dict(meta or {})
    msg = (f"sheared voxel grid (slices tilted {shear.angle_deg:.2f} deg against their step, "
           f"{shear.drift_mm:.1f} mm across the volume: gantry tilt): shown resampled onto an "
           f"axis-aligned grid {data.shape} (z, y, x); masks are written back on the original "
           f"{tuple(int(s) for s in data_ijk.shape)} voxels with the exact sheared affine")
    warnings.warn(msg, stacklevel=3)
    meta.setdefault("warnings", []).append(msg)
    meta.update(sheared=True, shear_deg=shear.angle_deg, shear_drift_mm=round(shear.drift_mm, 3),
                obliquity_deg=0.0, source_axcodes="".join(no.aff2axcodes(affine_ras)))
    return Volume(
        data=data,
        spacing=grid.spacing,
        origin=grid.origin,
        source_affine=affine_ras,
        ornt=None,
        source_shape=tuple(int(s) for s in data_ijk.shape),
        source_header=header,
        source_path=source_path,
        meta=meta,
        resampled=True,
    )


@contextmanager
def _quiet_nibabel_log():
    """Raise nibabel's header-fix logger to ERROR for the block (its own LoggingOutputSuppressor
    loses the handler and still reaches logging's last-resort handler)."""
    from nibabel.imageglobals import logger

    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _raw_header(path: Path):
    """The NIfTI-1/2 header as stored (nibabel's load fixes zero/negative pixdim silently)."""
    import nibabel as nib
    from nibabel.openers import ImageOpener

    for klass in (nib.Nifti1Header, nib.Nifti2Header):
        try:
            with ImageOpener(str(path)) as f:
                hdr = klass.from_fileobj(f, check=False)
        except Exception:
            continue
        if int(hdr["sizeof_hdr"]) == klass.sizeof_hdr:
            return hdr
    return None


def _invalid_pixdim(path: Path) -> str | None:
    """One line when the voxel size comes from pixdim (no sform, NIfTI-1 standard section on
    qform/sform "method 1/2") and pixdim[1..3] holds zero, negative or non-finite values;
    None otherwise (a valid sform gives the spacing whatever pixdim says)."""
    hdr = _raw_header(path)
    if hdr is None or int(hdr["sform_code"]) > 0:
        return None
    ndim = max(1, min(3, int(hdr["dim"][0])))
    pix = np.asarray(hdr["pixdim"][1 : 1 + ndim], dtype=np.float64)
    bad = [i for i, v in enumerate(pix) if not np.isfinite(v) or v <= 0]
    if not bad:
        return None
    axes = ", ".join("ijk"[i] for i in bad)
    vals = ", ".join(f"{pix[i]:g}" for i in bad)
    if any(pix[i] == 0 or not np.isfinite(pix[i]) for i in bad):
        return (f"pixdim along {axes} is {vals} and there is no sform: voxel spacing unknown, "
                f"shown as 1 mm there (mm volumes and distances are not real)")
    return (f"pixdim along {axes} is {vals} (negative: invalid NIfTI) and there is no sform: "
            f"voxel spacing and direction uncertain, |pixdim| used")


#: bytes read from the file at once (a slab of whole slices along the stored k axis)
READ_SLAB_BYTES = 8 * 1024 * 1024


def _read_voxels(path: Path, img, shape, affine: np.ndarray, slope: float, inter: float):
    """The voxels of a NIfTI file as the array :func:`volume_from_array` takes (stored (i, j, k)
    order), read slab by slab (``READ_SLAB_BYTES`` of whole k-slices at a time) straight into
    their final place, and the count of NaN/inf voxels (set to -1024 HU).

    Memory: the result is the only whole-volume array. For an orthogonal grid it is a view of
    the display-order (z, y, x) array, so the reorientation in ``volume_from_array`` copies
    nothing; a sheared grid gets a stored-order (Fortran) array for its resampling. Integer
    voxels without scaling keep their dtype (native byte order); scaled (``scl_slope`` /
    ``scl_inter``) or float voxels become float32 (scaled in float64 one slab at a time). The
    old whole-file read held the decompressed bytes twice (``GzipFile`` has no ``readinto``) and
    float64 for scaled or float64 files.

    Raises VolumeReadError for a truncated or corrupt file.
    """
    import nibabel.orientations as no
    from nibabel.openers import ImageOpener

    proxy = img.dataobj
    file_dtype = np.dtype(proxy.dtype)
    scaled = slope != 1.0 or inter != 0.0
    out_dtype = np.dtype(np.float32) if scaled or file_dtype.kind == "f" else file_dtype.newbyteorder("=")
    if measure_shear(affine, shape).sheared:
        stored = np.empty(shape, out_dtype, order="F")  # resampled onto the display grid later
    else:
        ornt = _display_ornt(affine)
        disp_xyz = tuple(int(shape[int(ax)]) for ax in np.argsort(ornt[:, 0]))  # display (x, y, z)
        display = np.empty(disp_xyz[::-1], out_dtype)  # (z, y, x), C order: the Volume's data
        back = no.ornt_transform(no.axcodes2ornt(DISPLAY_AXCODES), no.io_orientation(affine))
        stored = no.apply_orientation(np.transpose(display, (2, 1, 0)), back)  # a view, (i, j, k)
        assert stored.shape == tuple(shape) and np.shares_memory(stored, display)
    ni, nj, nk = (int(v) for v in shape)
    per_k = ni * nj * file_dtype.itemsize
    step = max(1, min(nk, READ_SLAB_BYTES // max(per_k, 1)))
    buf = np.empty(ni * nj * step, file_dtype)
    n_nan = 0
    try:
        with ImageOpener(str(path)) as f:
            f.seek(int(proxy.offset))
            for k0 in range(0, nk, step):
                kn = min(step, nk - k0)
                raw = buf[: ni * nj * kn]
                view, got = memoryview(raw).cast("B"), 0
                while got < raw.nbytes:  # readinto may return less than asked before the end
                    n = f.readinto(view[got:])
                    if not n:
                        raise VolumeReadError(f"cannot read the voxels of {path.name} (truncated?): "
                                              f"{k0 * per_k + got} of {nk * per_k} bytes")
                    got += n
                slab = raw.reshape((ni, nj, kn), order="F")
                if scaled:
                    slab = slab.astype(np.float64) * slope + inter
                target = stored[:, :, k0 : k0 + kn]
                target[...] = slab
                if out_dtype.kind == "f":
                    bad = ~np.isfinite(target)
                    if bad.any():
                        n_nan += int(bad.sum())
                        target[bad] = -1024.0
    except VolumeReadError:
        raise
    except Exception as exc:  # corrupt gzip stream, I/O error
        raise VolumeReadError(f"cannot read the voxels of {path.name} (truncated?): {exc}") from exc
    return stored, n_nan


def read_nifti(path: str | os.PathLike) -> Volume:
    """Read a 3-D CT NIfTI (HU) into a display-convention Volume.

    Raises VolumeReadError with a one-line reason for unreadable, truncated, non-3-D, RGB or
    all-NaN inputs. NaN voxels are replaced by -1024 HU with a warning (the file is untouched).
    A header whose voxel size comes from pixdim (no sform) with zero or negative pixdim[1..3] is
    read with one warning and ``meta["spacing_unknown"] = True`` (kept in the layer metadata).
    """
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise VolumeReadError(f"no such file: {path}")
    bad_pixdim = _invalid_pixdim(path)
    try:
        if bad_pixdim:
            with _quiet_nibabel_log():  # our one-line warning below replaces nibabel's log line
                img = nib.load(str(path))
        else:
            img = nib.load(str(path))
    except Exception as exc:
        raise VolumeReadError(f"cannot read {path.name} as NIfTI: {exc}") from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise VolumeReadError(f"{path.name} is not a NIfTI image")
    hdr = img.header
    dtype = hdr.get_data_dtype()
    if dtype.fields is not None or dtype.kind not in "iufb":
        raise VolumeReadError(f"{path.name} holds {dtype} (RGB or non-scalar) voxels, not a CT volume")
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        kind = "2-D image" if len(shape) < 3 else f"{len(shape)}-D series (shape {img.shape})"
        raise VolumeReadError(f"{path.name} is a {kind}, not a 3-D CT volume")
    if min(shape) < 1:
        raise VolumeReadError(f"{path.name} is empty (shape {img.shape})")
    affine = img.affine
    if affine is None or not np.all(np.isfinite(affine)):
        raise VolumeReadError(f"{path.name} has no valid affine")
    # a loaded header reports no scaling; the array proxy holds scl_slope / scl_inter
    slope = float(getattr(img.dataobj, "slope", 1.0))
    inter = float(getattr(img.dataobj, "inter", 0.0))
    meta = {"format": "nifti", "dtype": str(dtype)}
    if slope != 1.0 or inter != 0.0:
        meta["scl_slope"], meta["scl_inter"] = slope, inter
    data, n_nan = _read_voxels(path, img, shape, np.asarray(affine, np.float64), slope, inter)
    if n_nan == data.size:
        raise VolumeReadError(f"{path.name} holds no finite voxel (all NaN/inf)")
    if n_nan:
        msg = f"{path.name}: {n_nan} NaN/inf voxels shown as -1024 HU (file unchanged)"
        warnings.warn(msg, stacklevel=2)
        meta["nan_voxels"] = n_nan
        meta.setdefault("warnings", []).append(msg)
    if bad_pixdim:
        msg = f"{path.name}: {bad_pixdim}"
        warnings.warn(msg, stacklevel=2)
        meta["spacing_unknown"] = True
        meta.setdefault("warnings", []).append(msg)
    # a sheared (resampled) grid is sampled by nearest neighbour when the file holds labels
    order = 0 if dtype.kind in "ub" else 1
    return volume_from_array(data, affine, header=hdr.copy(), source_path=str(path), meta=meta, order=order)


def _label_dtype(max_label: int):
    if max_label < 0:
        raise MaskWriteError("labels must be non-negative integers")
    if max_label <= np.iinfo(np.uint8).max:
        return np.uint8
    if max_label <= np.iinfo(np.uint16).max:
        return np.uint16
    raise MaskWriteError(f"label id {max_label} does not fit uint16")


def labels_to_stored(labels: np.ndarray, like: Volume, dtype=None) -> np.ndarray:
    """Display-grid labels ``(z, y, x)`` of ``like`` -> its source's stored ``(i, j, k)`` voxels.

    Reorients back (no resampling) for an orthogonal source; pulls a resampled (sheared, gantry
    tilt) display grid back onto the source voxels by nearest neighbour
    (:func:`napari_genseg.io.shear.labels_to_source`). Used by every mask writer (NIfTI, DICOM SEG).
    """
    import nibabel.orientations as no

    labels = np.asarray(labels)
    dtype = labels.dtype if dtype is None else dtype
    if like.resampled:
        grid = DisplayGrid(like.shape, like.spacing, like.origin)
        stored = labels_to_source(labels, grid, like.source_affine, like.source_shape, dtype)
    else:
        xyz = np.transpose(labels, (2, 1, 0))
        back = no.ornt_transform(no.axcodes2ornt(DISPLAY_AXCODES), no.io_orientation(like.source_affine))
        stored = no.apply_orientation(xyz, back).astype(dtype)
    assert like.source_shape is None or stored.shape == tuple(like.source_shape)
    return stored


def checked_mask_labels(path: Path, labels, like: Volume | None = None) -> np.ndarray:
    """The checks every mask writer (NIfTI, DICOM SEG) makes before writing ``labels`` to ``path``:
    a writable folder, a 3-D (z, y, x) array of non-negative integer ids (floats only when
    integral), of ``like``'s shape when given. Returns the labels as an array; raises
    :class:`MaskWriteError` (one line)."""
    try:
        check_writable_folder(path.parent)
    except InputError as exc:
        raise MaskWriteError(str(exc)) from None
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise MaskWriteError(f"labels must be 3-D (z, y, x); got shape {labels.shape}")
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            raise MaskWriteError("labels must be integers")
    if int(labels.min(initial=0)) < 0:
        raise MaskWriteError("labels must be non-negative integers")
    if like is not None and labels.shape != like.shape:
        raise MaskWriteError(f"labels shape {labels.shape} differs from the image {like.shape}")
    return labels


def write_mask(
    path: str | os.PathLike,
    labels: np.ndarray,
    like: Volume | None = None,
    spacing=None,
    origin=None,
    record: dict | None = None,
) -> Path:
    """Write a (z, y, x) label array as NIfTI on the geometry of ``like`` (its source voxels,
    affine and header), or, for a layer painted without reader metadata, on the display grid
    given by ``spacing``/``origin``. Atomic; refuses to overwrite the source image. Raises
    :class:`MaskWriteError` for a non-NIfTI name, the source image's path, a folder that cannot
    be written, or labels that are not a non-negative integer volume of the image's shape, and
    InputError when its sidecar would overwrite another file (``sidecar.check_sidecar_free``).

    Every mask gets its JSON sidecar beside it (``io/sidecar.py``: ``x.nii.gz`` -> ``x.json``)
    with the package version, the input's geometry and ``record`` (model, inference settings,
    input checks, warnings, post-processing: see ``run_record.py``)."""
    import nibabel as nib

    from .sidecar import check_sidecar_free, write_output_sidecar

    path = Path(path)
    if not is_nifti_path(path):
        raise MaskWriteError(f"{path.name}: mask output must end with .nii or .nii.gz")
    if like is not None and same_file(path, like.source_path):
        raise MaskWriteError(f"refusing to overwrite the source image {path}")
    check_sidecar_free(path, [like.source_path] if like is not None else ())
    labels = checked_mask_labels(path, labels, like)
    dtype = _label_dtype(int(labels.max()) if labels.size else 0)
    if like is not None:
        stored = labels_to_stored(labels, like, dtype)
        affine = like.source_affine
        if like.source_header is not None and isinstance(like.source_header, nib.Nifti1Header):
            hdr = like.source_header.copy()
            hdr.set_data_dtype(dtype)
            hdr.set_slope_inter(1.0, 0.0)
            img = nib.Nifti1Image(stored, affine, header=hdr)
            qform, qcode = like.source_header.get_qform(coded=True)
            sform, scode = like.source_header.get_sform(coded=True)
            if qcode:
                img.set_qform(qform, int(qcode))
            if scode:
                img.set_sform(sform, int(scode))
        else:
            img = nib.Nifti1Image(stored, affine)
            img.set_qform(affine, 1)
            img.set_sform(affine, 1)
    else:
        vol = Volume(labels, spacing=spacing or (1.0, 1.0, 1.0), origin=origin or (0.0, 0.0, 0.0))
        affine = vol.display_affine_ras
        img = nib.Nifti1Image(np.ascontiguousarray(np.transpose(labels, (2, 1, 0))).astype(dtype), affine)
        img.set_qform(affine, 1)
        img.set_sform(affine, 1)
    img.header["descrip"] = b"napari-genseg mask"
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    write_output_sidecar(path, like if like is not None else vol, record)
    return path
