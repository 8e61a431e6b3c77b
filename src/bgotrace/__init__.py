"""bgotrace: training data attribution for causal LMs by bidirectional gradient optimization.

Which training data made this model produce this text? ``bgotrace.attribute`` makes
θ+ (K steps of descent on the query loss) and θ− (K steps of ascent) and scores every
training unit z by ``L(z; θ−) − L(z; θ+)`` in nats: high = z supports the query.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Names are imported on first use: torch and transformers take seconds to import,
# and the pure modules (metrics, corpus readers) should not pay for them.
_EXPORTS = {
    "attribute": "bgotrace.api",
    # Through the report, which registers the result's notebook view and report.html writer.
    "AttributionResult": "bgotrace.report.html",
    "AttributeConfig": "bgotrace.config",
    "PerturbConfig": "bgotrace.config",
    "ScoreConfig": "bgotrace.config",
    "BgotraceError": "bgotrace.errors",
    "Query": "bgotrace.query",
}

if TYPE_CHECKING:
    from bgotrace.api import attribute
    from bgotrace.config import AttributeConfig, PerturbConfig, ScoreConfig
    from bgotrace.errors import BgotraceError
    from bgotrace.query import Query
    from bgotrace.ranking.result import AttributionResult


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bgotrace' has no attribute {name!r}")


__all__ = [
    "AttributeConfig",
    "AttributionResult",
    "BgotraceError",
    "PerturbConfig",
    "Query",
    "ScoreConfig",
    "attribute",
]
