"""Hub diagnostic: are a method's rankings driven by a few units that top every query?

Pure functions over a score matrix (queries × units), so every method is diagnosed the
same way:

- ``hub_share``: the largest fraction of unrelated query groups in whose top k one unit
  appears (queries of one group — the same fact entity or the same true source — may share
  top units legitimately, so a group counts once). 1/n_groups is the floor; a hub that tops
  every group gives 1.0.
- ``hub_units``: how many units appear in the top k of at least ``share`` of the groups.
- ``corr_length`` / ``corr_base_loss``: mean over queries of the Spearman correlation of
  the scores with the units' token counts / base-model losses (0 = rankings independent of
  them; strongly positive = long or badly-fit units rank first whatever the query).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import spearmanr


def top_k_sets(scores: np.ndarray, k: int) -> list[set[int]]:
    """Indices of each query's k highest-scoring units (ties broken by index)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    return [set(row[:k].tolist()) for row in order]


def hub_counts(scores: np.ndarray, groups: Sequence[str], k: int = 10) -> np.ndarray:
    """Per unit: in how many groups' top k (union over a group's queries) it appears."""
    tops = top_k_sets(scores, k)
    counts = np.zeros(scores.shape[1], dtype=np.int64)
    for g in sorted(set(groups)):
        members = set().union(*(tops[i] for i, gi in enumerate(groups) if gi == g))
        counts[list(members)] += 1
    return counts


def spearman_rows(scores: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Spearman(scores[q], values) per query (q,); NaN where either side is constant."""
    out = np.full(scores.shape[0], np.nan)
    finite = np.isfinite(values)
    for q, row in enumerate(scores):
        ok = finite & np.isfinite(row)
        if ok.sum() > 2 and np.ptp(row[ok]) > 0 and np.ptp(values[ok]) > 0:
            out[q] = float(spearmanr(row[ok], values[ok]).statistic)
    return out


def mean_spearman(scores: np.ndarray, values: np.ndarray) -> float:
    """Mean over queries of Spearman(scores[q], values); NaN rows (constant scores) skipped."""
    rhos = spearman_rows(scores, values)
    return float(np.nanmean(rhos)) if np.isfinite(rhos).any() else float("nan")


def hub_diagnostics(
    scores: np.ndarray,
    groups: Sequence[str],
    lengths: np.ndarray,
    base_losses: np.ndarray,
    *,
    k: int = 10,
    share: float = 0.25,
) -> dict[str, float]:
    """The four numbers described in the module docstring, for one method."""
    if scores.shape[0] != len(groups):
        raise ValueError(f"{scores.shape[0]} score rows but {len(groups)} groups")
    n_groups = len(set(groups))
    counts = hub_counts(scores, groups, k)
    return {
        "hub_share": float(counts.max()) / n_groups if n_groups else float("nan"),
        "hub_units": float((counts >= share * n_groups).sum()) if n_groups > 1 else float("nan"),
        "corr_length": mean_spearman(scores, lengths.astype(np.float64)),
        "corr_base_loss": mean_spearman(scores, base_losses.astype(np.float64)),
    }


def query_group(record: dict) -> str:
    """Group of a benchmark query: fact queries by entity, style queries by true source."""
    if record.get("kind") == "fact":
        return f"fact:{record.get('entity', record.get('id'))}"
    return f"{record.get('kind', '')}:{record.get('true_source', record.get('id'))}"
