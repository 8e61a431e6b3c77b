"""Rerank: BGO sweeps only each query group's candidate units, then scores are scattered back.

The engine is unchanged: it sweeps a :class:`SubsetUnits` view (the same
:class:`~bgotrace.cache.batching.TokenSource` protocol as the token cache) while the sweep
context keeps ``n_units`` = the corpus size, so the Fisher step's N, the Fisher sample and
the perturbed states are exactly those of the full sweep. A candidate's loss is therefore
the full sweep's loss of that unit (batching leaves every unit's loss unchanged).

Outputs cover every unit: non-candidates have NaN losses (they were not scored, which is
not the same as a score of 0) and ``candidate`` False.

Resume: each group sweeps into its own run store ``RUN/rerank/gNNN/`` (state and shards of
that group), and ``RUN/state.json`` records the group's candidate set (prefilter, M and a
digest of the units), so a resumed run with other candidates is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from bgotrace.cache.batching import TokenSource
from bgotrace.prefilter.candidates import CandidatePlan
from bgotrace.query import EncodedQuery
from bgotrace.score.context import SweepContext
from bgotrace.score.engine import QueryLosses, score_queries
from bgotrace.score.store import RunStore

RERANK_DIR = "rerank"


class SubsetUnits:
    """The units ``indices`` of a token source, seen as units 0..len(indices)-1."""

    def __init__(self, units: TokenSource, indices: np.ndarray) -> None:
        self.source = units
        self.indices = np.asarray(indices, dtype=np.int64)  # (m,) corpus unit indices
        self._lengths = units.lengths[self.indices]  # (m,)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def lengths(self) -> np.ndarray:
        return self._lengths

    def unit_tokens(self, i: int) -> np.ndarray:
        return self.source.unit_tokens(int(self.indices[i]))


def rerank_queries(
    ctx: SweepContext, queries: Sequence[EncodedQuery], plan: CandidatePlan
) -> list[QueryLosses]:
    """Per-unit losses of every query over the whole corpus, NaN outside its group's candidates.

    ``ctx`` is the full sweep's context (units = the whole cache); each group of
    ``plan.group_size`` queries is swept over its own candidates only.
    """
    if plan.group_size != ctx.score_cfg.queries_per_sweep:
        raise ValueError("the candidate plan was grouped differently from the sweep")
    results: list[QueryLosses] = []
    for g, start in enumerate(range(0, len(queries), plan.group_size)):
        group = queries[start : start + plan.group_size]
        view = SubsetUnits(ctx.units, plan.groups[g])
        sub = dataclasses.replace(
            ctx, units=view, block_executor=None, store=_group_store(ctx.store, plan, g)
        )
        results += [scatter(r, view.indices, ctx.units.lengths) for r in score_queries(sub, group)]
    return results


def _group_store(store: RunStore | None, plan: CandidatePlan, g: int) -> RunStore | None:
    """Group ``g``'s own resumable store, after recording its candidate set in the run's."""
    if store is None:
        return None
    store.check_state(f"candidates{g:03d}", plan.fingerprint(g))
    root = store.root / RERANK_DIR / f"g{g:03d}"
    root.mkdir(parents=True, exist_ok=True)
    return RunStore(root)


def scatter(result: QueryLosses, indices: np.ndarray, lengths: np.ndarray) -> QueryLosses:
    """Losses of the swept ``indices`` placed in corpus-sized arrays (NaN elsewhere).

    Token counts of the units not swept are their predicted tokens (length - 1), which is
    what the sweep would have counted.
    """
    n = len(lengths)
    losses = {}
    for state, values in result.losses.items():
        full = np.full(n, np.nan, dtype=np.float64)
        full[indices] = values
        losses[state] = full
    counts = np.maximum(lengths.astype(np.int64) - 1, 0)
    counts[indices] = result.counts
    return dataclasses.replace(result, losses=losses, counts=counts)
