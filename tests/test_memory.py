"""Memory of a full-size run (issue #12, "Memory for full-size CT"): the whole-volume steps make
no wider or repeated copies of the volume than they need. Peaks are traced with ``tracemalloc``
(numpy reports its buffers to it) on small arrays, so the tests are fast."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from napari_genseg.checks import apply_hu_offset
from napari_genseg.volume import Volume


def _peak(fn, *args, **kwargs):
    """(result, peak bytes allocated above the start while ``fn`` ran)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start, _ = tracemalloc.get_traced_memory()
        out = fn(*args, **kwargs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return out, peak - start


@pytest.mark.parametrize("dtype, offset, out_dtype", [(np.int16, -1024, np.int16), (np.uint16, -1024, np.int16),
                                                      (np.int16, 0.5, np.float32), (np.float32, 24.0, np.float32)])
def test_hu_offset_makes_one_array_of_the_output_size(dtype, offset, out_dtype):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 3000, (32, 128, 128)).astype(dtype)  # 1 MB: the ufunc buffers (~130 kB) are small
    vol = Volume(data, spacing=(1, 1, 1))
    out, peak = _peak(apply_hu_offset, vol, offset)
    assert out.data.dtype == out_dtype
    np.testing.assert_array_equal(out.data, data.astype(np.float64) + offset)
    # old code: an int32 copy plus the int32 sum (4x an int16 volume) or a float32 copy plus the sum
    assert peak < 1.25 * out.data.nbytes, peak / out.data.nbytes
