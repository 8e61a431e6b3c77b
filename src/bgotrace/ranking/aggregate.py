"""Scores → ranked tables at unit, document and source granularity.

Aggregation (per query):

- documents: ``score_sum`` (total support of the document's units) and
  ``score_mean``; ranked by ``score_sum`` — a fact stated by one unit of a long
  document still puts the document on top.
- sources: ``score_sum`` and ``score_mean``; ranked by ``score_mean`` — the average
  support of a source's units, so a large source does not win by size alone.

Signed scores add up, which is why document and source sums are meaningful for the
default ``bidirectional`` score and not for ``abs``.

Prefilter + rerank (``--candidates``) leaves non-candidate units unscored: their score is
NaN, their ``candidate`` flag False and they rank after every candidate. A document's or
source's sum and mean then cover its candidate units only (``n_candidates`` of its
``n_units``); one without any candidate has NaN and ranks last.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

RANK_KEY = {"doc_id": "score_sum", "source": "score_mean"}


def add_rank(frame: pd.DataFrame, by: str, group: str = "query_id") -> pd.DataFrame:
    """Rank 1 = highest ``by`` within each ``group``; ties keep the input order."""
    frame = frame.sort_values([group, by], ascending=[True, False], kind="stable")
    frame["rank"] = frame.groupby(group, sort=False).cumcount() + 1
    return frame.reset_index(drop=True)


def unit_scores(
    units: pd.DataFrame,
    query_id: str,
    scores: np.ndarray,
    n_tokens: np.ndarray,
    losses: dict[str, np.ndarray] | None = None,
    candidate: np.ndarray | None = None,
) -> pd.DataFrame:
    """One row per unit: ids, score, rank and (for BGO) the losses it came from.

    ``candidate`` (n_units,) bool marks the units a prefiltered run scored (the rest are NaN).
    """
    frame = pd.DataFrame(
        {
            "query_id": query_id,
            "unit_index": np.arange(len(units)),
            "unit_id": units["unit_id"].to_numpy(),
            "doc_id": units["doc_id"].to_numpy(),
            "source": units["source"].to_numpy(),
            "score": scores,
            "n_tokens": n_tokens,
            "char_start": units["char_start"].to_numpy(),
            "char_end": units["char_end"].to_numpy(),
        }
    )
    if "turns" in units:  # an SFT corpus: the turns each unit covers ("first-last")
        frame.insert(frame.columns.get_loc("source") + 1, "turns", units["turns"].to_numpy())
    for state, loss in sorted((losses or {}).items()):
        frame[f"loss_{state}"] = loss
    if candidate is not None:
        frame["candidate"] = candidate
    return add_rank(frame, "score")


def aggregate(scores: pd.DataFrame, by: str) -> pd.DataFrame:
    """Per query and ``by`` (``doc_id`` or ``source``): sum, mean and count of unit scores."""
    grouped = scores.groupby(["query_id", by], sort=False)["score"]
    frame = pd.DataFrame(
        {
            "score_sum": grouped.sum(min_count=1),  # NaN, not 0, when no unit was scored
            "score_mean": grouped.mean(),
            "n_units": grouped.size(),
        }
    )
    if "candidate" in scores:
        frame["n_candidates"] = scores.groupby(["query_id", by], sort=False)["candidate"].sum()
    return add_rank(frame.reset_index(), RANK_KEY[by])
