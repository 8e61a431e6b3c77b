"""Rerank: BGO sweeps only each query group's candidate units, then scores are scattered back.

The mechanics live on the one BGO path (:mod:`bgotrace.bgo`, with the subset view and the
scatter in :mod:`bgotrace.score.subset`): each group's sweep visits a
:class:`SubsetUnits` view while the sweep context keeps ``n_units`` = the corpus size, so the
Fisher step's N, the Fisher sample and the perturbed states are exactly those of the full
sweep, and a candidate's loss is the full sweep's loss of that unit.

Outputs cover every unit: non-candidates have NaN losses (they were not scored, which is
not the same as a score of 0) and ``candidate`` False.

Resume: each group sweeps into its own run store ``RUN/rerank/gNNN/`` (state and shards of
that group), and ``RUN/state.json`` records the group's candidate set (prefilter, M and a
digest of the units), so a resumed run with other candidates is refused.
"""

from __future__ import annotations

from collections.abc import Sequence

from bgotrace.bgo import RERANK_DIR, group_losses, perturbation_method
from bgotrace.prefilter.candidates import CandidatePlan
from bgotrace.query import EncodedQuery
from bgotrace.score.context import SweepContext
from bgotrace.score.engine import QueryLosses
from bgotrace.score.subset import SubsetUnits, scatter

__all__ = ["RERANK_DIR", "SubsetUnits", "rerank_queries", "scatter"]


def rerank_queries(
    ctx: SweepContext, queries: Sequence[EncodedQuery], plan: CandidatePlan
) -> list[QueryLosses]:
    """Per-unit losses of every query over the whole corpus, NaN outside its group's candidates.

    ``ctx`` is the full sweep's context (units = the whole cache); each group of
    ``plan.group_size`` queries is swept over its own candidates only. The states are kept
    (as :func:`bgotrace.score.engine.score_queries`); runs use :func:`bgotrace.bgo.run_bgo`.
    """
    bgo = perturbation_method("bgo")
    assert bgo is not None
    return [r for group in group_losses(ctx, queries, bgo, plan) for r in group]
