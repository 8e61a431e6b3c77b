"""bgotrace: training data attribution for causal LMs by bidirectional gradient optimization.

Which training data made this model produce this text? ``bgotrace.attribute`` makes
θ+ (K steps of descent on the query loss) and θ− (K steps of ascent) and scores every
training unit z by ``L(z; θ−) − L(z; θ+)`` in nats: high = z supports the query.
"""

from __future__ import annotations

__version__ = "0.1.0"

from bgotrace.api import attribute
from bgotrace.attribute.result import AttributionResult
from bgotrace.config import AttributeConfig, PerturbConfig, ScoreConfig
from bgotrace.errors import BgotraceError
from bgotrace.query import Query

__all__ = [
    "AttributeConfig",
    "AttributionResult",
    "BgotraceError",
    "PerturbConfig",
    "Query",
    "ScoreConfig",
    "attribute",
]
