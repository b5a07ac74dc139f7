"""Ratios normalised by a task's clean − corrupted gap, defined only where the gap is real.

Faithfulness, the share of the task kept after zeroing components and every other "fraction of the effect"
divide by M(clean) − M(ablated). Where that gap vanishes, or points the wrong way (the corrupted run scores
better than the clean one), the ratio means nothing: a gap of 0.001 turns noise into −177.9. Such a ratio is
undefined, NaN in arrays and JSON (`null`), "undefined" in tables, and never drawn.

The floor: the gap must be positive in the metric's good direction and at least `RELATIVE_FLOOR` of the
larger of |M(clean)| and |M(ablated)|, and at least `ABSOLUTE_FLOOR`, so that it stands above float rounding
and above small changes of a metric near zero.
"""

from __future__ import annotations

import numpy as np

RELATIVE_FLOOR = 0.05
ABSOLUTE_FLOOR = 1e-6


def gap_floor(clean, ablated) -> np.ndarray:
    """The smallest gap M(clean) − M(ablated) (in the good direction) a ratio is taken over."""
    clean, ablated = np.asarray(clean, np.float64), np.asarray(ablated, np.float64)
    return np.maximum(ABSOLUTE_FLOOR, RELATIVE_FLOOR * np.maximum(np.abs(clean), np.abs(ablated)))


def defined(clean, ablated, higher_is_better: bool = True) -> np.ndarray:
    """Whether the gap between `clean` and `ablated` carries a ratio (elementwise)."""
    clean, ablated = np.asarray(clean, np.float64), np.asarray(ablated, np.float64)
    gap = clean - ablated if higher_is_better else ablated - clean
    return gap > gap_floor(clean, ablated)


def normalised(value, clean, ablated, higher_is_better: bool = True) -> np.ndarray:
    """(value − ablated) / (clean − ablated), NaN wherever the gap is below its floor."""
    value = np.asarray(value, np.float64)
    clean, ablated = np.asarray(clean, np.float64), np.asarray(ablated, np.float64)
    ok = defined(clean, ablated, higher_is_better)
    gap = np.where(ok, clean - ablated, 1.0)
    return np.where(ok, (value - ablated) / gap, np.nan)
