"""Fact tracing and source attribution: score matrices in, per-query metric values out.

Both take a method's unit scores (q, n_units), high = the unit supports the query, and the
token cache's unit table (``unit_id``, ``doc_id``, ``source`` per unit, in score order).

* **Fact tracing** (planted facts; ground truth = the documents that state the fact):
  unit scores are aggregated to documents by their **max** (default) — a document supports
  a fact if any of its units does, and the max neither rewards long documents for having
  many slightly positive units (as ``sum`` would, above all for non-negative scores such as
  BM25) nor punishes a fact sentence that sits in one unit of a long document (as ``mean``
  would). ``sum`` is available as an option. Reported: recall@1, recall@10 and the
  reciprocal rank of the first relevant document (MRR after averaging over queries).
* **Source / style** (held-out text of a source; ground truth = that source): precision@10
  of the true source among the top-10 *units*, and the 1-based rank of the true source when
  sources are ranked by the **mean** score of their units (so a large source does not win
  by size alone). Every source of the corpus is a candidate, the planted facts included.

Ties are broken by a random permutation seeded by the query id, so a method that gives many
units the same score (BM25 gives 0 to units sharing no word) gets chance-level order among
them instead of an order that happens to favour the corpus's first documents.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from bgotrace.errors import ConfigError
from bgotrace.eval.metrics import precision_at_k, rank_of, recall_at_k, reciprocal_rank
from bgotrace.ranking.order import rank_order

DOC_REDUCTIONS = ("max", "sum")
FACT_METRICS = ("recall@1", "recall@10", "mrr")
SOURCE_METRICS = ("precision@10", "source_rank")


def group_scores(
    scores: np.ndarray, labels: np.ndarray, reduce: str
) -> tuple[np.ndarray, np.ndarray]:
    """Aggregate unit scores (n,) by label: returns (unique labels, reduced score per label).

    ``reduce`` is ``max``, ``sum`` or ``mean``; labels come back sorted.
    """
    frame = pd.DataFrame({"label": labels, "score": scores})
    grouped = frame.groupby("label", sort=True)["score"].agg(reduce)
    return grouped.index.to_numpy(), grouped.to_numpy(dtype=np.float64)


def fact_metrics(
    scores: np.ndarray,
    doc_ids: np.ndarray,
    relevant_doc_ids: Sequence[str],
    query_id: str,
    *,
    reduce: str = "max",
) -> dict[str, float]:
    """recall@1, recall@10 and reciprocal rank of the relevant documents for one query.

    ``scores`` (n_units,) and ``doc_ids`` (n_units,) are aligned; units are aggregated to
    documents with ``reduce`` (``max`` or ``sum``) before ranking.
    """
    if reduce not in DOC_REDUCTIONS:
        raise ConfigError(f"doc_reduce={reduce!r} is unknown: use one of {DOC_REDUCTIONS}.")
    docs, doc_scores = group_scores(scores, doc_ids, reduce)
    ranked = docs[rank_order(doc_scores, query_id)].tolist()
    relevant: set[Hashable] = set(relevant_doc_ids)
    return {
        "recall@1": recall_at_k(ranked, relevant, 1),
        "recall@10": recall_at_k(ranked, relevant, 10),
        "mrr": reciprocal_rank(ranked, relevant),
    }


def source_metrics(
    scores: np.ndarray, sources: np.ndarray, true_source: str, query_id: str, *, k: int = 10
) -> dict[str, float]:
    """precision@k of ``true_source`` among the top-k units, and its rank among sources.

    The source rank is 1-based over sources ranked by the mean score of their units.
    """
    top_units = rank_order(scores, query_id)[:k]
    names, means = group_scores(scores, sources, "mean")
    ranked_sources = names[rank_order(means, query_id)].tolist()
    return {
        f"precision@{k}": precision_at_k(sources[top_units].tolist(), true_source, k),
        "source_rank": float(rank_of(ranked_sources, true_source)),
    }


def fact_tracing(
    scores: np.ndarray,
    units: pd.DataFrame,
    queries: Sequence[Mapping[str, Any]],
    *,
    reduce: str = "max",
) -> pd.DataFrame:
    """Per-query fact metrics; ``scores`` (q, n_units) row i belongs to ``queries[i]``.

    Returns a long table with columns ``query_id``, ``metric``, ``value``.
    """
    doc_ids = units["doc_id"].to_numpy()
    rows = []
    for row, query in zip(scores, queries, strict=True):
        values = fact_metrics(row, doc_ids, query["relevant_doc_ids"], query["id"], reduce=reduce)
        rows += [{"query_id": query["id"], "metric": m, "value": v} for m, v in values.items()]
    return pd.DataFrame(rows, columns=["query_id", "metric", "value"])


def source_attribution(
    scores: np.ndarray, units: pd.DataFrame, queries: Sequence[Mapping[str, Any]]
) -> pd.DataFrame:
    """Per-query source metrics (precision@10, source_rank); same layout as fact_tracing."""
    sources = units["source"].to_numpy()
    rows = []
    for row, query in zip(scores, queries, strict=True):
        values = source_metrics(row, sources, query["true_source"], query["id"])
        rows += [{"query_id": query["id"], "metric": m, "value": v} for m, v in values.items()]
    return pd.DataFrame(rows, columns=["query_id", "metric", "value"])
