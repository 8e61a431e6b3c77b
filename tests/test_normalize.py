"""``--normalize sensitivity`` against a slow loop, and the hub diagnostic on hand-made scores.

Tolerance of the sensitivity check: both sides are float32 forward passes of the same model;
batched (padded, bucketed) vs one-unit passes differ by ~1e-6 nats per unit loss, and a
half difference of two such losses under a 1e-3 relative perturbation is ~1e-3 nats, so
atol 2e-5 nats (rtol 1e-3) separates right from wrong (a wrong sign or direction changes
it by its own size).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bgotrace.cache import get_token_cache
from bgotrace.corpus import ChunkingConfig
from bgotrace.eval.hubs import hub_counts, hub_diagnostics, mean_spearman
from bgotrace.perturb.sensitivity import (
    RADIUS,
    cached_sensitivity,
    half_differences,
    normalize_scores,
    random_directions,
    sensitivity_from,
)
from tests.conftest import make_tiny_tokenizer
from tests.models import tiny_gpt2


@pytest.fixture(scope="module")
def setup():
    tokenizer = make_tiny_tokenizer()
    model = tiny_gpt2(tokenizer, seed=3)
    return model, tokenizer


@pytest.fixture
def cache(setup, tiny_documents, tmp_path):
    _, tokenizer = setup
    return get_token_cache(tiny_documents, tokenizer, ChunkingConfig(max_length=16), tmp_path)


def _slow_half_differences(model, cache, names, seed):
    """One unit at a time, the perturbed weights loaded into a copy of the model."""
    import copy

    out = []
    for d in random_directions(model, names, 4, seed):
        plus, minus = copy.deepcopy(model), copy.deepcopy(model)
        with torch.no_grad():
            for n, p in plus.named_parameters():
                if n in d:
                    p.add_(d[n])
            for n, p in minus.named_parameters():
                if n in d:
                    p.sub_(d[n])
        row = []
        for i in range(len(cache)):
            ids = torch.as_tensor(cache.unit_tokens(i).astype(np.int64))[None]
            n_tok = ids.shape[1] - 1
            with torch.no_grad():
                lp = plus(ids, labels=ids).loss.double() * n_tok
                lm = minus(ids, labels=ids).loss.double() * n_tok
            row.append(float(lp - lm) / 2)
        out.append(row)
    return np.array(out)


def test_half_differences_match_a_slow_loop(setup, cache):
    model, _ = setup
    names = [n for n, _ in model.named_parameters()]
    fast, counts = half_differences(
        model, cache, names, seed=0, batch_size=3, pad_id=0, device=torch.device("cpu")
    )
    slow = _slow_half_differences(model, cache, names, seed=0)
    np.testing.assert_allclose(fast, slow, atol=2e-5, rtol=1e-3)
    np.testing.assert_array_equal(counts, cache.lengths - 1)
    assert np.abs(fast).max() > 1e-4  # the perturbation is not vanishingly small


def test_directions_have_the_stated_radius(setup):
    model, _ = setup
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    (d,) = random_directions(model, names, 1, seed=0)
    for n in names:
        norm = float(params[n].detach().norm())
        if norm > 0:
            assert float(d[n].norm()) == pytest.approx(RADIUS * norm, rel=1e-4)


def test_sensitivity_is_cached_and_reduces_like_the_scores(setup, cache):
    model, _ = setup
    names = [n for n, _ in model.named_parameters()]
    kw = dict(seed=0, batch_size=4, pad_id=0, device=torch.device("cpu"))
    s_sum = cached_sensitivity(model, cache, names, reduce="sum", **kw)
    assert len(list((cache.root / "sensitivity").glob("*.npz"))) == 1
    s_mean = cached_sensitivity(model, cache, names, reduce="mean", **kw)  # from the cache
    np.testing.assert_allclose(s_mean, s_sum / (cache.lengths - 1), rtol=1e-12)


def test_sensitivity_is_rms_of_half_differences():
    diffs = np.array([[3.0, 0.0], [4.0, 0.0]])
    s = sensitivity_from(diffs, np.array([1, 1]), "sum")
    np.testing.assert_allclose(s, [np.sqrt(12.5), 0.0])
    scaled = normalize_scores(np.array([[1.0, 1.0]]), np.array([2.0, 0.0]))
    np.testing.assert_allclose(scaled, [[0.5, 1.0 / (1e-3 * 2.0)]])  # zero floored


def test_hub_counts_count_each_group_once():
    scores = np.array(
        [
            [9.0, 1.0, 0.0, 5.0],  # group a
            [9.0, 0.0, 1.0, 5.0],  # group a again: unit 0 counts once for a
            [9.0, 5.0, 0.0, 0.0],  # group b
        ]
    )
    counts = hub_counts(scores, ["a", "a", "b"], k=1)
    np.testing.assert_array_equal(counts, [2, 0, 0, 0])
    diag = hub_diagnostics(
        scores, ["a", "a", "b"], np.array([1, 2, 3, 4]), np.array([4, 3, 2, 1]), k=1, share=1.0
    )
    assert diag["hub_share"] == 1.0 and diag["hub_units"] == 1.0


def test_hub_correlations():
    lengths = np.array([1.0, 2.0, 3.0, 4.0])
    assert mean_spearman(np.array([[1.0, 2.0, 3.0, 4.0]]), lengths) == pytest.approx(1.0)
    assert mean_spearman(np.array([[4.0, 3.0, 2.0, 1.0]]), lengths) == pytest.approx(-1.0)
    assert np.isnan(mean_spearman(np.array([[1.0, 1.0, 1.0, 1.0]]), lengths))
