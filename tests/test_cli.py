"""genseg CLI: segment (single case, cohort, resumable), info, bad input exit codes.

Every test runs without ../shared: ``ct_case`` is then the phantom written to NIfTI.
"""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest

from napari_genseg.cli import main

_RUN = ["--device", "cpu", "--threads", "1", "--quiet"]


def _stored(path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def _double_bands(ct_path):
    """What the exact test double must write for every voxel of ``ct_path`` (as stored), and
    where that is decided (not on the two band edges, -100 and 100 HU, where two classes tie)."""
    hu = nib.load(str(ct_path)).get_fdata()
    want = np.where(hu < -100, 0, np.where(hu < 100, 1, 2))
    return want, (hu != -100) & (hu != 100)


def _assert_double_mask(mask_path, ct_path, slices=None):
    want, decided = _double_bands(ct_path)
    got = _stored(mask_path)
    assert got.shape == want.shape
    if slices is not None:  # only these slices (stored z) were run; the rest stays background
        rest = np.ones(want.shape[2], bool)
        rest[slices] = False
        assert not got[..., rest].any()
        want, decided, got = want[..., slices], decided[..., slices], got[..., slices]
    assert {1, 2} <= set(np.unique(want[decided]).tolist())  # the case has both bands to find
    np.testing.assert_array_equal(got[decided], want[decided])


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_info_prints_geometry(ct_case, capsys):
    assert main(["info", str(ct_case.path)]) == 0
    out = capsys.readouterr().out
    img = nib.load(str(ct_case.path))
    hu = img.get_fdata()
    zooms = tuple(round(float(v), 4) for v in img.header.get_zooms()[::-1])
    assert f"{tuple(img.shape[::-1])} (z, y, x)" in out and f"{zooms} mm" in out
    assert f"stored {''.join(nib.aff2axcodes(img.affine))}" in out
    assert f"{hu.min():.1f} .. {hu.max():.1f}" in out


def test_segment_single_case_writes_every_voxel_on_source_geometry(ct_case, exact_double_checkpoint, tmp_path, capsys):
    out = tmp_path / "mask.nii.gz"
    rc = main(["segment", str(ct_case.path), "--model", "testdouble", "--checkpoint", str(exact_double_checkpoint),
               "--out", str(out), "--batch-size", "8", *_RUN])
    assert rc == 0
    np.testing.assert_array_equal(nib.load(str(out)).affine, nib.load(str(ct_case.path)).affine)
    _assert_double_mask(out, ct_case.path)
    assert "slices/s" in capsys.readouterr().err


def test_segment_default_model_finds_the_liver(ct_case, tmp_path):
    """The shipped msa2net demo weights (the default --model) on the middle slices: liver Dice
    against the reference labels (measured 0.97 on both the real CT and the phantom)."""
    n = nib.load(str(ct_case.path)).shape[2]
    a, b = n // 2 - 3, n // 2 + 3
    out = tmp_path / "mask.nii.gz"
    assert main(["segment", str(ct_case.path), "--out", str(out), "--slices", f"{a}:{b}", *_RUN]) == 0
    got, ref = _stored(out), _stored(ct_case.labels)
    liver = np.isin(ref[..., a:b], ct_case.liver_ids)
    assert _dice(got[..., a:b] == 1, liver) > 0.8
    assert not got[..., :a].any() and not got[..., b:].any()


def test_segment_cohort_is_resumable(ct_case, exact_double_checkpoint, tmp_path, capsys):
    cases = tmp_path / "cases"
    cases.mkdir()
    for n in ("a", "b"):
        shutil.copy(ct_case.path, cases / f"{n}.nii.gz")
    out = tmp_path / "masks"
    args = ["segment", str(cases), "--model", "testdouble", "--checkpoint", str(exact_double_checkpoint),
            "--out", str(out), "--slices", "0:2", *_RUN]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a_mask.json", "a_mask.nii.gz", "b_mask.json",
                                                     "b_mask.nii.gz", "genseg_run.json"]
    for n in ("a", "b"):
        _assert_double_mask(out / f"{n}_mask.nii.gz", ct_case.path, slices=[0, 1])
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*_mask.*")}
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().err.count("skip") == 2
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*_mask.*")} == before  # masks and sidecars kept


