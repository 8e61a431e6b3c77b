"""Score variants: how the losses under θ0, θ+ and θ− become one number per unit.

All scores are in nats and signed so that high = the unit supports the query:

- ``bidirectional`` (default): L(z; θ−) − L(z; θ+)
- ``ascent`` (UnTrac-Inv):     L(z; θ−) − L(z; θ0)
- ``descent``:                 L(z; θ0) − L(z; θ+)
- ``abs`` (reference scripts): |L(z; θ−) − L(z; θ+)|, which ranks strong opponents
  as high as proponents and is not additive; kept for comparison only.
"""

from __future__ import annotations

import numpy as np

from bgotrace.perturb.steps import ASCENT, DESCENT

BASE = "base"

STATES_NEEDED: dict[str, tuple[str, ...]] = {
    "bidirectional": (ASCENT, DESCENT),
    "ascent": (ASCENT, BASE),
    "descent": (BASE, DESCENT),
    "abs": (ASCENT, DESCENT),
}


def score_losses(variant: str, losses: dict[str, np.ndarray]) -> np.ndarray:
    """Combine per-unit (or per-token) losses keyed by state into scores."""
    if variant == "bidirectional":
        return losses[ASCENT] - losses[DESCENT]
    if variant == "ascent":
        return losses[ASCENT] - losses[BASE]
    if variant == "descent":
        return losses[BASE] - losses[DESCENT]
    if variant == "abs":
        return np.abs(losses[ASCENT] - losses[DESCENT])
    raise ValueError(f"unknown score variant {variant!r}")


def reduce_sums(sums: np.ndarray, counts: np.ndarray, reduce: str) -> np.ndarray:
    """Per-unit loss from summed token losses: ``mean`` (per token) or ``sum``."""
    if reduce == "sum":
        return sums
    return sums / np.maximum(counts, 1)
