"""DICOM SEG output (io/dicom_seg.py): marker round trips onto the source frames, codes, CLI."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from _dicom_series import Series, display_index_of

pytest.importorskip("highdicom")

from napari_genseg.errors import InputError  # noqa: E402
from napari_genseg.io import read_dicom_series  # noqa: E402
from napari_genseg.io.dicom_seg import segment_classes, write_dicom_seg  # noqa: E402
from napari_genseg.io.seg_reference import read_seg_labels  # noqa: E402

ROBUST = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "dicom-robustness"
GE = ROBUST / "ge-ct-3slice-liver"
ENHANCED = ROBUST / "enhanced-ct" / "eCT_Supplemental.dcm"
FOR = {"FrameOfReferenceUID": "1.2.826.0.1.3680043.9.7.1.9"}
NAMES = ["background", "liver", "kidney_right", "lesion"]


def _read(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_dicom_series(folder)


def _markers(vol) -> np.ndarray:
    lab = np.zeros(vol.shape, np.uint8)
    z, y, x = vol.shape
    lab[1, 2, 3] = 1
    lab[z - 2, y - 3, x - 4] = 2
    lab[z // 2, y // 2, 1] = 3
    lab[z // 2, y // 2, 2] = 1
    return lab


def _round_trip(tmp_path, series: Series, slices=None):
    series.write(tmp_path / "ct", slices)
    vol = _read(tmp_path / "ct")
    lab = _markers(vol)
    out = write_dicom_seg(tmp_path / "seg.dcm", lab, vol, NAMES, algorithm={"name": "m", "version": "1"})
    back = read_seg_labels(out, vol, segments=segment_classes(out, NAMES))
    return vol, lab, back, out


def test_plain_axial_markers_round_trip(tmp_path):
    _, lab, back, out = _round_trip(tmp_path, Series(extra=FOR))
    assert np.array_equal(back, lab)
    assert (tmp_path / "seg.json").is_file()  # the sidecar, as for NIfTI masks


def test_negated_row_direction_markers_round_trip(tmp_path):
    # row direction -1,0,0 (the corpus' Enhanced CT): display x runs against the stored columns
    vol, lab, back, _ = _round_trip(tmp_path, Series(iop=(-1.0, 0, 0, 0, 1.0, 0), extra=FOR))
    assert vol.source_affine[0, 0] > 0  # stored i runs to the patient's right: reoriented, not copied
    assert np.array_equal(back, lab)


def test_missing_slice_markers_round_trip_and_frames_reference_real_slices(tmp_path):
    import pydicom

    s = Series(n=8, extra=FOR)
    vol, lab, back, out = _round_trip(tmp_path, s, slices=[0, 1, 2, 4, 5, 6, 7])
    assert vol.shape[0] == 8  # slice 3 inserted as air
    assert np.array_equal(back, lab)
    ds = pydicom.dcmread(out)
    refs = {str(r.ReferencedSOPInstanceUID) for r in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert refs == {f"{s.series_uid}.{k + 1}" for k in (0, 1, 2, 4, 5, 6, 7)}


def test_gantry_tilt_marker_lands_on_the_source_voxel(tmp_path):
    """A sheared series is shown resampled; the SEG frames are the SOURCE slices, so the marker
    painted on the display voxel nearest source voxel (i, j, k) comes back on that voxel of slice k
    (read from the SEG's own frame geometry), and nowhere farther than one display voxel."""
    import pydicom

    tan20 = float(np.tan(np.deg2rad(20)))
    s = Series(n=10, step=(0, -2.5 * tan20, 2.5), gantry_tilt=-20, extra=FOR)
    s.write(tmp_path / "ct")
    vol = _read(tmp_path / "ct")
    assert vol.resampled
    i, j, k = 9, 13, 6
    w = s.world(i, j, k)
    zyx = np.rint(display_index_of(vol, w)).astype(int)
    lab = np.zeros(vol.shape, np.uint8)
    lab[tuple(zyx)] = 1
    out = write_dicom_seg(tmp_path / "seg.dcm", lab, vol, NAMES)
    ds = pydicom.dcmread(out)
    pix = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)
    hits = []
    for fi, fr in enumerate(ds.PerFrameFunctionalGroupsSequence):
        sop = str(fr.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        ipp = np.asarray(fr.PlanePositionSequence[0].ImagePositionPatient, float)
        for r, c in np.argwhere(pix[fi]):
            hits.append((sop, int(r), int(c), ipp + c * s.pixel_spacing[1] * np.r_[1.0, 0, 0]
                         + r * s.pixel_spacing[0] * np.r_[0, 1.0, 0]))
    assert (f"{s.series_uid}.{k + 1}", j, i) in {h[:3] for h in hits}
    half_diag = 0.5 * float(np.linalg.norm(vol.spacing))
    assert all(np.linalg.norm(h[3] - w) <= half_diag + 1e-6 for h in hits)


def test_codes_colours_and_algorithm_type_per_class(tmp_path):
    import pydicom

    Series(extra=FOR).write(tmp_path / "ct")
    vol = _read(tmp_path / "ct")
    lab = _markers(vol)
    out = write_dicom_seg(tmp_path / "seg.dcm", lab, vol, NAMES, edited_classes={"kidney_right"},
                          algorithm={"name": "msa2net demo", "version": "9", "checkpoint_sha256": "ab" * 32})
    ds = pydicom.dcmread(out)
    segs = {str(sd.SegmentLabel): sd for sd in ds.SegmentSequence}
    assert set(segs) == {"liver", "kidney_right", "lesion"}
    code = {n: (str(sd.SegmentedPropertyCategoryCodeSequence[0].CodeValue),
                str(sd.SegmentedPropertyTypeCodeSequence[0].CodeValue),
                str(sd.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator)) for n, sd in segs.items()}
    assert code == {"liver": ("91723000", "10200004", "SCT"), "kidney_right": ("91723000", "64033007", "SCT"),
                    "lesion": ("49755003", "52988006", "SCT")}
    assert str(segs["kidney_right"].SegmentedPropertyTypeModifierCodeSequence[0].CodeValue) == "24028007"  # right
    assert {n: sd.SegmentAlgorithmType for n, sd in segs.items()} == {
        "liver": "AUTOMATIC", "kidney_right": "SEMIAUTOMATIC", "lesion": "AUTOMATIC"}
    alg = segs["liver"].SegmentationAlgorithmIdentificationSequence[0]
    assert (alg.AlgorithmName, alg.AlgorithmVersion) == ("msa2net demo", "9")
    assert "ab" * 32 in str(alg.AlgorithmParameters)
    lab_values = {tuple(sd.RecommendedDisplayCIELabValue) for sd in segs.values()}
    assert len(lab_values) == 3 and all(v[0] > 20000 for v in lab_values)  # distinct, not near black
    assert ds.SegmentationType == "BINARY"


def test_non_dicom_source_is_refused_in_one_line(tmp_path):
    from napari_genseg.volume import Volume

    vol = Volume(np.zeros((3, 4, 5), np.int16), spacing=(1, 1, 1), source_affine=np.eye(4),
                 source_shape=(5, 4, 3), meta={"format": "nifti"})
    with pytest.raises(InputError, match="^DICOM SEG needs a DICOM source$"):
        write_dicom_seg(tmp_path / "x.dcm", np.ones((3, 4, 5), np.uint8), vol, ["bg", "liver"])


def test_source_without_frame_of_reference_is_refused_in_one_line(tmp_path):
    from napari_genseg.io import MaskWriteError

    Series().write(tmp_path / "ct")
    vol = _read(tmp_path / "ct")
    with pytest.raises(MaskWriteError, match="no FrameOfReferenceUID"):
        write_dicom_seg(tmp_path / "x.dcm", _markers(vol), vol, NAMES)
    assert not (tmp_path / "x.dcm").exists()


needs_ge = pytest.mark.skipif(not GE.is_dir(), reason="../shared/data/dicom-robustness is absent")


@pytest.mark.skipif(not ENHANCED.is_file(), reason="../shared/data/dicom-robustness is absent")
def test_enhanced_ct_with_negated_rows_markers_round_trip(tmp_path):
    """The corpus' Enhanced (multi-frame) CT has row direction -1,0,0: one source file, frames by index."""
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from napari_genseg.io import load_volume

        vol = load_volume(ENHANCED)
    assert vol.source_affine[0, 0] > 0  # stored columns run to the patient's right
    lab = np.zeros(vol.shape, np.uint8)
    z, y, x = vol.shape
    lab[0, y // 3, x // 4] = 1
    lab[z - 1, 2 * y // 3, 3 * x // 4] = 1
    lab[z - 1, y // 2, x // 2] = 2
    out = write_dicom_seg(tmp_path / "seg.dcm", lab, vol, ["background", "liver", "spleen"])
    assert np.array_equal(read_seg_labels(out, vol), lab)
    src = pydicom.dcmread(ENHANCED, stop_before_pixels=True)
    ds = pydicom.dcmread(out)
    refs = {str(fr.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
            for fr in ds.PerFrameFunctionalGroupsSequence}
    assert refs == {str(src.SOPInstanceUID)}


@needs_ge
def test_reference_seg_of_another_frame_of_reference_is_refused_in_one_line(tmp_path):
    """The GE liver SEG lies on the CT's positions; the same file with another FrameOfReferenceUID
    (a SEG made on another scan that shares the scanner grid) must not be placed by position,
    also after the image went through a napari layer's metadata."""
    import pydicom
    from pydicom.uid import generate_uid

    from napari_genseg.io.labels import labels_for_image
    from napari_genseg.io.seg_reference import SegReadError
    from napari_genseg.ui.layers import image_layer_data, volume_from_layer

    vol = _read(GE)
    assert vol.meta["frame_of_reference_uid"] == str(pydicom.dcmread(GE / "01.dcm").FrameOfReferenceUID)
    assert read_seg_labels(GE / "liver.dcm", vol).any()
    other = pydicom.dcmread(GE / "liver.dcm")
    other.FrameOfReferenceUID = generate_uid()
    other.save_as(tmp_path / "other_scan.dcm")
    kw = image_layer_data(vol, "ct")[1]
    via_layer = volume_from_layer(vol.data, kw["metadata"], kw.get("scale"), kw.get("translate"))
    for like in (vol, via_layer):
        for read in (lambda: read_seg_labels(tmp_path / "other_scan.dcm", like),
                     lambda: labels_for_image(like, tmp_path / "other_scan.dcm")):
            with pytest.raises(SegReadError, match="frame of reference") as ei:
                read()
            assert isinstance(ei.value, InputError) and "\n" not in str(ei.value)


@needs_ge
def test_seg_whose_segments_match_no_class_is_refused_not_read_by_segment_number(tmp_path):
    """``segment_classes`` maps segments to class ids by name; when no name matches it returns {},
    and ``read_seg_labels(segments={})`` fell back to the segment numbers: a "spleen" segment 1
    came back as class 1 of a model whose class 1 is the liver."""
    from napari_genseg.io.seg_reference import SegReadError

    vol = _read(GE)
    ref = read_seg_labels(GE / "liver.dcm", vol)
    out = write_dicom_seg(tmp_path / "spleen.dcm", ref, vol, ["background", "spleen"])
    names = ["background", "liver", "spleen"]
    back = read_seg_labels(out, vol, segments=segment_classes(out, names))
    assert set(np.unique(back)) == {0, 2}  # by name: spleen is class 2
    mapping = segment_classes(out, ["background", "liver"])
    assert mapping == {}
    with pytest.raises(SegReadError, match="none of its segments") as ei:
        read_seg_labels(out, vol, segments=mapping)
    assert "\n" not in str(ei.value)


@needs_ge
def test_ge_reference_liver_written_as_our_seg_matches_reference(tmp_path):
    import pydicom

    vol = _read(GE)
    ref = read_seg_labels(GE / "liver.dcm", vol)
    assert ref.any()
    out = write_dicom_seg(tmp_path / "liver_ours.dcm", ref, vol, ["background", "liver"])
    assert np.array_equal(read_seg_labels(out, vol), ref)

    def frames(path):
        ds = pydicom.dcmread(path)
        pix = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)
        return {str(fr.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID):
                (tuple(np.round(np.asarray(fr.PlanePositionSequence[0].ImagePositionPatient, float), 3)),
                 int(pix[i].sum())) for i, fr in enumerate(ds.PerFrameFunctionalGroupsSequence) if pix[i].any()}, ds

    theirs, a = frames(GE / "liver.dcm")
    ours, b = frames(out)
    assert ours == theirs  # same referenced instances, frame positions and liver pixels per frame
    assert str(b.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue) == "10200004"
    assert b.FrameOfReferenceUID == a.FrameOfReferenceUID


@needs_ge
def test_cli_segment_dicom_folder_to_seg(tmp_path, double_checkpoint, capsys):
    from napari_genseg.cli import main

    out = tmp_path / "x.dcm"
    rc = main(["segment", str(GE), "--model", "testdouble", "--checkpoint", str(double_checkpoint),
               "--out", str(out), "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    vol = _read(GE)
    names = ["background", "soft", "dense"]
    back = read_seg_labels(out, vol, segments=segment_classes(out, names))
    assert back.any() and set(np.unique(back)) <= {0, 1, 2}
    assert (tmp_path / "x.json").is_file()


def test_cli_refuses_seg_for_nifti_input(tmp_path, ct_case, double_checkpoint, capsys):
    from napari_genseg.cli import main

    rc = main(["segment", str(ct_case.path), "--model", "testdouble", "--checkpoint", str(double_checkpoint),
               "--out", str(tmp_path / "x.dcm")])
    assert rc != 0
    assert "DICOM SEG needs a DICOM source" in capsys.readouterr().err
    assert not (tmp_path / "x.dcm").exists()


def test_napari_writer_writes_seg_for_a_dicom_layer_and_refuses_others(tmp_path):
    import pandas as pd

    from napari_genseg.ui._io import write_dicom_seg_labels
    from napari_genseg.ui.layers import geometry_metadata

    Series(iop=(-1.0, 0, 0, 0, 1.0, 0), extra=FOR).write(tmp_path / "ct")
    vol = _read(tmp_path / "ct")
    lab = _markers(vol)
    meta = {"metadata": geometry_metadata(vol), **vol.layer_kwargs(),
            "features": pd.DataFrame({"index": range(4), "class": NAMES})}
    [out] = write_dicom_seg_labels(str(tmp_path / "w.dcm"), lab, meta)
    assert np.array_equal(read_seg_labels(out, vol, segments=segment_classes(out, NAMES)), lab)
    plain = {"metadata": {}, "scale": (1, 1, 1), "translate": (0, 0, 0)}
    with pytest.raises(InputError, match="DICOM SEG needs a DICOM source"):
        write_dicom_seg_labels(str(tmp_path / "p.dcm"), lab, plain)


@pytest.mark.gui
def test_review_dock_save_writes_seg_with_edited_class_semiautomatic(make_napari_viewer_proxy, double_checkpoint,
                                                                     tmp_path, monkeypatch):
    import pydicom

    from napari_genseg.ui._run import add_class_labels
    from napari_genseg.ui.layers import image_layer_data
    from napari_genseg.ui.review_dock import ReviewDock

    monkeypatch.setenv("GENSEG_AUTOSAVE_DIR", str(tmp_path / "autosave"))
    Series(extra=FOR).write(tmp_path / "ct")
    vol = _read(tmp_path / "ct")
    viewer = make_napari_viewer_proxy()
    d, kw, _ = image_layer_data(vol, "ct")
    img = viewer.add_image(d, **kw)
    mask = add_class_labels(viewer, img, "ct [model]", ["background", "liver", "spleen"])
    mask.data[2, 5, 6] = 1
    mask.data[4, 7, 8] = 2
    w = ReviewDock(viewer)
    w._image.value = img
    w._mask.value = mask
    mask.data_setitem((np.array([4]), np.array([7]), np.array([9])), 2)  # the reader paints spleen
    assert w.edited_classes == {2}
    w.save(tmp_path / "reviewed.nii.gz")
    seg = tmp_path / "reviewed.seg.dcm"
    assert w.last_seg == seg and seg.is_file()
    ds = pydicom.dcmread(seg)
    assert {str(s.SegmentLabel): s.SegmentAlgorithmType for s in ds.SegmentSequence} == {
        "liver": "AUTOMATIC", "spleen": "SEMIAUTOMATIC"}
    names = ["background", "liver", "spleen"]
    assert np.array_equal(read_seg_labels(seg, vol, segments=segment_classes(seg, names)), np.asarray(mask.data))


@needs_ge
def test_cli_cohort_out_format_dicom_seg(tmp_path, ct_case, double_checkpoint, capsys):
    """--out-format dicom-seg: <case>_seg.dcm per DICOM case; a NIfTI case fails alone, in one line."""
    import json

    from napari_genseg.cli import main

    rc = main(["segment", str(GE), str(ct_case.path), "--model", "testdouble", "--checkpoint",
               str(double_checkpoint), "--out", str(tmp_path / "out"), "--out-format", "dicom-seg", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 1 and "DICOM SEG needs a DICOM source" in err
    seg = tmp_path / "out" / f"{GE.name}_seg.dcm"
    assert read_seg_labels(seg, _read(GE)).any()
    cases = {c["input"]: c["status"] for c in json.loads((tmp_path / "out" / "genseg_run.json").read_text())["cases"]}
    assert cases[str(GE)] == "written" and cases[str(ct_case.path)] == "failed"


def test_every_shipped_class_has_its_snomed_code():
    """Classes of the shipped checkpoints, the phantoms and the Synapse configuration: SCT codes
    (values checked against pydicom's code dictionary, meaning included), none falls back to Tissue."""
    import json

    from pydicom.sr.codedict import codes

    from napari_genseg.io.dicom_seg import class_codes
    from napari_genseg.phantom_regions import TORSO_CLASSES

    expected = {"liver": "10200004", "spleen": "78961009", "kidney_right": "64033007", "kidney_left": "64033007",
                "bone": "272673000", "liver_lesion": "52988006", "urinary_bladder": "89837001", "lung": "39607008",
                "heart": "80891009", "bowel": "113276009", "pancreas": "15776009", "stomach": "69695003",
                "gallbladder": "28231008", "aorta": "15825003"}
    models = Path(__file__).resolve().parents[1] / "models"
    shipped = {n for f in models.glob("*.json") for n in json.loads(f.read_text()).get("class_names", [])}
    for name in (set(TORSO_CLASSES) | shipped | set(expected)) - {"background"}:
        category, ptype, lat, known = class_codes(name)
        assert known and ptype.scheme_designator == "SCT" and ptype.value == expected[name], name
        assert category.value == ("49755003" if name == "liver_lesion" else "91723000"), name
        assert lat == {"kidney_right": codes.SCT.Right, "kidney_left": codes.SCT.Left}.get(name), name
    assert class_codes("liver")[1] == codes.SCT.Liver and class_codes("soft")[3] is False
