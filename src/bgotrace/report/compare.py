"""Two runs side by side: how far their rankings agree (e.g. BGO against a baseline).

Metrics, per query present in both runs (pure functions, tested on hand-made tables):

- ``overlap@k``: |top-k(A) ∩ top-k(B)| / k over unit ids;
- Spearman's ρ between the two runs' scores over the units both scored (a prefiltered
  run leaves some units unscored, NaN; those are left out).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from bgotrace.errors import InputError
from bgotrace.ranking.result import AttributionResult


@dataclass
class Comparison:
    """The agreement of two runs on one query."""

    query_id: str
    """Query compared (its id in run A; run B's may differ: ``query_b``, or one query each)."""
    k: int
    """Size of the top lists compared."""
    overlap: float
    """Fraction of run A's top-k units that are also in run B's top-k."""
    spearman: float
    """Spearman's ρ of the two runs' unit scores (NaN with fewer than 2 common units)."""
    n_common: int
    """Units scored by both runs."""
    top_a: pd.DataFrame
    """Run A's top-k units: rank, unit_id, source, score."""
    top_b: pd.DataFrame
    """Run B's top-k units."""

    def to_dict(self) -> dict:
        return {
            "query_id": self.query_id,
            "k": self.k,
            f"overlap@{self.k}": self.overlap,
            "spearman": self.spearman,
            "n_common_units": self.n_common,
            "top_a": self.top_a["unit_id"].tolist(),
            "top_b": self.top_b["unit_id"].tolist(),
        }


def overlap_at_k(a: pd.Series, b: pd.Series, k: int) -> float:
    """|first k of a ∩ first k of b| / k (a and b are unit ids, best first)."""
    return len(set(a.head(k)) & set(b.head(k))) / k


def spearman_over_units(a: pd.DataFrame, b: pd.DataFrame) -> tuple[float, int]:
    """Spearman's ρ of ``score`` over the unit ids scored (non-NaN) in both tables."""
    joined = a.set_index("unit_id")[["score"]].join(
        b.set_index("unit_id")[["score"]], how="inner", lsuffix="_a", rsuffix="_b"
    )
    joined = joined.dropna()
    if len(joined) < 2:
        return float("nan"), len(joined)
    rho = spearmanr(joined["score_a"], joined["score_b"]).statistic
    return float(rho), len(joined)


def _query_pairs(
    a: AttributionResult, b: AttributionResult, query_id: str | None, query_b: str | None
) -> list[tuple[str, str]]:
    if query_b is not None and query_id is None:
        raise InputError("--query-b names B's query of a pair: pass A's with --query too.")
    if query_id is not None:
        return [(query_id, query_b if query_b is not None else query_id)]
    common = [q for q in a.query_ids if q in set(b.query_ids)]
    if common:
        return [(q, q) for q in common]
    if len(a.query_ids) == len(b.query_ids) == 1:
        return [(a.query_ids[0], b.query_ids[0])]
    raise InputError(
        f"The two runs share no query id (A: {a.query_ids[:5]}, B: {b.query_ids[:5]}): "
        "pass --query A_ID --query-b B_ID to compare one query of each."
    )


def compare_results(
    a: AttributionResult,
    b: AttributionResult,
    *,
    k: int = 10,
    query_id: str | None = None,
    query_b: str | None = None,
) -> list[Comparison]:
    """One :class:`Comparison` per query the two runs share; with ``query_id`` that query
    alone, against B's ``query_b`` when given (runs whose query ids differ)."""
    out = []
    for qa, qb in _query_pairs(a, b, query_id, query_b):
        rows_a, rows_b = a._pick(a.scores, qa), b._pick(b.scores, qb)
        rho, n_common = spearman_over_units(rows_a, rows_b)
        if n_common == 0:
            raise InputError(
                "The two runs share no unit id: they cut the corpus differently; rerun one "
                "with the other's --max-length and --stride."
            )
        cols = ["rank", "unit_id", "source", "score"]
        top_a, top_b = a.top(k, qa)[cols], b.top(k, qb)[cols]
        overlap = overlap_at_k(top_a["unit_id"], top_b["unit_id"], k)
        out.append(Comparison(qa, k, overlap, rho, n_common, top_a, top_b))
    return out


def method_label(result: AttributionResult) -> str:
    """Short description of how a run scored: its method and, for BGO, the key settings."""
    summary = result.summary
    method = str(summary.get("method", "?"))
    if method != "bgo":
        return method
    cfg = summary.get("config", {})
    perturb, scoring = cfg.get("perturb", {}), cfg.get("scoring", {})
    return f"bgo {scoring.get('score', '')} {perturb.get('optimizer', '')} lr {perturb.get('lr')}"


def finite(value: float) -> str:
    return "n/a" if not np.isfinite(value) else f"{value:+.3f}"
