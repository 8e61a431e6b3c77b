"""Which units BGO reranks: a cheap method's top-M units of each query group.

``--candidates M`` is a count (``200``), a percentage (``5%``) or a fraction (``0.05``) of
the corpus. The prefilter (``--prefilter``, any registered method but BGO itself) scores
every unit for every query; each query proposes its top M (ties in an order seeded by the
query id, so a method that gives many units the same score — BM25 gives 0 to units that
share no word — does not favour the corpus's first documents), and a query group (the
queries of one sweep, ``--queries-per-sweep``) sweeps the union of its queries' proposals.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bgotrace.candidates_spec import CandidateSpec, parse_candidates
from bgotrace.errors import ConfigError
from bgotrace.query import EncodedQuery
from bgotrace.ranking.order import rank_order


def candidate_count(spec: CandidateSpec, n_units: int) -> int:
    """M for a corpus of ``n_units``: a fraction rounds up, so it never selects zero units."""
    kind, value = parse_candidates(spec)
    m = int(value) if kind == "count" else math.ceil(value * n_units)
    if m > n_units:
        raise ConfigError(
            f"--candidates={spec!r} asks for {m} units but the corpus has {n_units}: "
            f"use at most {n_units}, or a percentage such as 5%."
        )
    return m


def top_m(scores: np.ndarray, query_ids: Sequence[str], m: int) -> np.ndarray:
    """Each query's M best units (q, m), best first; NaN last, ties in seeded order."""
    return np.stack([rank_order(row, qid)[:m] for row, qid in zip(scores, query_ids, strict=True)])


@dataclass(frozen=True)
class CandidatePlan:
    """The candidates of every query group, and how they were chosen."""

    prefilter: str
    """Method that proposed them."""
    spec: str
    """``--candidates`` as given (count, percentage or fraction)."""
    m: int
    """Units proposed per query."""
    n_units: int
    """Units of the corpus."""
    proposed: np.ndarray
    """(n_queries, m) each query's own top-M unit indices, best first."""
    groups: tuple[np.ndarray, ...]
    """Per query group: sorted union of its queries' proposals (the units swept)."""
    group_size: int
    """Queries per group (``queries_per_sweep``)."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time of the prefilter (``prepare_s``, ``score_s``)."""

    def group_of(self, query_index: int) -> int:
        return query_index // self.group_size

    def mask(self, group: int) -> np.ndarray:
        """(n_units,) bool: the units swept for the queries of ``group``."""
        out = np.zeros(self.n_units, dtype=bool)
        out[self.groups[group]] = True
        return out

    def fingerprint(self, group: int) -> dict[str, Any]:
        """What a resumed run must find again for ``group`` (method, M and the units)."""
        digest = hashlib.sha256(self.groups[group].astype(np.int64).tobytes()).hexdigest()
        return {"prefilter": self.prefilter, "m": self.m, "units": digest[:16]}

    def summary(self) -> dict[str, Any]:
        """The part of ``summary.json`` that says how the candidates were chosen."""
        return {
            "prefilter": self.prefilter,
            "candidates": self.spec,
            "m": self.m,
            "n_units": self.n_units,
            "swept_units_per_group": [len(g) for g in self.groups],
            **self.seconds,
        }


def plan_from_scores(
    scores: np.ndarray,
    queries: Sequence[EncodedQuery],
    *,
    prefilter: str,
    spec: CandidateSpec,
    group_size: int,
) -> CandidatePlan:
    """Candidates from a prefilter's scores (n_queries, n_units), grouped like the sweep."""
    n_units = scores.shape[1]
    m = candidate_count(spec, n_units)
    ids = [q.query.query_id for q in queries]
    proposed = top_m(scores, ids, m) if ids else np.zeros((0, m), dtype=np.int64)
    groups = tuple(
        np.unique(proposed[start : start + group_size].ravel())
        for start in range(0, len(ids), group_size)
    )
    return CandidatePlan(prefilter, str(spec), m, n_units, proposed, groups, group_size)
