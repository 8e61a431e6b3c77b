"""Prefilter + rerank: a cheap method proposes candidates, BGO scores only those.

``--candidates M --prefilter bm25`` makes a query's sweep cost proportional to M instead of
the corpus size. The candidate units' scores equal the full sweep's; the other units are
left unscored (NaN, ``candidate`` False), ranked after every candidate. What is lost is only
what the prefilter misses: check the recall of full BGO's top units inside the candidates
(``benchmarks/restricted_quality.py``) before trusting a small M.
"""

from __future__ import annotations

from bgotrace.candidates_spec import parse_candidates
from bgotrace.prefilter.candidates import CandidatePlan, candidate_count, plan_from_scores
from bgotrace.prefilter.propose import Prefilter, plan_candidates
from bgotrace.prefilter.rerank import SubsetUnits, rerank_queries, scatter

__all__ = [
    "CandidatePlan",
    "Prefilter",
    "SubsetUnits",
    "candidate_count",
    "parse_candidates",
    "plan_candidates",
    "plan_from_scores",
    "rerank_queries",
    "scatter",
]
