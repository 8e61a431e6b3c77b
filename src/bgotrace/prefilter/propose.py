"""The prefilter: a registered attribution method prepared once, proposing candidates.

Python::

    prefilter = Prefilter("bm25", MethodContext(model, tokenizer, cache))
    plan = prefilter.plan(encoded_queries, "5%", group_size=8)
    losses = rerank_queries(sweep_ctx, encoded_queries, plan)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from bgotrace.baselines import available_methods, get_attributor
from bgotrace.candidates_spec import CandidateSpec, check_prefilter
from bgotrace.config import ScoreConfig
from bgotrace.prefilter.candidates import CandidatePlan, plan_from_scores
from bgotrace.query import EncodedQuery

if TYPE_CHECKING:
    from bgotrace.baselines.base import MethodContext


class Prefilter:
    """A cheap method (BM25, repsim, a gradient index…) prepared for one model and corpus."""

    def __init__(self, name: str, ctx: MethodContext) -> None:
        check_prefilter(name, available_methods())
        self.name = name
        started = time.perf_counter()
        self.method = get_attributor(name)
        self.method.prepare(ctx)
        self.seconds = {"prepare_s": round(time.perf_counter() - started, 3), "score_s": 0.0}

    def plan(
        self, queries: Sequence[EncodedQuery], spec: CandidateSpec, *, group_size: int
    ) -> CandidatePlan:
        """Each query's top-M units, unioned per group of ``group_size`` queries."""
        started = time.perf_counter()
        scores = self.method.score(list(queries))  # (n_queries, n_units)
        self.seconds["score_s"] += round(time.perf_counter() - started, 3)
        return plan_from_scores(
            scores, queries, prefilter=self.name, spec=spec, group_size=group_size
        )


def plan_candidates(
    scoring: ScoreConfig,
    ctx: MethodContext,
    queries: Sequence[EncodedQuery],
    group_size: int,
) -> CandidatePlan | None:
    """The candidates ``scoring.candidates`` asks for (None: sweep every unit)."""
    if scoring.candidates is None:
        return None
    prefilter = Prefilter(scoring.prefilter, ctx)
    plan = prefilter.plan(queries, scoring.candidates, group_size=group_size)
    return dataclasses.replace(plan, seconds=prefilter.seconds)
