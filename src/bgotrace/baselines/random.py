"""``random``: the chance level every method must beat.

Scores are standard-normal draws, seeded by ``(seed, query id)``: the same query gets the
same scores however the queries are batched, and two queries get independent scores.
Unitless; high = ranked first, and by construction unrelated to support.
"""

from __future__ import annotations

import zlib

import numpy as np

from bgotrace.baselines.base import Attributor, MethodContext, register
from bgotrace.query import EncodedQuery


def query_rng(seed: int, query_id: str) -> np.random.Generator:
    """A generator keyed by the run seed and a stable hash of the query id."""
    return np.random.default_rng([seed, zlib.crc32(query_id.encode("utf-8"))])


@register("random")
class RandomAttributor(Attributor):
    """Seeded Gaussian scores (n_queries, n_units): the chance-level control."""

    def _prepare(self, ctx: MethodContext) -> None:
        pass  # nothing to fit

    def _score(self, queries: list[EncodedQuery]) -> np.ndarray:
        ctx = self._prepared()
        return np.stack(
            [query_rng(ctx.seed, q.query.query_id).standard_normal(ctx.n_units) for q in queries]
        )
