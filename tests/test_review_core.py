"""Review package without napari: uncertainty volume, metrics/stats + CSV, autosave (content hash,
atomic, due rules, a killed process) and the Save (NIfTI on the source geometry + review log)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from napari_genseg.engine import VolumeResult
from napari_genseg.review.autosave import Autosaver, find_autosave, image_key, load_autosave
from napari_genseg.review.log import review_log_path, review_record, save_review
from napari_genseg.review.queue import ReviewState
from napari_genseg.review.report import volume_metrics, volume_stats, write_csv
from napari_genseg.review.uncertainty import VoteVolume, votes_from_result

SRC = Path(__file__).resolve().parents[1] / "src"


def test_vote_volume_follows_the_mask_shown():
    votes = np.zeros((3, 2, 4, 4), np.uint8)
    votes[0] = 4  # every view: background everywhere ...
    votes[0, 0, 1, 1], votes[1, 0, 1, 1] = 1, 3  # ... but at (0, 1, 1) three of four say class 1
    vv = VoteVolume(votes, 4, [0])  # slice 1 was not run
    shown = np.zeros((2, 4, 4), np.uint8)
    d = vv.disagreement(shown)
    assert d[0, 1, 1] == 75.0 and d[0].sum() == 75.0 and d[1].max() == 0
    shown[0, 1, 1] = 1  # the reader paints it
    assert vv.disagreement(shown)[0, 1, 1] == 25.0
    assert vv.slice_scores(shown).tolist() == [25.0, 0.0]
    with pytest.raises(ValueError):
        vv.disagreement(shown[:, :3])


def test_votes_from_tta_and_arseg_results():
    labels = np.zeros((2, 3, 3), np.uint8)
    cv = {0: np.stack([np.full((3, 3), 2), np.full((3, 3), 2)]).astype(np.uint8)}
    vv = votes_from_result(VolumeResult(labels, [0], False, 0.0, extras={"class_votes": cv}), views=["a", "b", "c", "d"])
    assert vv.n == 4 and vv.votes.shape == (2, 2, 3, 3) and vv.z == [0]
    ar = {0: np.full((3, 3), 5, np.uint8), 1: np.zeros((3, 3), np.uint8)}
    vv = votes_from_result(VolumeResult(labels, [0, 1], False, 0.0, extras={"votes": ar}), n=8, target_class=2)
    assert vv.source == "arseg" and vv.votes.shape == (3, 2, 3, 3)
    # AR-Seg: consensus shown empty, 5 of 8 samples mark it -> 62.5 %, as disagreement_percent says
    assert vv.disagreement(labels)[0, 0, 0] == pytest.approx(62.5)
    with pytest.raises(ValueError):
        votes_from_result(VolumeResult(labels, [0], False, 0.0))


def test_metrics_rows_and_stats_by_hand(tmp_path):
    ref = np.zeros((4, 10, 10), np.uint8)
    ref[1:3, 2:6, 2:6] = 1
    mask = ref.copy()
    mask[1:3, 2:6, 5] = 0  # one column of 4 lost on both slices: Dice = 2·24/(24+32)
    mask[0, 0, 0] = 2  # a class the reference lacks
    rows = volume_metrics(mask, ref, (2.0, 1.0, 1.0), ["background", "liver", "spleen"])
    assert rows[0]["class"] == "liver" and rows[0]["dice"] == pytest.approx(48 / 56)
    assert rows[0]["iou"] == pytest.approx(24 / 32) and rows[0]["hd95_mm"] == pytest.approx(1.0)
    assert rows[1]["class"] == "spleen" and rows[1]["dice"] == 0 and np.isnan(rows[1]["hd95_mm"])
    img = np.zeros(ref.shape, np.float32)
    img[1] = 50.0
    img[2] = 70.0
    st = volume_stats(ref, img, (2.0, 0.5, 0.5), ["background", "liver"])
    assert st == [{"class": "liver", "volume_ml": pytest.approx(32 * 0.5 / 1000), "hu_mean": 60.0,
                   "hu_sd": 10.0, "voxels": 32}]
    out = write_csv(tmp_path / "m.csv", rows)
    lines = out.read_text().splitlines()
    assert lines[0] == "class,dice,iou,hd95_mm" and lines[2] == "spleen,0,0,"


def test_image_key_is_content_not_name():
    a = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    assert image_key(a, (1, 1, 1)) == image_key(a.copy(), (1.0, 1.0, 1.0))
    b = a.copy()
    b[2, 3, 4] += 1
    assert image_key(b, (1, 1, 1)) != image_key(a, (1, 1, 1))
    assert image_key(a, (1, 1, 1.5)) != image_key(a, (1, 1, 1))
    assert image_key(a.astype(np.float32), (1, 1, 1)) != image_key(a, (1, 1, 1))


def test_autosaver_is_due_every_n_edits_or_s_seconds(tmp_path):
    t = [0.0]
    saver = Autosaver(tmp_path, "k" * 64, every_edits=3, every_seconds=30, clock=lambda: t[0])
    mask = np.zeros((2, 3, 3), np.uint8)
    assert saver.maybe_save(mask, {}) is None
    saver.note_edit()
    saver.note_edit()
    assert not saver.due()
    t[0] = 31.0
    assert saver.maybe_save(mask, {}) is not None  # seconds since the first unsaved edit
    saver.note_edit(3)
    assert saver.due()  # edits
    saver.save(mask, {})
    assert not saver.due()
    saver.clear()
    assert find_autosave(tmp_path, "k" * 64) is None
    with pytest.raises(ValueError):
        Autosaver(tmp_path, "k", every_edits=0)


def test_autosave_survives_a_killed_process(tmp_path):
    """A child process autosaves mid-review and is killed (SIGKILL, no cleanup): its work comes back."""
    code = textwrap.dedent(f"""
        import os, signal, numpy as np
        from napari_genseg.review.autosave import Autosaver, image_key
        from napari_genseg.review.queue import ReviewState
        img = np.arange(2 * 8 * 8, dtype=np.int16).reshape(2, 8, 8)
        key = image_key(img, (2.0, 1.0, 1.0))
        saver = Autosaver({str(tmp_path)!r}, key, every_edits=2, every_seconds=3600, mask_name="ct [x]")
        mask = np.zeros(img.shape, np.uint8)
        state = ReviewState(2)
        for i in range(2):
            mask[1, i, i] = 1
            state.mark_edited(1)
            saver.note_edit()
            saver.maybe_save(mask, state.to_dict(), protect=mask > 0)
        mask[0] = 1  # an edit after the last autosave: lost with the process
        saver.note_edit()
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    img = np.arange(2 * 8 * 8, dtype=np.int16).reshape(2, 8, 8)
    info = find_autosave(tmp_path, image_key(img.copy(), (2.0, 1.0, 1.0)))
    assert info is not None and info.edits == 2 and info.mask_name == "ct [x]"
    mask, meta = load_autosave(info.path)
    expect = np.zeros(img.shape, np.uint8)
    expect[1, 0, 0] = expect[1, 1, 1] = 1
    np.testing.assert_array_equal(mask, expect)
    np.testing.assert_array_equal(meta["protect"], expect > 0)
    assert ReviewState.from_dict(meta["review"]).status == ["untouched", "edited"]
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind by the atomic writes


