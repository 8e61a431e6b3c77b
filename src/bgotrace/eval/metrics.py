"""Evaluation metrics for training data attribution: pure functions, numpy in, numbers out.

Every metric here is model-free so that it can be checked by hand on a five-line example;
the runners that retrain models and rank units live elsewhere and only call these.

Sign conventions shared by all metrics (see METHOD.md, "Evaluation protocols"):

* A **score** is high when the unit *supports* the query: training on it lowered the query
  loss, so removing it would raise the loss.
* Rankings are given best first (index 0 = rank 1) and contain each id once.
* Tail-patch deltas are changes of the query completion's log-probability in nats: positive
  means the step on the unit made the completion more likely.
* Leave-k-out differences are ``loss(top-k removed) - loss(random-k removed)``: positive means
  the method found units whose removal hurts the query more than chance.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from bgotrace.errors import InputError

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


@dataclass(frozen=True)
class MetricSummary:
    """A mean with a confidence interval, as every metric is reported."""

    mean: float
    """Mean over the finite values (NaN when there are none)."""
    lo: float
    """Lower end of the interval."""
    hi: float
    """Upper end of the interval."""
    n: int
    """Number of finite values the summary is based on."""
    n_nan: int = 0
    """Number of NaN values dropped (e.g. queries whose Spearman correlation is undefined)."""

    def __str__(self) -> str:
        dropped = f", {self.n_nan} NaN dropped" if self.n_nan else ""
        return f"{self.mean:.3f} [{self.lo:.3f}, {self.hi:.3f}] (n={self.n}{dropped})"


@dataclass(frozen=True)
class TailPatchSummary:
    """Tail-patch result: the method's top-k units beside the random-k control."""

    topk: MetricSummary
    """Mean log-probability change (nats) after a step on the method's top-k units."""
    random: MetricSummary
    """The same for k random units: the chance level."""
    difference: MetricSummary
    """Per-query paired difference topk - random; above 0 means better than chance."""


# --------------------------------------------------------------------------- validation


def _check_k(k: int) -> None:
    if k < 1:
        raise InputError(f"k must be at least 1, got {k}: pass a positive cut-off.")


def _check_ranking(ranked: Sequence[Hashable], what: str = "ranked_ids") -> list[Hashable]:
    items = list(ranked)
    if not items:
        raise InputError(f"{what} is empty: rank at least one unit before computing metrics.")
    return items


def _check_unique(items: list[Hashable]) -> None:
    if len(set(items)) != len(items):
        raise InputError(
            "ranked_ids contains duplicates: aggregate unit scores to one score per id first."
        )


def _check_relevant(relevant_ids: Sequence[Hashable] | set[Hashable]) -> set[Hashable]:
    relevant = set(relevant_ids)
    if not relevant:
        raise InputError("relevant_ids is empty: this query has no ground truth for the metric.")
    return relevant


