"""The review queue on hand-made masks: each signal, the ranking, statuses and the progress line."""

from __future__ import annotations

import numpy as np
import pytest

from napari_genseg.review.queue import (
    ReviewState,
    area_jump_scores,
    flag_scores,
    rank_slices,
    reference_scores,
    small_component_scores,
)


def _liver(n=7, hw=20):
    m = np.zeros((n, hw, hw), np.uint8)
    m[1:6, 5:15, 5:15] = 1  # a box of liver on slices 1..5
    return m


def test_area_jump_finds_a_missing_slice_and_a_spike():
    m = _liver()
    m[3] = 0  # the model lost slice 3
    j = area_jump_scores(m)
    assert j.tolist() == [0, 0, 0, 1, 0, 0, 0]  # the box's own ends are no jumps
    m = _liver()
    m[3, 2:18, 2:18] = 1  # 256 voxels between two slices of 100
    j = area_jump_scores(m)
    assert j.argmax() == 3 and j[3] == pytest.approx((256 - 100) / 256)
    taper = np.zeros((5, 10, 10), np.uint8)
    for i, k in enumerate([1, 3, 5, 7, 9]):
        taper[i, :k, :k] = 1
    assert area_jump_scores(taper).tolist() == [0, 0, 0, 0, 0]
    assert area_jump_scores(np.zeros((4, 5, 5), np.uint8)).tolist() == [0, 0, 0, 0]


def test_small_components_count_islands_in_mm2():
    m = _liver()
    m[2, 0, 0] = 1  # one island of one voxel
    m[4, 0, 0] = 1
    m[4, 18:20, 18:20] = 1  # and one of 4 voxels
    s = small_component_scores(m, spacing=(3.0, 1.0, 1.0), min_component_mm2=10.0)
    assert s.tolist() == [0, 0, 0.5, 0, 1.0, 0, 0]
    # at 2 mm pixels the 4-voxel island is 16 mm²: no longer small
    s = small_component_scores(m, spacing=(3.0, 2.0, 2.0), min_component_mm2=10.0)
    assert s[4] == 0.5
    # diagonal neighbours are one piece (8-connectivity)
    m = _liver()
    m[2, 15, 15] = 1
    assert small_component_scores(m)[2] == 0


def test_reference_scores_are_one_minus_dice_per_slice():
    m = _liver()
    ref = m.copy()
    ref[2, 5:15, 5:10] = 0  # reference half as large on slice 2
    s = reference_scores(m, ref)
    assert s[2] == pytest.approx(1 - 2 * 50 / 150)
    assert s[0] == 0 and s[3] == 0
    with pytest.raises(ValueError):
        reference_scores(m, ref[:, :10])


def test_flags_hook_takes_reasons_indices_or_bools():
    s, why = flag_scores({3: "liver volume implausible"}, 5)
    assert s.tolist() == [0, 0, 0, 1, 0] and why == {3: "liver volume implausible"}
    assert flag_scores([1, 2], 5)[0].tolist() == [0, 1, 1, 0, 0]
    assert flag_scores(np.array([0, 0, 0, 0, 1], bool), 5)[0][4] == 1
    with pytest.raises(ValueError):
        flag_scores({9: "x"}, 5)


def test_ranking_combines_signals_and_skips_empty_slices():
    m = _liver(n=9)
    m[3] = 0  # missing slice: area jump 1
    unc = np.zeros(9)
    unc[5] = 80.0  # the model is unsure on slice 5
    items = rank_slices(m, uncertainty=unc, flags={1: "plausibility"})
    order = [it.index for it in items]
    top = {it.index: it for it in items}
    assert order[:3] == [1, 5, 3]  # flag 1.0 · 1, uncertainty 1.0 · 0.8, area jump 0.5 · 1
    assert [round(top[i].score, 6) for i in order[:3]] == [1.0, 0.8, 0.5]
    assert top[5].signals["uncertainty"] == pytest.approx(0.8)
    assert "plausibility" in top[1].reasons
    assert 7 not in top and 8 not in top  # empty, no signal
    # weights move slices: without area jumps the uncertain slice leads
    items = rank_slices(m, uncertainty=unc, weights={"area_jump": 0.0, "flags": 0.0})
    assert items[0].index == 5


def test_ranking_along_another_axis_and_reference():
    m = _liver()
    ref = m.copy()
    ref[:, :, 12:15] = 0  # reference disagrees on columns 12..14 (axis 2)
    items = rank_slices(m, axis=2, reference=ref, weights={"area_jump": 0, "small_components": 0})
    assert {it.index for it in items[:3]} == {12, 13, 14}
    assert all(it.signals["reference"] == 1.0 for it in items[:3])


def test_review_state_statuses_progress_and_round_trip():
    m = _liver()
    m[4:6, 0:3, 0:3] = 2  # spleen on slices 4 and 5
    st = ReviewState(7)
    assert st.progress(m, ["background", "liver", "spleen"]) == "0 of 5 slices with liver; 0 of 2 with spleen reviewed"
    st.accept(1)
    st.mark_edited([4, 4])
    st.flag(5)
    assert st.status[:6] == ["untouched", "accepted", "untouched", "untouched", "edited", "flagged"]
    assert st.edits[4] == 2
    st.accept(2)
    st.mark_edited(2)  # painting an accepted slice makes it edited
    assert st.status[2] == "edited" and st.accepted_slices() == [1]
    line = st.progress(m, ["background", "liver", "spleen"])
    assert line == "3 of 5 slices with liver; 1 of 2 with spleen reviewed, 1 flagged"
    again = ReviewState.from_dict(st.to_dict())
    assert again == st
    with pytest.raises(ValueError):
        st.set_status(0, "done")
    with pytest.raises(ValueError):
        st.accept(7)


def test_progress_line_exact_wording():
    m = np.zeros((40, 4, 4), np.uint8)
    m[:, 1, 1] = 1
    st = ReviewState(40)
    for i in range(12):
        st.accept(i)
    assert st.progress(m, ["background", "liver"]) == "12 of 40 slices with liver reviewed"


def test_model_disagreement_signal_ranks_where_models_differ():
    from napari_genseg.review.uncertainty import model_disagreement

    m = _liver()
    other_a, other_b = m.copy(), m.copy()
    other_a[4, 5:15, 5:10] = 2  # model A calls half of slice 4's liver spleen
    d = model_disagreement(m, [other_a, other_b])
    assert d[4, 6, 6] == 50.0 and d[4, 6, 12] == 0 and d[2].max() == 0
    assert model_disagreement(m, [other_a])[4, 6, 6] == 100.0
    from napari_genseg.predictors.uncertainty import slice_scores

    items = rank_slices(m, models=slice_scores(d, m), weights={"area_jump": 0})
    assert items[0].index == 4 and items[0].signals["models"] == pytest.approx(0.25)
    assert "models disagree" in items[0].reasons
    with pytest.raises(ValueError):
        model_disagreement(m, [])
