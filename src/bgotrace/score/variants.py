"""A unit's loss from its summed token losses (``--reduce``).

The score variants themselves (``--score``: which states, how they combine, formula and
unit) are registered once in :mod:`bgotrace.variants`.
"""

from __future__ import annotations

import numpy as np


def reduce_sums(sums: np.ndarray, counts: np.ndarray, reduce: str) -> np.ndarray:
    """Per-unit loss from summed token losses: ``mean`` (per token) or ``sum``."""
    if reduce == "sum":
        return sums
    return sums / np.maximum(counts, 1)