def test_save_review_writes_mask_on_source_geometry_and_log(tmp_path):
    import nibabel as nib

    from napari_genseg.io import read_nifti

    src = tmp_path / "ct.nii.gz"
    aff = np.diag([-0.8, 0.7, 2.5, 1.0])  # a flipped x axis: the display grid is not the stored one
    img = np.zeros((6, 5, 4), np.int16)
    nib.save(nib.Nifti1Image(img, aff), src)
    vol = read_nifti(src)
    mask = np.zeros(vol.shape, np.uint8)
    mask[1, 2, 3] = 1  # a marker voxel
    state = ReviewState(vol.shape[0])
    state.accept(1)
    rec = review_record(state.to_dict(), reader="Dr. A", run={"model": {"family": "msa2net", "checkpoint_sha256": "ab"}},
                        metrics={"kind": "stats", "rows": [{"class": "liver", "volume_ml": 0.001}]},
                        class_names=["background", "liver"])
    out, log = save_review(tmp_path / "ct_reviewed.nii.gz", mask, like=vol, run={"model": {"family": "msa2net"}}, record=rec)
    assert log == review_log_path(out) == tmp_path / "ct_reviewed.review.json"
    back = nib.load(out)
    np.testing.assert_array_equal(back.affine, nib.load(src).affine)
    # the marker lands on the source voxel the display voxel came from
    stored = np.asarray(back.dataobj)
    assert stored.sum() == 1
    assert read_nifti(out).data[1, 2, 3] == 1
    j = json.loads(log.read_text())
    assert j["format"] == "napari-genseg-review" and j["reader"] == "Dr. A"
    assert j["model"]["checkpoint_sha256"] == "ab"
    assert j["review"]["slices"] == [{"index": 1, "status": "accepted", "edits": 0, "changed": state.changed[1]}]
    assert j["metrics"]["rows"][0]["class"] == "liver"


def test_class_model_disagreement_matches_classes_by_name_and_by_id():
    from napari_genseg.review.uncertainty import class_model_disagreement

    shown = np.zeros((3, 4, 4), np.uint8)
    shown[1, :2] = 1  # liver
    shown[1, 2:] = 2  # spleen
    a = shown.copy()
    a[1, 0, 0] = 0  # misses one liver voxel
    b = (shown == 2).astype(np.uint8)  # a spleen-only model: its id 1 is spleen, it agrees
    per = class_model_disagreement(shown, ["background", "liver", "spleen"],
                                   [(a, ["background", "liver", "spleen"]), (b, ["background", "spleen"])])
    by = {cd.name: cd for cd in per}
    assert by["liver"].models == [0] and by["liver"].data[1, 0, 0] == 100.0 and by["liver"].data.sum() == 100.0
    assert by["spleen"].models == [0, 1] and not by["spleen"].data.any()
    assert by["liver"].slice_scores(shown).tolist() == [0.0, 100.0 / 8, 0.0]
    # without names: ids compared as they are
    per = class_model_disagreement(shown, None, [(b, None)])
    assert [cd.name for cd in per] == ["label 1", "label 2"] and per[1].data[1, 2, 0] == 100.0
    with pytest.raises(ValueError):
        class_model_disagreement(shown, None, [])
    with pytest.raises(ValueError):
        class_model_disagreement(shown, None, [(b[:2], None)])
