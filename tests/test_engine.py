"""Engine: batching, slice ranges, cancel mid-run, device fallback, precision, grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_genseg.engine import parse_slices, run_to_end, run_volume
from napari_genseg.predictors import SegmentationPredictor
from napari_genseg.preprocessing import Normalization, SliceGrid, window_limits
from napari_genseg.volume import Volume

from _doubles import ThresholdConfig, ThresholdNet


class CountingNet(ThresholdNet):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.batches = []

    def forward(self, x):
        self.batches.append(x.shape[0])
        return super().forward(x)


def _volume(z=10, hw=24):
    data = np.full((z, hw, hw), -1000, np.int16)
    data[:, 6:18, 6:18] = 0     # soft tissue -> class 1 under window [-200, 200]
    data[:, 10:14, 10:14] = 900  # dense -> class 2
    return Volume(data, spacing=(3.0, 1.0, 1.0))


def _predictor(model=None, grid=None, **kw):
    model = model or ThresholdNet(ThresholdConfig())
    return SegmentationPredictor(model, ["bg", "soft", "dense"], Normalization("hu_window", -200, 200),
                                 grid or SliceGrid(32), device="cpu", **kw)


def test_labels_and_probs_all_slices():
    vol = _volume()
    res = run_to_end(run_volume(_predictor(return_probs=True), vol, batch_size=3))
    assert res.z == list(range(10)) and not res.cancelled
    assert res.labels.shape == vol.shape and res.labels.dtype == np.uint8
    assert res.labels[0, 0, 0] == 0 and res.labels[0, 8, 8] == 1 and res.labels[0, 12, 12] == 2
    assert res.probs.shape == (10, 3, 24, 24)
    np.testing.assert_allclose(res.probs.astype(np.float32).sum(1), 1.0, atol=1e-2)
    assert res.probs[0, 2, 12, 12] > 0.9 and res.probs[0, 0, 0, 0] > 0.9
    # without return_probs the predictor returns none and the run keeps none
    assert run_to_end(run_volume(_predictor(), vol, batch_size=3)).probs is None


def test_batching_and_range_and_progress():
    net = CountingNet(ThresholdConfig())
    gen = run_volume(_predictor(net), _volume(), slices=(2, 9), batch_size=3)
    seen = []
    res = run_to_end(gen, on_progress=lambda p: seen.append((p.done, p.total, p.z)))
    assert net.batches == [3, 3, 1]
    assert seen == [(3, 7, [2, 3, 4]), (6, 7, [5, 6, 7]), (7, 7, [8])]
    assert res.z == list(range(2, 9))
    assert res.labels[:2].max() == 0 and res.labels[9].max() == 0 and res.labels[2:9].max() == 2


def test_cancel_mid_run_keeps_partial_result():
    net = CountingNet(ThresholdConfig())
    calls = {"n": 0}

    def cancel():
        calls["n"] += 1
        return calls["n"] > 2

    res = run_to_end(run_volume(_predictor(net), _volume(), batch_size=2, cancel=cancel))
    assert res.cancelled and res.z == [0, 1, 2, 3]
    assert res.labels[:4].max() == 2 and res.labels[4:].max() == 0


def test_closing_the_generator_stops_between_batches():
    net = CountingNet(ThresholdConfig())
    gen = run_volume(_predictor(net), _volume(), batch_size=2)
    next(gen)
    gen.close()
    assert net.batches == [2]


@pytest.mark.parametrize("spec,expected", [
    (None, list(range(5))), ("all", list(range(5))), ("current", [3]), (2, [2]),
    ("1:3", [1, 2]), ("1-3", [1, 2, 3]), ((0, 2), [0, 1]), ([4, 0], [4, 0]),
])
def test_parse_slices(spec, expected):
    assert parse_slices(spec, 5, current=3) == expected


@pytest.mark.parametrize("spec", ["3:3", (2, 2), [9], "7", []])
def test_bad_slice_ranges(spec):
    with pytest.raises(ValueError):
        parse_slices(spec, 5)


def test_bf16_path_runs_and_agrees():
    vol = _volume()
    a = run_to_end(run_volume(_predictor(precision="fp32"), vol)).labels
    b = run_to_end(run_volume(_predictor(precision="bf16"), vol)).labels
    assert (a == b).mean() > 0.99


def test_spacing_grid_maps_back_onto_pixels():
    vol = _volume(z=2, hw=40)
    grid = SliceGrid(32, "spacing", (2.0, 2.0))  # 40 px at 1 mm -> 20 px at 2 mm, padded to 32
    res = run_to_end(run_volume(_predictor(grid=grid), Volume(vol.data, (3.0, 1.0, 1.0))))
    assert res.labels.shape == (2, 40, 40)
    assert res.labels[0, 2, 2] == 0 and res.labels[0, 8, 8] == 1 and res.labels[0, 12, 12] == 2


def test_windows_and_normalisation_are_separate():
    assert window_limits("abdomen") == (-160.0, 240.0)
    assert window_limits("lung") == (-1350.0, 150.0)
    assert window_limits("brain") == (0.0, 80.0)
    x = torch.tensor([[[[-1000.0, 75.0, 3000.0]]]])
    np.testing.assert_allclose(Normalization("hu_window", -125, 275)(x).flatten(), [0.0, 0.5, 1.0])
    mm = Normalization("minmax")(x).flatten()
    assert float(mm.min()) == 0.0 and float(mm.max()) == 1.0
    with pytest.raises(KeyError):
        window_limits("nope")


def test_official_msa2net_input_range():
    n = Normalization.from_dict({"kind": "hu_window", "low": -125, "high": 275, "out_min": -1, "out_max": 1})
    x = torch.tensor([[[[-1000.0, 75.0, 3000.0]]]])
    np.testing.assert_allclose(n(x).flatten(), [-1.0, 0.0, 1.0])
    assert Normalization.from_dict(n.to_dict()) == n
