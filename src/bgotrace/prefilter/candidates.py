"""The candidate plan, as the prefilter package names it (it lives in ``bgotrace.ranking``:
a function of scores and ranks, which the ``bgo`` method below this package reads too)."""

from __future__ import annotations

from bgotrace.candidates_spec import CandidateSpec, parse_candidates
from bgotrace.ranking.candidates import CandidatePlan, candidate_count, plan_from_scores, top_m

__all__ = [
    "CandidatePlan",
    "CandidateSpec",
    "candidate_count",
    "parse_candidates",
    "plan_from_scores",
    "top_m",
]