@pytest.mark.parametrize("extra,msg", [
    (["--slices", "5:5"], "empty slice range"),
    (["--slices", "0:100000"], "outside the volume"),
    (["--checkpoint", "/nonexistent.safetensors"], "not found"),
    (["--device", "gpu7"], "unknown device"),
])
def test_segment_bad_input_exits_2(ct_case, double_checkpoint, tmp_path, capsys, extra, msg):
    args = ["segment", str(ct_case.path), "--model", "testdouble", "--out", str(tmp_path / "m.nii.gz"), "--quiet"]
    if "--checkpoint" not in extra:
        args += ["--checkpoint", str(double_checkpoint)]
    assert main(args + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("genseg: error:") and msg in err[0]
    assert not (tmp_path / "m.nii.gz").exists()


def test_segment_refuses_to_overwrite_source(ct_case, double_checkpoint, tmp_path, capsys):
    src = tmp_path / "ct.nii.gz"
    shutil.copy(ct_case.path, src)
    before = src.read_bytes()
    rc = main(["segment", str(src), "--model", "testdouble", "--checkpoint", str(double_checkpoint),
               "--out", str(src), "--quiet"])
    assert rc == 2 and "refusing to overwrite" in capsys.readouterr().err
    assert src.read_bytes() == before


def test_bad_volume_and_wrong_model_checkpoint(tmp_path, double_checkpoint, capsys):
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4), np.int16), np.eye(4)), str(flat))
    assert main(["info", str(flat)]) == 2
    assert "not a 3-D CT volume" in capsys.readouterr().err
    vol = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 3), np.int16), np.eye(4)), str(vol))
    rc = main(["segment", str(vol), "--model", "msa2net", "--checkpoint", str(double_checkpoint),
               "--out", str(tmp_path / "o.nii.gz"), "--quiet"])
    assert rc == 2 and "testdouble checkpoint, not msa2net" in capsys.readouterr().err
    assert not (tmp_path / "o.nii.gz").exists()


def test_truncated_checkpoint_is_reported(double_checkpoint, ct_case, tmp_path, capsys):
    data = double_checkpoint.read_bytes()
    double_checkpoint.write_bytes(data[: len(data) // 2])
    rc = main(["segment", str(ct_case.path), "--model", "testdouble", "--checkpoint", str(double_checkpoint),
               "--out", str(tmp_path / "m.nii.gz"), "--quiet"])
    assert rc == 2 and "cannot read weights" in capsys.readouterr().err


def test_cohort_cases_split_across_torchrun_ranks(ct_case, exact_double_checkpoint, tmp_path, monkeypatch):
    cases = tmp_path / "cases"
    cases.mkdir()
    for n in ("a", "b", "c"):
        shutil.copy(ct_case.path, cases / f"{n}.nii.gz")
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(str(p) for p in sorted(cases.iterdir())))
    out = tmp_path / "masks"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["segment", str(lst), "--model", "testdouble", "--checkpoint", str(exact_double_checkpoint),
                 "--out", str(out), "--slices", "0:1", *_RUN]) == 0
    # rank 1 of 2 takes every 2nd case and writes its own run record
    assert sorted(p.name for p in out.iterdir()) == ["b_mask.json", "b_mask.nii.gz", "genseg_run.rank1.json"]
    _assert_double_mask(out / "b_mask.nii.gz", ct_case.path, slices=[0])


def test_threads_option_sets_torch_threads(ct_case, double_checkpoint, tmp_path):
    import torch

    before = torch.get_num_threads()
    try:
        assert main(["segment", str(ct_case.path), "--model", "testdouble", "--checkpoint", str(double_checkpoint),
                     "--out", str(tmp_path / "m.nii.gz"), "--slices", "0:1", "--threads", "1", "--quiet"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_models_lists_configs_params_classes_and_checkpoints(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "msa2net_paper [paper]     112.77 M" in out and "msa2net_released [paper]  93.66 M" in out
    assert "arseg_paper [paper]       101.45 M" in out
    assert "background, liver, spleen" in out and "msa2net_demo.safetensors" in out


def test_ct_case_is_the_phantom_without_shared(tmp_path, monkeypatch):
    """A clone without ../shared still has a labelled CT for the CLI tests."""
    from _ct_cases import find_ct_case

    monkeypatch.setenv("GENSEG_SHARED_DIR", str(tmp_path / "missing"))
    case = find_ct_case(tmp_path / "scratch")
    assert case.source == "phantom" and case.path.is_file() and case.labels.is_file()
    assert np.isin(_stored(case.labels), case.liver_ids).sum() > 1000
