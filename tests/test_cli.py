"""genseg CLI: segment (single case, cohort, resumable), info, bad input exit codes."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from napari_genseg.cli import main


def test_info_prints_geometry(abdomen_ct, capsys):
    assert main(["info", str(abdomen_ct)]) == 0
    out = capsys.readouterr().out
    assert "(30, 101, 122)" in out and "(3.0, 3.0, 3.0)" in out and "RAS" in out and "-1100.0 .. 1207.0" in out


def test_segment_single_case_writes_mask_on_source_geometry(abdomen_ct, double_checkpoint, tmp_path, capsys):
    out = tmp_path / "mask.nii.gz"
    rc = main(["segment", str(abdomen_ct), "--model", "testdouble", "--checkpoint", str(double_checkpoint),
               "--out", str(out), "--device", "cpu", "--batch-size", "8", "--quiet"])
    assert rc == 0
    src, m = nib.load(str(abdomen_ct)), nib.load(str(out))
    np.testing.assert_array_equal(m.affine, src.affine)
    assert m.shape == src.shape and set(np.unique(np.asarray(m.dataobj))) <= {0, 1, 2}
    assert "slices/s" in capsys.readouterr().err


def test_segment_cohort_is_resumable(abdomen_ct, double_checkpoint, tmp_path, capsys):
    import shutil

    cases = tmp_path / "cases"
    cases.mkdir()
    for n in ("a", "b"):
        shutil.copy(abdomen_ct, cases / f"{n}.nii.gz")
    out = tmp_path / "masks"
    args = ["segment", str(cases), "--model", "testdouble", "--checkpoint", str(double_checkpoint),
            "--out", str(out), "--device", "cpu", "--slices", "0:2", "--quiet"]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a_mask.json", "a_mask.nii.gz", "b_mask.json",
                                                     "b_mask.nii.gz", "genseg_run.json"]
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().err.count("skip") == 2


@pytest.mark.parametrize("extra,msg", [
    (["--slices", "5:5"], "empty slice range"),
    (["--checkpoint", "/nonexistent.safetensors"], "not found"),
])
def test_segment_bad_input_exits_2(abdomen_ct, double_checkpoint, tmp_path, capsys, extra, msg):
    args = ["segment", str(abdomen_ct), "--model", "testdouble", "--out", str(tmp_path / "m.nii.gz"), "--quiet"]
    if "--checkpoint" not in extra:
        args += ["--checkpoint", str(double_checkpoint)]
    assert main(args + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("genseg: error:") and msg in err
    assert not (tmp_path / "m.nii.gz").exists()


def test_segment_refuses_to_overwrite_source(abdomen_ct, double_checkpoint, tmp_path, capsys):
    import shutil

    src = tmp_path / "ct.nii.gz"
    shutil.copy(abdomen_ct, src)
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
    from napari_genseg.models import registry

    other = [f.name for f in registry.list_families() if f.name != "testdouble"]
    if other:
        vol = tmp_path / "v.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 3), np.int16), np.eye(4)), str(vol))
        rc = main(["segment", str(vol), "--model", other[0], "--checkpoint", str(double_checkpoint),
                   "--out", str(tmp_path / "o.nii.gz"), "--quiet"])
        assert rc == 2 and "testdouble checkpoint, not" in capsys.readouterr().err


def test_truncated_checkpoint_is_reported(double_checkpoint, abdomen_ct, tmp_path, capsys):
    data = double_checkpoint.read_bytes()
    double_checkpoint.write_bytes(data[: len(data) // 2])
    rc = main(["segment", str(abdomen_ct), "--model", "testdouble", "--checkpoint", str(double_checkpoint),
               "--out", str(tmp_path / "m.nii.gz"), "--quiet"])
    assert rc == 2 and "cannot read weights" in capsys.readouterr().err


def test_cohort_cases_split_across_torchrun_ranks(abdomen_ct, double_checkpoint, tmp_path, monkeypatch):
    import shutil

    cases = tmp_path / "cases"
    cases.mkdir()
    for n in ("a", "b", "c"):
        shutil.copy(abdomen_ct, cases / f"{n}.nii.gz")
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(str(p) for p in sorted(cases.iterdir())))
    out = tmp_path / "masks"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["segment", str(lst), "--model", "testdouble", "--checkpoint", str(double_checkpoint),
                 "--out", str(out), "--slices", "0:1", "--quiet"]) == 0
    # rank 1 of 2 takes every 2nd case and writes its own run record
    assert sorted(p.name for p in out.iterdir()) == ["b_mask.json", "b_mask.nii.gz", "genseg_run.rank1.json"]


def test_threads_option_sets_torch_threads(abdomen_ct, double_checkpoint, tmp_path):
    import torch

    before = torch.get_num_threads()
    try:
        assert main(["segment", str(abdomen_ct), "--model", "testdouble", "--checkpoint", str(double_checkpoint),
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