def _as_finite_1d(values: object, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise InputError(f"{what} must be one-dimensional, got shape {arr.shape}.")
    if arr.size == 0:
        raise InputError(f"{what} is empty: pass at least one value.")
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{what} contains NaN or inf: remove or fix the non-finite values.")
    return arr


def _check_same_length(a: np.ndarray, b: np.ndarray, names: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise InputError(f"{names} have different lengths ({a.shape[0]} vs {b.shape[0]}).")


# --------------------------------------------------------------------------- ranking metrics


def recall_at_k(
    ranked_ids: Sequence[Hashable], relevant_ids: Sequence[Hashable] | set[Hashable], k: int
) -> float:
    """Fraction of the relevant ids found in the top ``k``: ``hits / min(k, |relevant|)``.

    The denominator is capped at ``k`` so that a perfect ranking scores 1 even when a fact is
    stated in more documents than ``k`` (recall@1 of a fact planted in 4 documents is 1 if the
    first document states it); the plain ``hits / |relevant|`` could never reach 1 there.
    """
    _check_k(k)
    items = _check_ranking(ranked_ids)
    _check_unique(items)
    relevant = _check_relevant(relevant_ids)
    hits = len(relevant.intersection(items[:k]))
    return hits / min(k, len(relevant))


def reciprocal_rank(
    ranked_ids: Sequence[Hashable], relevant_ids: Sequence[Hashable] | set[Hashable]
) -> float:
    """``1 / rank`` of the first relevant id (1-based), or 0 if none is ranked; MRR is its mean."""
    items = _check_ranking(ranked_ids)
    _check_unique(items)
    relevant = _check_relevant(relevant_ids)
    for position, item in enumerate(items, start=1):
        if item in relevant:
            return 1.0 / position
    return 0.0


def precision_at_k(ranked_labels: Sequence[Hashable], target_label: Hashable, k: int) -> float:
    """Fraction of the top ``k`` items whose label is ``target_label``.

    Used for source attribution: the labels are the sources of the ranked units. When the
    ranking is shorter than ``k`` the whole ranking is the top ``k`` (denominator ``min(k, n)``).
    Labels may repeat, unlike ids.
    """
    _check_k(k)
    labels = _check_ranking(ranked_labels, "ranked_labels")[:k]
    return sum(label == target_label for label in labels) / len(labels)


def rank_of(ranked_ids: Sequence[Hashable], target: Hashable) -> int:
    """1-based position of ``target`` in the ranking (e.g. the true source among sources)."""
    items = _check_ranking(ranked_ids)
    try:
        return items.index(target) + 1
    except ValueError:
        raise InputError(
            f"{target!r} is not in the ranking: rank every candidate, including the target."
        ) from None


# --------------------------------------------------------------------------- correlations


def _spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column of ``a`` (m, q) with the same column of ``b``.

    Ties get average ranks; a column that is constant in either input has no defined
    correlation and yields NaN (rather than a warning and an arbitrary number).
    """
    ra = stats.rankdata(a, axis=0)
    rb = stats.rankdata(b, axis=0)
    ra -= ra.mean(axis=0)
    rb -= rb.mean(axis=0)
    denom = np.sqrt((ra**2).sum(axis=0) * (rb**2).sum(axis=0))
    num = (ra * rb).sum(axis=0)
    out = np.full(a.shape[1], np.nan)
    ok = denom > 0
    out[ok] = np.clip(num[ok] / denom[ok], -1.0, 1.0)
    return out


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks).

    Ties get average ranks (as ``scipy.stats.spearmanr``); NaN if x or y is constant.
    """
    xa = _as_finite_1d(x, "x")
    ya = _as_finite_1d(y, "y")
    _check_same_length(xa, ya, "x and y")
    return float(_spearman_columns(xa[:, None], ya[:, None])[0])


def _check_lds_inputs(masks: np.ndarray, scores: np.ndarray, losses: np.ndarray) -> None:
    if masks.ndim != 2 or masks.dtype != np.bool_:
        raise InputError(
            f"subset_masks must be a 2-D boolean array (m, n_units), got {masks.dtype} "
            f"with shape {masks.shape}."
        )
    if masks.shape[0] < 2:
        raise InputError("LDS needs at least 2 subsets (retrains); the protocol uses m >= 32.")
    if scores.shape[-1] != masks.shape[1]:
        raise InputError(
            f"unit_scores has {scores.shape[-1]} units but subset_masks has {masks.shape[1]}."
        )
    if losses.shape[0] != masks.shape[0]:
        raise InputError(
            f"subset_query_losses has {losses.shape[0]} rows but there are {masks.shape[0]} "
            "subsets."
        )
    for name, arr in (("unit_scores", scores), ("subset_query_losses", losses)):
        if not np.all(np.isfinite(arr)):
            raise InputError(f"{name} contains NaN or inf: fix or drop the affected retrain.")


def lds(
    subset_masks: np.ndarray, unit_scores: np.ndarray, subset_query_losses: np.ndarray
) -> float:
    """Linear datamodeling score of one query (Park et al. 2023).

    ``subset_masks`` (m, n_units) bool marks the units each retrain kept; ``unit_scores``
    (n_units,) are one method's scores for the query; ``subset_query_losses`` (m,) is the
    query loss of each retrained model. The prediction for a subset is the sum of its units'
    scores. Because a high score means "keeping this unit lowers the query loss", the
    prediction is correlated with **minus** the loss: a perfect method gets +1, a method
    with its sign flipped gets -1. Returns NaN when predictions or losses are constant.
    """
    masks = np.asarray(subset_masks)
    scores = np.asarray(unit_scores, dtype=np.float64)
    losses = np.asarray(subset_query_losses, dtype=np.float64)
    if scores.ndim != 1 or losses.ndim != 1:
        raise InputError("lds takes unit_scores (n_units,) and subset_query_losses (m,).")
    _check_lds_inputs(masks, scores, losses)
    predicted = masks.astype(np.float64) @ scores  # (m,)
    return float(_spearman_columns(predicted[:, None], -losses[:, None])[0])


def lds_over_queries(
    subset_masks: np.ndarray, unit_scores: np.ndarray, subset_query_losses: np.ndarray
) -> np.ndarray:
    """Per-query LDS for many queries at once; same sign convention as :func:`lds`.

    Shapes: ``subset_masks`` (m, n_units) bool, ``unit_scores`` (q, n_units),
    ``subset_query_losses`` (m, q) (one row per retrain, as it is evaluated on every query).
    Returns (q,) values, NaN where undefined; summarise them with :func:`bootstrap_ci`.
    """
    masks = np.asarray(subset_masks)
    scores = np.asarray(unit_scores, dtype=np.float64)
    losses = np.asarray(subset_query_losses, dtype=np.float64)
    if scores.ndim != 2 or losses.ndim != 2 or scores.shape[0] != losses.shape[1]:
        raise InputError(
            "lds_over_queries takes unit_scores (q, n_units) and subset_query_losses (m, q) "
            f"with the same q; got {scores.shape} and {losses.shape}."
        )
    _check_lds_inputs(masks, scores, losses)
    predicted = masks.astype(np.float64) @ scores.T  # (m, q)
    return _spearman_columns(predicted, -losses)


# --------------------------------------------------------------------------- intervals


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise InputError(f"alpha must be in (0, 1), got {alpha}: use 0.05 for a 95% interval.")


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, *, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> MetricSummary:
    """Mean over queries with a percentile-bootstrap ``1 - alpha`` interval.

    NaN rules: NaN values (a metric undefined for that query, e.g. LDS on constant losses)
    are dropped and counted in ``n_nan``; if all are NaN the summary is NaN with ``n = 0``.
    ±inf is an error, as is an empty input. With one value the interval is that value.
    The resampling is seeded so reports are reproducible.
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise InputError(f"values must be a non-empty 1-D array, got shape {arr.shape}.")
    if np.any(np.isinf(arr)):
        raise InputError("values contains inf: fix the metric that produced it.")
    if n_boot < 1:
        raise InputError(f"n_boot must be at least 1, got {n_boot}.")
    _check_alpha(alpha)
    finite = arr[~np.isnan(arr)]
    n, n_nan = finite.size, arr.size - finite.size
    if n == 0:
        return MetricSummary(float("nan"), float("nan"), float("nan"), 0, n_nan)
    mean = float(finite.mean())
    if n == 1:
        return MetricSummary(mean, mean, mean, 1, n_nan)
    rng = np.random.default_rng(seed)
    boot_means = finite[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    lo, hi = np.quantile(boot_means, [alpha / 2, 1 - alpha / 2])
    return MetricSummary(mean, float(lo), float(hi), n, n_nan)


def paired_difference_ci(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, *, alpha: float = 0.05
) -> MetricSummary:
    """Mean of the paired differences ``a - b`` with a Student-t ``1 - alpha`` interval.

    For leave-k-out retraining: ``a[i]`` is the query loss after removing the top-k units and
    ``b[i]`` after removing k random units, both retrained with seed i (pairing removes most
    of the seed noise). A t-interval, not a bootstrap, because there are only a few seeds.
    """
    aa = _as_finite_1d(a, "a")
    bb = _as_finite_1d(b, "b")
    _check_same_length(aa, bb, "a and b")
    _check_alpha(alpha)
    n = aa.size
    if n < 2:
        raise InputError(
            f"paired_difference_ci needs at least 2 pairs (seeds), got {n}: retrain with more "
            "seeds (the protocol uses >= 3)."
        )
    diff = aa - bb
    mean = float(diff.mean())
    half = float(stats.t.ppf(1 - alpha / 2, n - 1) * diff.std(ddof=1) / np.sqrt(n))
    return MetricSummary(mean, mean - half, mean + half, n)


def _per_query_means(deltas: np.ndarray | Sequence[float], what: str) -> np.ndarray:
    arr = np.asarray(deltas, dtype=np.float64)
    if arr.ndim == 2:
        if arr.shape[1] == 0:
            raise InputError(f"{what} has no units per query: pass shape (q,) or (q, k>=1).")
        arr = arr.mean(axis=1)  # (q, k) -> (q,)
    return _as_finite_1d(arr, what)


def tail_patch_summary(
    deltas_topk: np.ndarray | Sequence[float],
    deltas_random: np.ndarray | Sequence[float],
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> TailPatchSummary:
    """Summarise tail-patch log-probability changes of top-k units against random-k units.

    Each input is (q,) per-query means or (q, k) per-unit deltas (averaged over k first), in
    nats, positive = the step made the query completion more likely. Queries are paired: row
    i of both inputs is the same query. All three summaries use :func:`bootstrap_ci`.
    """
    top = _per_query_means(deltas_topk, "deltas_topk")
    rand = _per_query_means(deltas_random, "deltas_random")
    _check_same_length(top, rand, "deltas_topk and deltas_random (queries)")

    def summarise(values: np.ndarray) -> MetricSummary:
        return bootstrap_ci(values, n_boot=n_boot, alpha=alpha, seed=seed)

    return TailPatchSummary(summarise(top), summarise(rand), summarise(top - rand))
