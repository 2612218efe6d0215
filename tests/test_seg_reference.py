"""Reference DICOM SEG onto a CT grid: marker pixels land on the voxel their world position names."""

from pathlib import Path

import numpy as np
import pytest

from napari_genseg.io.seg_reference import SegReadError, read_seg_labels
from napari_genseg.volume import Volume

GE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom-robustness" / "ge-ct-3slice-liver"


def _seg(path, frames, ipps, iop, pixel_spacing, segs):
    """A minimal BINARY Segmentation object (PS3.3 C.8.20) written with pydicom."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.pixels import pack_bits
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SegmentationType = "SEG", "BINARY"
    ds.Rows, ds.Columns = frames.shape[1:]
    ds.NumberOfFrames = len(frames)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.BitsAllocated = ds.BitsStored = 1
    ds.HighBit = 0
    ds.SegmentSequence = Sequence([Dataset() for _ in sorted(set(segs))])
    for item, n in zip(ds.SegmentSequence, sorted(set(segs))):
        item.SegmentNumber, item.SegmentLabel = n, f"seg{n}"
    shared = Dataset()
    po, pm = Dataset(), Dataset()
    po.ImageOrientationPatient = list(iop)
    pm.PixelSpacing, pm.SliceThickness = list(pixel_spacing), 1.0
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = Sequence([po]), Sequence([pm])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per = []
    for ipp, s in zip(ipps, segs):
        f, pp, si = Dataset(), Dataset(), Dataset()
        pp.ImagePositionPatient = list(ipp)
        si.ReferencedSegmentNumber = s
        f.PlanePositionSequence, f.SegmentIdentificationSequence = Sequence([pp]), Sequence([si])
        per.append(f)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    ds.PixelData = pack_bits(frames.astype(np.uint8).ravel())
    ds.save_as(path, enforce_file_format=True)
    return path


def test_marker_pixels_land_on_their_voxels_with_a_negated_row_direction(tmp_path):
    # volume: (z, y, x) = (3, 6, 7), spacing (5, 2, 3) mm, voxel 0 at LPS (L, P, S) = (30, -20, 10)
    vol = Volume(np.zeros((3, 6, 7), np.int16), (5.0, 2.0, 3.0), origin=(10.0, -20.0, 30.0))
    frames = np.zeros((2, 4, 5), bool)
    frames[0, 1, 2] = True  # frame 0: segment 1
    frames[1, 0, 0] = True  # frame 1: segment 2
    # rows run toward the patient's RIGHT (-L): column c sits at L = 48 - 3c, i.e. x index 6 - c
    ipps = [(48.0, -18.0, 20.0), (48.0, -18.0, 10.0)]
    path = _seg(tmp_path / "seg.dcm", frames, ipps, (-1, 0, 0, 0, 1, 0), (2.0, 3.0), [1, 2])
    lab = read_seg_labels(path, vol)
    assert lab.shape == vol.shape
    assert np.argwhere(lab == 1).tolist() == [[2, 2, 4]]  # z 2, y 1 + 1, x 6 - 2
    assert np.argwhere(lab == 2).tolist() == [[0, 1, 6]]
    lab = read_seg_labels(path, vol, segments={2: 5})
    assert np.argwhere(lab).tolist() == [[0, 1, 6]] and lab.max() == 5


def test_a_seg_between_the_voxels_or_outside_is_refused(tmp_path):
    vol = Volume(np.zeros((3, 6, 7), np.int16), (5.0, 2.0, 3.0), origin=(10.0, -20.0, 30.0))
    frames = np.zeros((1, 4, 5), bool)
    frames[0, 1, 2] = True
    off = _seg(tmp_path / "off.dcm", frames, [(49.5, -18.0, 20.0)], (-1, 0, 0, 0, 1, 0), (2.0, 3.0), [1])
    with pytest.raises(SegReadError, match="between"):
        read_seg_labels(off, vol)
    out = _seg(tmp_path / "out.dcm", frames, [(48.0, -18.0, 40.0)], (-1, 0, 0, 0, 1, 0), (2.0, 3.0), [1])
    with pytest.raises(SegReadError, match="outside"):
        read_seg_labels(out, vol)
    with pytest.raises(SegReadError, match="not a DICOM"):
        read_seg_labels(_write(tmp_path / "x.dcm", b"not dicom"), vol)


def _write(p, b):
    p.write_bytes(b)
    return p


@pytest.mark.skipif(not GE.is_dir(), reason="../shared/data/dicom-robustness/ge-ct-3slice-liver absent")
def test_ge_reference_liver_lands_on_the_ct_slices_in_position_order():
    import warnings

    from napari_genseg.io import load_volume

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vol = load_volume(GE)
    lab = read_seg_labels(GE / "liver.dcm", vol)
    # the SEG's frames, in order of ImagePositionPatient z (-128.69, -127.69, -126.69), hold
    # 36233, 35645, 35220 liver pixels; z index grows toward superior
    assert lab.sum(axis=(1, 2)).tolist() == [36233, 35645, 35220]
    assert 20 < np.median(vol.data[lab == 1]) < 80  # liver HU on this non-contrast slice


def test_label_reader_places_a_dicom_seg_by_world_position(tmp_path):
    """``labels_for_image`` (the one reader of reference masks for evaluate and train) takes a SEG."""
    from napari_genseg.io.labels import labels_for_image

    vol = Volume(np.zeros((3, 6, 7), np.int16), (5.0, 2.0, 3.0), origin=(10.0, -20.0, 30.0))
    frames = np.zeros((1, 4, 5), bool)
    frames[0, 3, 4] = True
    path = _seg(tmp_path / "seg.dcm", frames, [(48.0, -18.0, 15.0)], (-1, 0, 0, 0, 1, 0), (2.0, 3.0), [1])
    lab, notes = labels_for_image(vol, path)
    assert np.argwhere(lab).tolist() == [[1, 4, 2]] and notes == []
