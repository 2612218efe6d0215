"""One case discovery for the CLI, the napari reader and cohorts (io/discovery.py)."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest
from _dicom_series import Series

from napari_genseg.cli import main
from napari_genseg.io import VolumeReadError, load_volume


def discover(path):
    from napari_genseg.io import discover as _discover  # new in this change; imported late so

    return _discover(path)  # the CLI tests also run (and fail) against the old code

UID_NAME = "1.2.826.0.1.3680043.9.7.1.1.1.{k}"  # PACS exports name files by their SOP UID


def _segment(double_checkpoint, *args):
    return main(["segment", *args, "--model", "testdouble", "--checkpoint", str(double_checkpoint),
                 "--device", "cpu", "--quiet"])


@pytest.mark.parametrize("name", ["IM{k:06d}", UID_NAME])
def test_segment_reads_extensionless_and_uid_named_dicom(tmp_path, double_checkpoint, name):
    s = Series(n=6, name=name)
    s.write(tmp_path / "export")
    out = tmp_path / "mask.nii.gz"
    assert _segment(double_checkpoint, str(tmp_path / "export"), "--out", str(out)) == 0
    assert nib.load(str(out)).shape == (s.cols, s.rows, 6)
    assert main(["info", str(tmp_path / "export")]) == 0
    # one of its files: its series
    one = next((tmp_path / "export").iterdir())
    assert load_volume(one).shape == (6, s.rows, s.cols)


def test_study_with_series_in_subfolders_is_one_case_and_series_picks(tmp_path, double_checkpoint, capsys):
    big = Series(n=8, series_uid="1.2.826.0.1.3680043.9.7.1.1.1")
    small = Series(n=5, series_uid="1.2.826.0.1.3680043.9.7.1.1.2", series_number=2, description="small")
    big.write(tmp_path / "study" / "SE000001")
    small.write(tmp_path / "study" / "SE000002")
    out = tmp_path / "m.nii.gz"
    assert _segment(double_checkpoint, str(tmp_path / "study"), "--out", str(out), "--series", small.series_uid) == 0
    assert nib.load(str(out)).shape[2] == 5
    with pytest.warns(UserWarning, match="holds 2 series; read the largest"):
        assert load_volume(tmp_path / "study").shape[0] == 8
    found = discover(tmp_path / "study")
    assert not found.cohort and [c.name for c in found.cases] == ["study"]


def test_single_uid_named_file_reads_its_own_series(tmp_path):
    big = Series(n=8, name=UID_NAME)
    small = Series(n=5, series_uid="1.2.826.0.1.3680043.9.7.1.1.2", name="1.2.826.0.1.3680043.9.7.1.1.2.{k}")
    big.write(tmp_path / "mixed")
    paths = small.write(tmp_path / "mixed")
    vol = load_volume(paths[2])
    assert vol.shape[0] == 5 and vol.meta["series_uid"] == small.series_uid


def test_cohort_folder_of_patients_studies_and_nifti(tmp_path, double_checkpoint, abdomen_ct):
    cohort = tmp_path / "cohort"
    Series(n=4, patient_id="P1", study_uid="1.2.826.0.1.3680043.9.7.2.1", name="IM{k:04d}").write(cohort / "pat1")
    Series(n=4, patient_id="P2", study_uid="1.2.826.0.1.3680043.9.7.2.2").write(cohort / "pat2" / "CT")
    shutil.copy(abdomen_ct, cohort / "ct.nii.gz")
    out = tmp_path / "masks"
    assert _segment(double_checkpoint, str(cohort), "--out", str(out), "--slices", "0:1") == 0
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["ct_mask.nii.gz", "pat1_mask.nii.gz", "pat2_mask.nii.gz"]
    found = discover(cohort)
    assert found.cohort and sorted(c.name for c in found.cases) == ["ct", "pat1", "pat2"]
    # two studies filed in one folder are two cases too
    flat = tmp_path / "flat"
    Series(n=3, patient_id="P1", study_uid="1.2.826.0.1.3680043.9.7.2.1", name="a{k}.dcm").write(flat)
    Series(n=3, patient_id="P2", study_uid="1.2.826.0.1.3680043.9.7.2.2", name="b{k}.dcm",
           series_uid="1.2.826.0.1.3680043.9.7.1.1.2").write(flat)
    found = discover(flat)
    assert found.cohort and sorted(c.name for c in found.cases) == ["P1_20240101", "P2_20240101"]
    assert [c.load().shape[0] for c in found.cases] == [3, 3]
    with pytest.raises(VolumeReadError, match="holds 2 cases"):
        load_volume(flat)  # info / napari read one case


def test_dicomdir_reads_the_study_it_indexes(tmp_path):
    from pydicom.fileset import FileSet

    s = Series(n=5, marker=(3, 4, 2))
    paths = s.write(tmp_path / "src")
    fs = FileSet()
    for p in paths:
        fs.add(p)
    fs.write(tmp_path / "media")  # DICOMDIR + PT000000/ST000000/SE000000/IM00000x (no extension)
    vol = load_volume(tmp_path / "media" / "DICOMDIR")
    ref = load_volume(tmp_path / "src")
    np.testing.assert_array_equal(vol.data, ref.data)
    assert vol.origin == ref.origin and vol.spacing == ref.spacing
    found = discover(tmp_path / "media" / "DICOMDIR")
    assert not found.cohort and len(found.cases) == 1


def test_txt_list_of_cases_and_refusal_of_other_text(tmp_path, double_checkpoint, abdomen_ct, capsys):
    cases = tmp_path / "cases"
    cases.mkdir()
    shutil.copy(abdomen_ct, cases / "a.nii.gz")
    Series(n=3, name="IM{k}").write(cases / "b")
    lst = cases / "list.txt"
    lst.write_text("# my cohort\na.nii.gz\n\nb\n")  # relative to the list's folder
    notes = tmp_path / "notes.txt"
    notes.write_text("patient was scanned twice\nsee the report\n")
    assert _segment(double_checkpoint, str(notes), "--out", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("genseg: error: notes.txt line 1")
    assert not (tmp_path / "out").exists()
    with pytest.raises(VolumeReadError, match="line 1: 'patient was scanned twice' is not an existing"):
        discover(notes)
    found = discover(lst)
    assert found.cohort and [c.name for c in found.cases] == ["a", "b"]


def test_bad_paths_have_one_line_reasons(tmp_path):
    (tmp_path / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    with pytest.raises(VolumeReadError, match="neither NIfTI"):
        load_volume(tmp_path / "picture.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VolumeReadError, match="holds no DICOM image or NIfTI file"):
        load_volume(tmp_path / "empty")


def test_napari_reader_takes_extensionless_dicom_and_refuses_cohorts(tmp_path):
    import npe2

    from napari_genseg.ui._io import get_reader

    s = Series(n=4, name="IM{k:06d}")
    paths = s.write(tmp_path / "export")
    pm = npe2.PluginManager.instance()
    pm.discover()
    for p in (paths[0], tmp_path / "export" / "1.2.840.113619.2.55.3.12"):
        assert "napari-genseg" in {r.plugin_name for r in pm.iter_compatible_readers([str(p)])}
    reader = get_reader(str(paths[0]))
    assert reader is not None
    [(data, kwargs, kind)] = reader(str(paths[0]))
    assert kind == "image" and data.shape == (4, s.rows, s.cols) and kwargs["name"] == "export"
    assert get_reader(str(tmp_path / "notes.txt")) is None
    Series(n=3, patient_id="P9", study_uid="1.2.826.0.1.3680043.9.7.2.9").write(tmp_path / "other")
    with pytest.raises(VolumeReadError, match="holds 2 cases"):
        get_reader(str(tmp_path))(str(tmp_path))
