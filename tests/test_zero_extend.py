"""zero_extended(): the growth step of the MMU's pools and the page allocator's per-frame arrays."""

from __future__ import annotations

import numpy as np

from kvmdbgfs.zero_extend import zero_extended


def test_rows_kept_then_zero_rows_of_the_same_dtype() -> None:
    rows = np.arange(1, 13, dtype=np.int64).reshape(4, 3)
    grown = zero_extended(rows, 10)
    assert grown.shape == (10, 3) and grown.dtype == np.int64
    assert (grown[:4] == rows).all() and not grown[4:].any()


def test_one_dimensional_arrays_and_the_original_left_alone() -> None:
    levels = np.array([0, 4, 3, 2], np.int8)
    grown = zero_extended(levels, 8)
    grown[0] = 9
    assert grown.tolist() == [9, 4, 3, 2, 0, 0, 0, 0] and grown.dtype == np.int8
    assert levels.tolist() == [0, 4, 3, 2]  # a copy: the old array's views stay valid until rebound
