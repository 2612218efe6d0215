"""What a path holds: one case or a cohort. The one rule used by the CLI, the napari reader and
``load_volume``.

* a NIfTI file (``.nii``, ``.nii.gz``): one case;
* a DICOM file, whatever its name (``.dcm``, ``.IMA``, no extension, a UID): its series, found
  among the DICOM files of its folder;
* a DICOMDIR (PS3.10 media directory): the image files its records reference;
* a folder: every DICOM file below it (any name, any depth) is grouped by PatientID (0010,0020)
  and StudyInstanceUID (0020,000D). One study and no NIfTI file is **one case** (the series is
  chosen when it is read: the largest, others reported, ``--series`` picks), also when its series
  sit in subfolders. Several studies or patients, or NIfTI files beside them, make a **cohort**:
  one case per NIfTI file (top level only) and per study, named after the folder that holds
  the study alone (or PatientID_StudyDate);
* a ``.txt`` file: a cohort list, one existing path per line (blank lines and ``#`` comments
  skipped; relative paths are taken from the working folder, else from the list's folder). A
  ``.txt`` file that is not such a list is refused, never read as a cohort.

Anything else raises VolumeReadError with one line.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import one_line
from .dicom import dicom_files, read_dicom_headers, read_header, read_headers
from .dicom_frames import is_image_object
from .nifti import VolumeReadError, is_nifti_path, read_nifti

__all__ = ["Case", "Discovery", "discover", "discover_inputs", "looks_like_case", "case_name"]

_DICOMDIR_SOP = "1.2.840.10008.1.3.10"


def case_name(path: str | os.PathLike) -> str:
    """File or folder name without .nii/.nii.gz (a case's name in layers and outputs)."""
    name = Path(path).name
    for suf in (".nii.gz", ".nii"):
        if name.endswith(suf):
            return name[: -len(suf)]
    return name


@dataclass
class Case:
    """One volume to read.

    Attributes:
        name: for layer names and output files (``<name>_mask.nii.gz``).
        path: the NIfTI file, DICOM folder, DICOMDIR or DICOM file it came from.
        kind: "nifti" or "dicom".
        files: DICOM files of the case (read again when loaded), or None.
        headers: already-read ``[(path, dataset without pixels)]`` (single cases), or None.
        series_uid: the series to read (a single DICOM file was given), or None = the rule.
    """

    name: str
    path: Path
    kind: str
    files: tuple[Path, ...] | None = None
    headers: list | None = field(default=None, repr=False)
    series_uid: str | None = None

    def load(self, series_uid: str | None = None):
        """Read the case into a Volume (VolumeReadError with one line when it cannot)."""
        if self.kind == "nifti":
            return read_nifti(self.path)
        headers = self.headers if self.headers is not None else read_headers(self.files or ())
        return read_dicom_headers(headers, series_uid=series_uid or self.series_uid,
                                  source_path=self.path, name=self.name)


@dataclass
class Discovery:
    """The cases found; ``cohort`` is True for a cohort folder, a list file or several inputs."""

    cases: list[Case]
    cohort: bool
    notes: list[str] = field(default_factory=list)

    def single(self, what: str) -> Case:
        """The one case, or VolumeReadError naming the cases of a cohort."""
        if len(self.cases) == 1:
            return self.cases[0]
        names = ", ".join(c.name for c in self.cases[:6]) + (" ..." if len(self.cases) > 6 else "")
        raise VolumeReadError(f"{what} holds {len(self.cases)} cases (a cohort: {names}); give one case")


def looks_like_case(path: str | os.PathLike) -> bool:
    """Cheap test for readers: a folder, a NIfTI or .txt name, or a file that is DICOM by content."""
    p = Path(path)
    if p.is_dir() or is_nifti_path(p):
        return True
    if not p.is_file():
        return False
    if p.name.upper() == "DICOMDIR":
        return True
    try:
        with open(p, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return (len(head) == 132 and head[128:132] == b"DICM") or head[:2] in (b"\x02\x00", b"\x08\x00")


def discover(path: str | os.PathLike) -> Discovery:
    """The case(s) that ``path`` holds (see the module docstring); VolumeReadError otherwise."""
    p = Path(path).expanduser()
    if not p.exists():
        raise VolumeReadError(f"no such file or folder: {p}")
    if p.is_dir():
        return _discover_folder(p)
    if is_nifti_path(p):
        return Discovery([Case(case_name(p), p, "nifti")], cohort=False)
    if p.suffix.lower() == ".txt":
        return _discover_list(p)
    ds = read_header(p)
    if ds is None:
        raise VolumeReadError(f"{p.name} is neither NIfTI (.nii, .nii.gz), DICOM, a folder nor a "
                              f".txt list of cases")
    if p.name.upper() == "DICOMDIR" or str(getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", "")) == _DICOMDIR_SOP:
        return _discover_dicomdir(p, ds)
    if not is_image_object(ds):
        raise VolumeReadError(f"{p.name} is a DICOM {ds.get('Modality', '')} object without image slices "
                              f"(SOP class {ds.get('SOPClassUID', '?')})")
    siblings = [q for q in sorted(p.parent.iterdir()) if q.is_file() and not q.name.startswith(".")]
    headers = [(q, d) for q, d in read_headers(q for q in siblings if q != p)] + [(p, ds)]
    uid = str(ds.get("SeriesInstanceUID", "unknown"))
    headers = [(q, d) for q, d in headers if str(d.get("SeriesInstanceUID", "unknown")) == uid]
    return Discovery([Case(p.parent.name or p.stem, p, "dicom", headers=headers, series_uid=uid)],
                     cohort=False)


def discover_inputs(paths) -> Discovery:
    """Several command-line inputs: their cases in order (a cohort when more than one input)."""
    found = [discover(p) for p in paths]
    cases = [c for d in found for c in d.cases]
    _unique_names(cases)
    return Discovery(cases, cohort=len(found) > 1 or any(d.cohort for d in found),
                     notes=[n for d in found for n in d.notes])


def _discover_list(p: Path) -> Discovery:
    try:
        text = p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as exc:
        raise VolumeReadError(f"{p.name} is not a text list of case paths ({type(exc).__name__})") from exc
    entries = []
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        q = Path(line).expanduser()
        if not q.exists() and not q.is_absolute() and (p.parent / q).exists():
            q = p.parent / q
        if not q.exists():
            raise VolumeReadError(f"{p.name} line {n}: '{line[:80]}' is not an existing file or folder "
                                  f"(a .txt input must list one case path per line)")
        if q.suffix.lower() == ".txt":
            raise VolumeReadError(f"{p.name} line {n}: lists another list file ({q.name}); list cases only")
        entries.append(q)
    if not entries:
        raise VolumeReadError(f"{p.name} lists no case paths (a .txt input must list one case path per line)")
    found = [discover(q) for q in entries]
    cases = [c for d in found for c in d.cases]
    _unique_names(cases)
    return Discovery(cases, cohort=True, notes=[n for d in found for n in d.notes])


def _study_key(ds) -> tuple[str, str]:
    return str(ds.get("PatientID", "") or ""), str(ds.get("StudyInstanceUID", "") or "")


def _discover_folder(folder: Path) -> Discovery:
    niftis = sorted(q for q in folder.iterdir() if q.is_file() and is_nifti_path(q))
    headers = read_headers(q for q in dicom_files(folder) if not is_nifti_path(q))
    cases = [Case(case_name(q), q, "nifti") for q in niftis]
    studies, notes = _studies(headers)
    if not cases and len(studies) == 1:
        return Discovery([Case(folder.name, folder, "dicom", headers=headers)], cohort=False, notes=notes)
    cases += _study_cases(studies, folder)
    if not cases:
        raise VolumeReadError(f"{folder} holds no DICOM image or NIfTI file")
    _unique_names(cases)
    return Discovery(cases, cohort=len(cases) > 1, notes=notes)


def _studies(headers) -> tuple[dict[tuple[str, str], list], list[str]]:
    """(PatientID, StudyInstanceUID) -> headers, for studies that hold image objects."""
    studies: dict[tuple[str, str], list] = defaultdict(list)
    for q, ds in headers:
        studies[_study_key(ds)].append((q, ds))
    notes = []
    for key in [k for k, items in studies.items() if not any(is_image_object(d) for _, d in items)]:
        notes.append(f"ignored a study of {len(studies[key])} DICOM objects without image slices")
        del studies[key]
    return dict(studies), notes


def _study_cases(studies: dict, root: Path) -> list[Case]:
    """One case per study, named after the folder below ``root`` that holds it alone (its
    top-level subfolder, else the deepest folder common to its files), else PatientID_StudyDate."""
    dirs = {key: [q.parent.relative_to(root).parts for q, _ in items] for key, items in studies.items()}

    def owned(key, parts) -> bool:  # no other study has a file at or below root/parts
        n = len(parts)
        return bool(parts) and not any(d[:n] == parts for other, ds in dirs.items() if other != key for d in ds)

    cases = []
    for key, items in sorted(studies.items(), key=lambda kv: str(kv[1][0][0])):
        files = tuple(q for q, _ in items)
        top = dirs[key][0][:1]
        common = dirs[key][0]
        for d in dirs[key][1:]:
            n = 0
            while n < min(len(common), len(d)) and common[n] == d[n]:
                n += 1
            common = common[:n]
        for parts in (top, common):
            if all(d[:len(parts)] == parts for d in dirs[key]) and owned(key, parts):
                cases.append(Case("_".join(parts), root.joinpath(*parts), "dicom", files=files))
                break
        else:
            ds = items[0][1]
            label = "_".join(v for v in (str(ds.get("PatientID", "") or ""), str(ds.get("StudyDate", "") or ""))
                             if v) or "study_" + key[1][-8:]
            cases.append(Case(re.sub(r"[^A-Za-z0-9._-]+", "_", label), root, "dicom", files=files))
    return cases


def _unique_names(cases: list[Case]) -> None:
    seen: dict[str, int] = {}
    for c in cases:
        if c.name in seen:
            seen[c.name] += 1
            c.name = f"{c.name}_{seen[c.name]}"
        else:
            seen[c.name] = 1


def _resolve_ci(root: Path, parts) -> Path | None:
    """``root/parts...`` matching each component case-insensitively (ISO 9660 media)."""
    p = root
    for part in parts:
        exact = p / part
        if exact.exists():
            p = exact
            continue
        try:
            match = [q for q in p.iterdir() if q.name.upper() == str(part).upper()]
        except OSError:
            return None
        if not match:
            return None
        p = match[0]
    return p


def _discover_dicomdir(p: Path, ds) -> Discovery:
    import pydicom

    try:
        full = pydicom.dcmread(p)
    except Exception as exc:
        raise VolumeReadError(f"cannot read the DICOMDIR {p}: {one_line(exc)}") from exc
    files, missing = [], 0
    for rec in full.get("DirectoryRecordSequence", []):
        ref = rec.get("ReferencedFileID")
        if ref is None:
            continue
        parts = [ref] if isinstance(ref, str) else list(ref)
        q = _resolve_ci(p.parent, parts)
        if q is None or not q.is_file():
            missing += 1
        else:
            files.append(q)
    notes = [f"{missing} files referenced by the DICOMDIR are missing"] if missing else []
    headers = read_headers(files)
    studies, more = _studies(headers)
    notes += more
    if not studies:
        raise VolumeReadError(f"the DICOMDIR {p} references no DICOM image")
    if len(studies) == 1:
        return Discovery([Case(p.parent.name or "DICOMDIR", p, "dicom", headers=headers)], cohort=False,
                         notes=notes)
    cases = _study_cases(studies, p.parent)
    _unique_names(cases)
    return Discovery(cases, cohort=True, notes=notes)
