"""Metrics on examples small enough to check by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from bgotrace.errors import InputError
from bgotrace.eval import (
    MetricSummary,
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

RANKING = ["d3", "d1", "d7", "d2", "d5"]  # best first


# ----------------------------------------------------------------------------- ranking


def test_recall_at_k_hand_examples() -> None:
    # relevant {d1, d2}: top-1 = [d3] -> 0 hits / min(1, 2) = 0
    assert recall_at_k(RANKING, ["d1", "d2"], 1) == 0.0
    # top-2 = [d3, d1] -> 1 hit / min(2, 2) = 0.5
    assert recall_at_k(RANKING, ["d1", "d2"], 2) == 0.5
    # top-4 = [d3, d1, d7, d2] -> 2 hits / 2 = 1
    assert recall_at_k(RANKING, ["d1", "d2"], 4) == 1.0
    # |relevant| = 3 > k = 1: top-1 = [d3] is relevant -> 1 / min(1, 3) = 1 (documented choice)
    assert recall_at_k(RANKING, ["d3", "d1", "d9"], 1) == 1.0
    # k = 2, relevant {d3, d9, d8}: 1 hit / min(2, 3) = 0.5
    assert recall_at_k(RANKING, {"d3", "d9", "d8"}, 2) == 0.5
    # k larger than the ranking: top-10 is the whole ranking; 1 hit (d5) / min(10, 2) = 0.5
    assert recall_at_k(RANKING, ["d5", "d9"], 10) == 0.5


def test_reciprocal_rank_hand_examples() -> None:
    assert reciprocal_rank(RANKING, ["d3"]) == 1.0  # rank 1
    assert reciprocal_rank(RANKING, ["d2", "d7"]) == pytest.approx(1 / 3)  # d7 at rank 3 first
    assert reciprocal_rank(RANKING, ["d5"]) == pytest.approx(1 / 5)
    assert reciprocal_rank(RANKING, ["d9"]) == 0.0  # never ranked


def test_precision_at_k_and_rank_of() -> None:
    labels = ["fortunes", "devil", "fortunes", "foldoc", "fortunes"]
    assert precision_at_k(labels, "fortunes", 1) == 1.0  # [F]
    assert precision_at_k(labels, "fortunes", 2) == 0.5  # [F, D]
    assert precision_at_k(labels, "fortunes", 4) == 0.5  # [F, D, F, O] -> 2/4
    assert precision_at_k(labels, "fortunes", 10) == pytest.approx(3 / 5)  # whole list: 3/5
    assert precision_at_k(labels, "facts", 3) == 0.0
    assert rank_of(["devil", "facts", "fortunes"], "fortunes") == 3
    assert rank_of(RANKING, "d3") == 1


@pytest.mark.parametrize(
    "call",
    [
        lambda: recall_at_k(RANKING, ["d1"], 0),  # k < 1
        lambda: recall_at_k([], ["d1"], 1),  # empty ranking
        lambda: recall_at_k(RANKING, [], 1),  # no ground truth
        lambda: recall_at_k(["a", "a", "b"], ["a"], 2),  # duplicate ids would double-count
        lambda: reciprocal_rank(RANKING, []),
        lambda: precision_at_k(["a"], "a", 0),
        lambda: precision_at_k([], "a", 3),
        lambda: rank_of(RANKING, "d9"),  # target absent
        lambda: spearman([1.0, 2.0], [1.0, 2.0, 3.0]),  # mismatched lengths
        lambda: spearman([], []),
        lambda: spearman([1.0, np.nan], [1.0, 2.0]),
        lambda: bootstrap_ci([]),
        lambda: bootstrap_ci([1.0, np.inf]),
        lambda: bootstrap_ci([1.0, 2.0], alpha=1.5),
        lambda: paired_difference_ci([1.0], [0.5]),  # fewer than 2 pairs
        lambda: paired_difference_ci([1.0, 2.0], [0.5]),
        lambda: tail_patch_summary([0.1, 0.2], [0.0]),
    ],
)
def test_bad_inputs_raise_one_line_input_error(call) -> None:
    with pytest.raises(InputError) as info:
        call()
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- correlations


def test_spearman_hand_examples() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # x ranks (1, 2, 3), y = (1, 3, 2) -> d = (0, -1, 1), 1 - 6*2/(3*8) = 0.5
    assert spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    # ties: y = (1, 1, 2) ranks (1.5, 1.5, 3); centred x (-1, 0, 1), y (-.5, -.5, 1)
    # r = (0.5 + 0 + 1) / sqrt(2 * 1.5) = 1.5 / sqrt(3) = 0.8660
    assert spearman([1, 2, 3], [1, 1, 2]) == pytest.approx(np.sqrt(3) / 2)
    assert np.isnan(spearman([1, 2, 3], [5, 5, 5]))  # constant input
    assert np.isnan(spearman([1.0], [2.0]))  # a single point has no correlation


def test_spearman_matches_scipy_with_ties() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.integers(0, 5, size=30).astype(float)  # many ties
        y = x + rng.integers(-2, 3, size=30)
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


def test_lds_sign_when_scores_predict_losses_perfectly() -> None:
    # 3 units with scores 3, 1, -2 (unit 0 supports the query most, unit 2 opposes it).
    scores = np.array([3.0, 1.0, -2.0])
    masks = np.array(
        [
            [True, True, False],  # kept score sum 4
            [True, False, True],  # 1
            [False, True, True],  # -1
            [True, True, True],  # 2
        ]
    )
    # Loss falls as the kept score sum rises: loss = 10 - sum.
    losses = 10.0 - masks.astype(float) @ scores  # (6, 9, 11, 8)
    assert lds(masks, scores, losses) == pytest.approx(1.0)
    assert lds(masks, -scores, losses) == pytest.approx(-1.0)  # flipped sign -> -1
    assert np.isnan(lds(masks, scores, np.ones(4)))  # constant losses: undefined


def test_lds_over_queries_matches_single_query_lds() -> None:
    rng = np.random.default_rng(1)
    masks = rng.random((8, 6)) < 0.5
    scores = rng.normal(size=(3, 6))  # (q, n_units)
    losses = rng.normal(size=(8, 3))  # (m, q)
    per_query = lds_over_queries(masks, scores, losses)
    assert per_query.shape == (3,)
    for q in range(3):
        assert per_query[q] == pytest.approx(lds(masks, scores[q], losses[:, q]))


def test_lds_rejects_bad_shapes() -> None:
    masks = np.ones((4, 3), dtype=bool)
    with pytest.raises(InputError, match="boolean"):
        lds(masks.astype(int), np.zeros(3), np.zeros(4))
    with pytest.raises(InputError, match="units"):
        lds(masks, np.zeros(5), np.zeros(4))
    with pytest.raises(InputError, match="rows"):
        lds(masks, np.zeros(3), np.zeros(5))
    with pytest.raises(InputError, match="NaN"):
        lds(masks, np.zeros(3), np.array([1.0, np.nan, 2.0, 3.0]))


# ----------------------------------------------------------------------------- intervals


def test_bootstrap_ci_contains_mean_and_shrinks_with_n() -> None:
    rng = np.random.default_rng(2)
    small = bootstrap_ci(rng.normal(1.0, 1.0, size=20))
    large = bootstrap_ci(rng.normal(1.0, 1.0, size=2000))
    for summary in (small, large):
        assert summary.lo <= summary.mean <= summary.hi
    assert (large.hi - large.lo) < 0.5 * (small.hi - small.lo)  # width ~ 1/sqrt(n)
    assert large.n == 2000


def test_bootstrap_ci_nan_rules_and_determinism() -> None:
    s = bootstrap_ci([1.0, np.nan, 3.0])
    assert (s.mean, s.n, s.n_nan) == (2.0, 2, 1)  # NaN dropped and counted
    assert bootstrap_ci([0.4]) == MetricSummary(0.4, 0.4, 0.4, 1)
    all_nan = bootstrap_ci([np.nan, np.nan])
    assert all_nan.n == 0 and all_nan.n_nan == 2 and np.isnan(all_nan.mean)
    values = np.arange(10.0)
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci([5.0, 5.0, 5.0]) == MetricSummary(5.0, 5.0, 5.0, 3)


def test_paired_difference_ci_hand_example() -> None:
    # differences a - b = (1, 2, 3): mean 2, sd 1, se 1/sqrt(3), t(0.975, df=2) = 4.3027
    summary = paired_difference_ci([3.0, 5.0, 7.0], [2.0, 3.0, 4.0])
    half = 4.302652729749464 / np.sqrt(3)
    assert summary.mean == pytest.approx(2.0)
    assert (summary.lo, summary.hi) == pytest.approx((2.0 - half, 2.0 + half))
    assert summary.n == 3


def test_tail_patch_summary_pairs_queries() -> None:
    # (q=2, k=2): per-query means top = (0.3, 0.5), random = (0.0, 0.1); differences (0.3, 0.4)
    summary = tail_patch_summary([[0.2, 0.4], [0.5, 0.5]], [[0.0, 0.0], [0.1, 0.1]])
    assert summary.topk.mean == pytest.approx(0.4)
    assert summary.random.mean == pytest.approx(0.05)
    assert summary.difference.mean == pytest.approx(0.35)
    assert 0.3 <= summary.difference.lo <= summary.difference.hi <= 0.4
