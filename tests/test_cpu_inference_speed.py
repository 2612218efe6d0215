"""CPU inference speed paths of issue #12 that must not change a mask:

* the arg-max over the class axis (``segmentation.class_argmax``) gives ``torch.argmax``'s labels
  (ties to the first class, NaN counted as the largest value). Its speed (~3 vs 30-40 ms per 512²
  slice) is measured by benchmarks/memory.py (table in benchmarks/memory.md), not asserted here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_genseg.predictors.segmentation import class_argmax

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # (tests/conftest.py)


@pytest.mark.parametrize("k", [1, 2, 3, 14])
def test_class_argmax_equals_torch_argmax_with_ties_and_nan(k):
    g = torch.Generator().manual_seed(k)
    x = torch.randint(-2, 3, (3, k, 17, 19), generator=g).float()  # small integers: many ties
    x[0, :, 0, 0] = 1.0  # an all-class tie: class 0
    if k > 1:
        x[1, k - 1, 2, 3] = float("nan")  # NaN in the last class: it wins
        x[2, :, 4, 5] = float("nan")  # NaN everywhere: the first class
        x[2, 1:, 6, 7] = float("nan")  # NaN after class 0: class 1
    got = class_argmax(x)
    assert got.dtype == np.uint8 and got.shape == (3, 17, 19)
    np.testing.assert_array_equal(got, x.argmax(1).to(torch.uint8).numpy())
    # a strided view (the slice grid's crop) and bf16 logits give the same answer
    np.testing.assert_array_equal(class_argmax(x[..., 1:, 2:]), x[..., 1:, 2:].argmax(1).numpy())
    xb = x.to(torch.bfloat16)
    np.testing.assert_array_equal(class_argmax(xb), xb.float().argmax(1).numpy())


def test_class_argmax_refuses_more_classes_than_uint8_holds():
    with pytest.raises(ValueError, match="uint8"):
        class_argmax(torch.zeros(1, 257, 2, 2))
