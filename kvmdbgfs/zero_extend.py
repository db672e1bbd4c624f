"""Growing an array that stands for a pool or a table: the same rows, then zero rows."""

from __future__ import annotations

import numpy as np


def zero_extended(rows: np.ndarray, length: int) -> np.ndarray:
    """``rows`` followed by zero rows, ``length`` rows in all. np.zeros pages in lazily, so only the old rows
    are written now and the new ones are faulted in when first used (np.concatenate with a block of zeros
    writes both and faults in every page at once)."""
    out = np.zeros((length, *rows.shape[1:]), rows.dtype)
    out[: len(rows)] = rows
    return out
