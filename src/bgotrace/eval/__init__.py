"""eval stage of bgotrace: metrics that judge attribution rankings against known ground truth.

The functions in :mod:`bgotrace.eval.metrics` are pure (numpy in, numbers out); the runners
that retrain models or patch them call these so that every reported number is checkable.
"""

from __future__ import annotations

from bgotrace.eval.metrics import (
    MetricSummary,
    TailPatchSummary,
    bootstrap_ci,
    lds,
    lds_over_queries,
    paired_difference_ci,
    precision_at_k,
    rank_of,
    recall_at_k,
    reciprocal_rank,
    spearman,
    tail_patch_summary,
)

__all__ = [
    "MetricSummary",
    "TailPatchSummary",
    "bootstrap_ci",
    "lds",
    "lds_over_queries",
    "paired_difference_ci",
    "precision_at_k",
    "rank_of",
    "recall_at_k",
    "reciprocal_rank",
    "spearman",
    "tail_patch_summary",
]
