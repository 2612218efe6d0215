"""Predictors: one protocol, a family -> predictor table, strict options, no engine <-> predictor cycle,
and the per-voxel disagreement every predictor reports its uncertainty in."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from napari_genseg.engine import run_to_end, run_volume
from napari_genseg.models import registry
from napari_genseg.models.checkpoints import load_checkpoint
from napari_genseg.predictors import (
    ArSegPredictor,
    Predictor,
    SegmentationPredictor,
    make_predictor,
    predictor_class,
    register_predictor,
)
from napari_genseg.predictors.uncertainty import disagreement_percent, max_disagreement_percent
from napari_genseg.volume import Volume

SRC = Path(__file__).resolve().parents[1] / "src" / "napari_genseg"


def _imports(path: Path) -> set[str]:
    """Absolute module names a source file imports (relative imports resolved)."""
    pkg = ".".join(path.relative_to(SRC.parent).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = pkg.rsplit(".", node.level - 1)[0] if node.level else ""
            mod = ".".join(p for p in (base, node.module or "") if p)
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def test_engine_knows_only_the_protocol_and_predictors_never_import_the_engine():
    engine = {m for m in _imports(SRC / "engine.py") if m.startswith("napari_genseg.")}
    assert {m for m in engine if "predictors" in m} == {"napari_genseg.predictors.base",
                                                        "napari_genseg.predictors.base.Predictor"}
    assert not any(m.startswith("napari_genseg.models") for m in engine)
    for f in (SRC / "predictors").glob("*.py"):
        assert not any(m.startswith("napari_genseg.engine") for m in _imports(f)), f.name
    assert not (SRC / "arseg_engine.py").exists()
    # models never import predictors (the table lives in predictors/)
    for f in (SRC / "models").rglob("*.py"):
        assert not any(m.startswith("napari_genseg.predictors") for m in _imports(f)), f


def test_every_registered_family_has_a_predictor_following_the_protocol():
    for fam in registry.list_families():
        if fam.name == "testdouble":
            continue
        cls = predictor_class(fam.name)
        for name in ("set_image", "predict", "release", "from_checkpoint"):
            assert callable(getattr(cls, name, None)), (cls, name)
    assert predictor_class("msa2net") is SegmentationPredictor
    assert predictor_class("arseg") is ArSegPredictor
    with pytest.raises(KeyError, match="no predictor"):
        predictor_class("nope")
    with pytest.raises(ValueError, match="already has"):
        register_predictor("arseg", SegmentationPredictor)


def test_make_predictor_refuses_unknown_options(double_checkpoint, arseg_tiny_checkpoint):
    seg = load_checkpoint(double_checkpoint)
    ars = load_checkpoint(arseg_tiny_checkpoint)
    p = make_predictor(seg, device="cpu", return_probs=True)
    assert isinstance(p, SegmentationPredictor) and isinstance(p, Predictor) and p.return_probs
    a = make_predictor(ars, device="cpu", n_samples=3, target_class=2, seed=5)
    assert isinstance(a, ArSegPredictor) and isinstance(a, Predictor) and (a.n, a.target_class) == (3, 2)
    with pytest.raises(TypeError, match="n_samples"):  # an AR-Seg option given to a segmentation model
        make_predictor(seg, device="cpu", n_samples=4)
    with pytest.raises(TypeError, match="want_probs"):  # the old name is not silently dropped
        make_predictor(seg, device="cpu", want_probs=True)
    with pytest.raises(TypeError, match="return_probs"):
        make_predictor(ars, device="cpu", return_probs=True)
    with pytest.raises(TypeError, match="sample"):  # a typo
        make_predictor(ars, device="cpu", n_sample=4)


def test_predict_needs_an_image_and_release_drops_it(arseg_tiny_checkpoint):
    a = make_predictor(load_checkpoint(arseg_tiny_checkpoint), device="cpu", n_samples=2)
    with pytest.raises(RuntimeError, match="set_image"):
        a.predict()
    a.set_image(np.zeros((1, 40, 40), np.int16), (1.0, 1.0))
    assert a.predict()["votes"].shape == (1, 40, 40)
    a.release()
    with pytest.raises(RuntimeError, match="set_image"):
        a.predict()


def test_arseg_votes_are_the_decoded_samples(arseg_tiny_checkpoint):
    """The votes of a run, the decoded sample masks and the last scale of the progression are one
    count; the consensus is votes / N > threshold; labels carry the target class id."""
    a = make_predictor(load_checkpoint(arseg_tiny_checkpoint), device="cpu", n_samples=5, target_class=2)
    vol = Volume(np.random.default_rng(1).normal(0, 200, (3, 48, 40)).astype(np.float32), (2.0, 1.5, 1.0))
    res = run_to_end(run_volume(a, vol, slices=[0, 2], batch_size=2))
    for z in (0, 2):
        tokens, votes = res.extras["tokens"][z], res.extras["votes"][z]
        masks = a.decode_samples(tokens, (48, 40), (1.5, 1.0))
        assert masks.shape == (5, 48, 40) and masks.dtype == bool
        np.testing.assert_array_equal(masks.sum(0), votes)
        per_scale, full = a.decode_progression(tokens, (48, 40), (1.5, 1.0))
        assert per_scale.shape == (8, 48, 40) and per_scale.dtype == np.uint8
        np.testing.assert_array_equal(per_scale[-1], votes)
        np.testing.assert_array_equal(full, masks)
        np.testing.assert_array_equal(res.labels[z], np.where(votes > 2.5, 2, 0))
    assert set(np.unique(res.labels)) <= {0, 2} and res.labels[1].max() == 0


def test_disagreement_from_hand_made_votes():
    """Percent of N = 4 samples that disagree with the mask shown, counted by hand."""
    votes = np.array([0, 1, 2, 3, 4])
    shown_at_half = votes / 4 > 0.5            # [F, F, F, T, T]
    # 0 samples mark it, not shown: 0 disagree; 1 marks it, not shown: 1 of 4; 2: 2 of 4;
    # 3 mark it, shown: the 1 that does not disagrees; 4, shown: none
    np.testing.assert_array_equal(disagreement_percent(votes, 4, shown_at_half), [0, 25, 50, 25, 0])
    shown_at_02 = votes / 4 > 0.2             # [F, T, T, T, T]
    # 1 marks it and it is shown: the 3 others disagree (75 %)
    np.testing.assert_array_equal(disagreement_percent(votes, 4, shown_at_02), [0, 75, 50, 25, 0])
    # one prediction (a deterministic model): 100 % where the shown mask was changed against it
    np.testing.assert_array_equal(disagreement_percent(np.array([1, 0, 1]), 1, np.array([True, True, False])),
                                  [0, 100, 100])
    assert max_disagreement_percent(0.5) == 50.0 and max_disagreement_percent(0.2) == pytest.approx(80.0)
    with pytest.raises(ValueError):
        disagreement_percent(np.array([5]), 4, np.array([True]))
    with pytest.raises(ValueError):
        disagreement_percent(np.array([1, 2]), 4, np.array([True]))
