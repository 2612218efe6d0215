"""``genseg segment`` / ``genseg evaluate`` with the checkpoint's 3-D post-processing: on by
default (per-class line on stderr, report in the sidecar), ``--no-postprocess`` keeps the raw mask,
flags are warnings; ``evaluate --postprocess`` scores the cleaned mask beside the raw one.
The marker case (``_postprocess_case``): the raw mask is known voxel by voxel.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from _postprocess_case import DENSE, HOLE, ML, ORGAN, STRAY, _ct, _display, _save, post_checkpoint  # noqa: F401

from napari_genseg.cli import main
from napari_genseg.io.sidecar import read_sidecar

_RUN = ["--device", "cpu", "--threads", "1", "--quiet"]


def _segment(tmp_path, ck, *extra, left=False):
    img = _save(tmp_path / "ct.nii.gz", _ct(left))
    out = tmp_path / "mask.nii.gz"
    rc = main(["segment", str(img), "--model", "testdouble", "--checkpoint", str(ck), "--out", str(out),
               *_RUN, *extra])
    assert rc == 0
    return _display(out), read_sidecar(out)


def test_segment_postprocesses_by_default_and_reports(tmp_path, post_checkpoint, capsys):
    mask, side = _segment(tmp_path, post_checkpoint)
    err = capsys.readouterr().err
    assert not mask[STRAY].any()  # the stray piece is gone
    assert (mask[HOLE] == 1).all()  # the enclosed hole is filled
    assert (mask[DENSE] == 2).all()  # the undeclared class is untouched
    assert int((mask == 1).sum()) == 1120
    want = (f"soft: {1120 * ML:.1f} mL, 1 component (removed 1 component, {40 * ML:.1f} mL; "
            f"filled holes {18 * ML:.1f} mL)")
    assert want in err
    rep = side["postprocessing"]
    assert rep["enabled"] is True and rep["declared"]["soft"]["single_component"] is True
    soft = next(c for c in rep["classes"] if c["name"] == "soft")
    assert soft["volume_ml"] == pytest.approx(1120 * ML) and soft["removed_voxels"] == 40
    assert soft["components_before"] == 2 and soft["components_after"] == 1
    assert rep["flags"] == [] and "warning: soft" not in err


def test_no_postprocess_keeps_the_raw_mask(tmp_path, post_checkpoint, capsys):
    mask, side = _segment(tmp_path, post_checkpoint, "--no-postprocess")
    assert (mask[STRAY] == 1).all() and not mask[HOLE].any()
    assert int((mask == 1).sum()) == 1120 - 18 + 40
    assert "mL" not in capsys.readouterr().err
    assert side["postprocessing"]["enabled"] is False
    assert side["postprocessing"]["declared"] == {"soft": {"single_component": True, "fill_holes": True,
                                                           "side": "right"}}


def test_wrong_side_is_a_warning_and_in_the_sidecar(tmp_path, post_checkpoint, capsys):
    _, side = _segment(tmp_path, post_checkpoint, left=True)
    err = capsys.readouterr().err
    assert "warning: soft: lies on the patient's left" in err and "expected right" in err
    assert any("soft: lies on the patient's left" in w for w in side["warnings"])
    assert [f["kind"] for f in side["postprocessing"]["flags"]] == ["wrong_side"]


def test_cohort_sidecar_records_the_switch(tmp_path, post_checkpoint):
    cases = tmp_path / "cases"
    cases.mkdir()
    _save(cases / "a.nii.gz", _ct())
    out = tmp_path / "out"
    assert main(["segment", str(cases), "--model", "testdouble", "--checkpoint", str(post_checkpoint),
                 "--out", str(out), "--no-postprocess", *_RUN]) == 0
    assert read_sidecar(out)["postprocessing"]["enabled"] is False
    assert (_display(out / "a_mask.nii.gz")[STRAY] == 1).all()


def test_evaluate_postprocess_scores_both(tmp_path, post_checkpoint, capsys):
    img = _save(tmp_path / "ct.nii.gz", _ct())
    ref = np.zeros((12, 32, 32), np.uint8)
    ref[ORGAN] = 1
    ref[DENSE] = 2
    lbl = _save(tmp_path / "lbl.nii.gz", ref)
    js = tmp_path / "e.json"
    assert main(["evaluate", str(post_checkpoint), f"pairs:{img},{lbl}", "--postprocess", "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    dice = {(r["method"], r["class"]): r["dice"] for r in res["rows"]}
    assert dice[("model_postprocessed", "soft")] == pytest.approx(1.0)
    raw = 1120 - 18 + 40  # the raw mask: the hole missing, the stray piece added
    assert dice[("model", "soft")] == pytest.approx(2 * (1120 - 18) / (raw + 1120))
    assert dice[("model", "dense")] == dice[("model_postprocessed", "dense")] == pytest.approx(1.0)
    [case] = res["postprocessing"]
    assert res["postprocessing"][case]["classes"][0]["removed_voxels"] == 40
    assert "model_postprocessed" in capsys.readouterr().out
