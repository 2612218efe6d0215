"""CLI side of the input checks, --hu-offset and the JSON sidecar of every output."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_genseg.cli import main

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def abdomen_checkpoint(tmp_path):
    """The test double saved as an abdomen checkpoint (the body-region check needs one)."""
    from _doubles import ThresholdConfig, ThresholdNet, register_double

    from napari_genseg.models.checkpoints import save_checkpoint

    register_double()
    cfg = ThresholdConfig()
    return save_checkpoint(
        tmp_path / "abd.safetensors", ThresholdNet(cfg), "testdouble", "testdouble_small", cfg,
        ["background", "soft", "dense"],
        {"normalization": {"kind": "hu_window", "low": -200.0, "high": 200.0}, "grid": "resize"},
        body_region="abdomen",
    )


def _segment(inp, ckpt, out, *extra):
    return main(["segment", str(inp), "--model", "testdouble", "--checkpoint", str(ckpt), "--out", str(out),
                 "--device", "cpu", "--batch-size", "16", "--quiet", *extra])


def test_info_says_head_series_is_not_hu(shared_data, capsys):
    head = shared_data / "dicom-ct-head"
    assert main(["info", str(head)]) == 0
    out = capsys.readouterr().out
    assert "value range: 0.0 .. 3926.0" in out and "HU range" not in out
    assert "NOT HU" in out and "--hu-offset -1024" in out
    assert "body region: head/neck" in out


def test_info_on_abdomen_says_hu_and_abdomen(abdomen_ct, capsys):
    assert main(["info", str(abdomen_ct)]) == 0
    out = capsys.readouterr().out
    assert "HU range:    -1100.0 .. 1207.0" in out and "intensity:   CT in HU" in out
    assert "body region: abdomen 30 of 30 slices" in out


def test_segment_head_series_warns_then_auto_offset_fixes_hu(shared_data, abdomen_checkpoint, tmp_path, capsys):
    head = shared_data / "dicom-ct-head"
    assert _segment(head, abdomen_checkpoint, tmp_path / "a.nii.gz") == 0
    err = capsys.readouterr().err
    warn = [line for line in err.splitlines() if line.startswith("warning:")]
    assert any("do not look like CT in HU" in w and "--hu-offset -1024" in w for w in warn)
    assert any("does not look like the abdomen" in w and "head/neck" in w for w in warn)
    assert _segment(head, abdomen_checkpoint, tmp_path / "b.nii.gz", "--hu-offset", "auto") == 0
    err = capsys.readouterr().err
    assert "added -1024 HU" in err and "do not look like CT in HU" not in err
    assert "does not look like the abdomen" in err
    side = json.loads((tmp_path / "b.json").read_text())
    assert side["input_checks"]["hu_offset"] == -1024 and side["input"]["hu_offset"] == -1024
    assert side["input_checks"]["hu"]["ok"] is True
    assert any("head/neck" in w for w in side["warnings"])


def test_bad_hu_offset_exits_2(abdomen_ct, double_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _segment(abdomen_ct, double_checkpoint, tmp_path / "m.nii.gz", "--hu-offset", "lots")
    assert exc.value.code == 2 and "--hu-offset must be a number of HU or 'auto'" in capsys.readouterr().err


def test_segment_writes_sidecar_with_model_hash_precision_backend_grid(abdomen_ct, double_checkpoint, tmp_path, capsys):
    out = tmp_path / "case_mask.nii.gz"
    assert _segment(abdomen_ct, double_checkpoint, out, "--slices", "0:4") == 0
    err = capsys.readouterr().err
    assert "warning:" not in err  # a real abdomen CT passes the checks quietly
    side = json.loads((tmp_path / "case_mask.json").read_text())
    from napari_genseg import __version__

    assert side["format"] == "napari-genseg-output" and side["package"]["version"] == __version__
    assert side["model"]["checkpoint_sha256"] == hashlib.sha256(Path(double_checkpoint).read_bytes()).hexdigest()
    assert side["model"]["family"] == "testdouble" and side["model"]["class_names"] == ["background", "soft", "dense"]
    inf = side["inference"]
    assert inf["precision"] == "fp32" and inf["backend"]["device"] == "cpu" and inf["backend"]["torch"]
    assert inf["backend"]["threads"] >= 1
    assert inf["grid"] == {"mode": "resize", "size": 32, "spacing_mm": None}
    assert inf["slices"] == "0-3" and inf["batch_size"] == 16
    assert "postprocessing" in side and side["input_checks"]["hu"]["ok"] is True
    assert side["input"]["shape_zyx"] == [30, 101, 122] and side["warnings"] == []


def test_sidecar_records_the_body_region_check(abdomen_ct, abdomen_checkpoint, tmp_path):
    assert _segment(abdomen_ct, abdomen_checkpoint, tmp_path / "m.nii.gz", "--slices", "0:1") == 0
    side = json.loads((tmp_path / "m.json").read_text())
    assert side["model"]["body_region"] == "abdomen"
    assert side["input_checks"]["body_region"]["counts"]["abdomen"] == 30


def test_cohort_folder_gets_a_run_record_and_every_mask_a_sidecar(abdomen_ct, abdomen_checkpoint, tmp_path):
    import shutil

    cases = tmp_path / "cases"
    cases.mkdir()
    for n in ("a", "b"):
        shutil.copy(abdomen_ct, cases / f"{n}.nii.gz")
    (cases / "c.nii.gz").write_bytes(b"not a nifti")
    out = tmp_path / "masks"
    assert _segment(cases, abdomen_checkpoint, out, "--slices", "0:2") == 1
    run = json.loads((out / "genseg_run.json").read_text())
    assert run["kind"] == "cohort" and run["model"]["checkpoint_sha256"]
    status = {Path(c["input"]).name: c["status"] for c in run["cases"]}
    assert status == {"a.nii.gz": "written", "b.nii.gz": "written", "c.nii.gz": "failed"}
    for n in ("a", "b"):
        assert json.loads((out / f"{n}_mask.json").read_text())["output"].endswith(f"{n}_mask.nii.gz")
    assert _segment(cases, abdomen_checkpoint, out, "--slices", "0:2") == 1
    run = json.loads((out / "genseg_run.json").read_text())
    assert [c["status"] for c in run["cases"]][:2] == ["skipped: mask exists"] * 2


def test_written_mask_sidecar_name_for_plain_nii(abdomen_ct, double_checkpoint, tmp_path):
    out = tmp_path / "x.nii"
    assert _segment(abdomen_ct, double_checkpoint, out, "--slices", "0:1") == 0
    assert (tmp_path / "x.json").is_file() and nib.load(str(out)).shape == (122, 101, 30)
    assert np.asarray(nib.load(str(out)).dataobj)[..., 1:].max() == 0


def test_cli_reports_unknown_spacing_in_info_and_sidecar(tmp_path, double_checkpoint, capsys):
    from test_pixdim import _raw_nifti

    p = _raw_nifti(tmp_path / "zero.nii.gz", (0.0, 0.0, 0.0))
    assert main(["info", str(p)]) == 0
    out = capsys.readouterr()
    assert "voxel spacing unknown" in out.out + out.err
    mask = tmp_path / "m.nii.gz"
    assert main(["segment", str(p), "--model", "testdouble", "--checkpoint", str(double_checkpoint),
                 "--out", str(mask), "--device", "cpu", "--quiet"]) == 0
    side = json.loads((tmp_path / "m.json").read_text())
    assert side["input"]["spacing_unknown"] is True
    assert any("voxel spacing unknown" in w for w in side["warnings"])
