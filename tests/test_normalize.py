"""``--normalize sensitivity`` against a slow loop, and the hub diagnostic on hand-made scores.

Tolerance of the sensitivity check: the module takes the gradient of the summed token NLL
through its own loss path; the reference lets Hugging Face's loss (mean NLL) backpropagate
into the model's .grad and rescales by the token count. Both are float32 and differ by
rounding only (~1e-6 relative), so rtol 1e-4 separates right from wrong (a missed parameter
or a mean instead of a sum changes a norm by far more).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bgotrace.cache import get_token_cache
from bgotrace.corpus import ChunkingConfig
from bgotrace.eval.hubs import hub_counts, hub_diagnostics, mean_spearman
from bgotrace.perturb.sensitivity import (
    cached_sensitivity,
    normalize_scores,
    normalized,
    sensitivity_from,
    unit_gradient_norms,
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


def _slow_norms(model, cache, names):
    """One unit at a time: HF's mean loss × tokens, backpropagated into .grad."""
    out = []
    for i in range(len(cache)):
        model.zero_grad()
        ids = torch.as_tensor(cache.unit_tokens(i).astype(np.int64))[None]
        (model(ids, labels=ids).loss * (ids.shape[1] - 1)).backward()
        params = dict(model.named_parameters())
        out.append(float(torch.sqrt(sum((params[n].grad.double() ** 2).sum() for n in names))))
    model.zero_grad()
    return np.array(out)


@pytest.mark.parametrize("selection", ["all", "last"])
def test_gradient_norms_match_a_slow_loop(setup, cache, selection):
    model, _ = setup
    names = [n for n, _ in model.named_parameters()]
    if selection == "last":
        names = [n for n in names if ".h.1." in n]
    fast, counts = unit_gradient_norms(model, cache, names, torch.device("cpu"))
    slow = _slow_norms(model, cache, names)
    np.testing.assert_allclose(fast, slow, rtol=1e-4)
    np.testing.assert_array_equal(counts, cache.lengths - 1)
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_sensitivity_is_cached_and_reduces_like_the_scores(setup, cache):
    model, _ = setup
    names = [n for n, _ in model.named_parameters()]
    kw = dict(device=torch.device("cpu"))
    s_sum = cached_sensitivity(model, cache, names, reduce="sum", **kw)
    assert len(list((cache.root / "sensitivity").glob("*.npz"))) == 1
    s_mean = cached_sensitivity(model, cache, names, reduce="mean", **kw)  # from the cache
    np.testing.assert_allclose(s_mean, s_sum / (cache.lengths - 1), rtol=1e-12)
    scores = np.arange(len(cache), dtype=np.float64)[None]
    assert normalized(scores, None) is scores
    np.testing.assert_allclose(normalized(scores, s_sum), scores / s_sum)


def test_sensitivity_units_and_floor():
    norms = np.array([6.0, 0.0])
    np.testing.assert_allclose(sensitivity_from(norms, np.array([3, 1]), "mean"), [2.0, 0.0])
    np.testing.assert_allclose(sensitivity_from(norms, np.array([3, 1]), "sum"), norms)
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


def test_normalized_scores_are_raw_scores_over_slow_gradient_norms(setup, tiny_documents, tmp_path):
    """End to end: the default ranks by raw BGO score / ‖∇L(z)‖ of the slow loop (rtol 1e-4)."""
    import bgotrace

    model, tokenizer = setup

    def run(normalize: str):
        cfg = {
            "corpus": {"max_length": 16, "cache_dir": str(tmp_path / "cache")},
            "perturb": {"steps": 2},
            "scoring": {"normalize": normalize},
        }
        result = bgotrace.attribute(
            model, tokenizer, tiny_documents, prompt="Paris is the capital of",
            completion=" France.", config=cfg,
        )  # fmt: skip
        for row in result.top_tokens:  # token changes (nats) add up to the unit's raw change
            # float32 per-token losses of a unit alone vs in a batch, 6 decimals kept: 1e-4 nats
            assert sum(row["token_scores"]) == pytest.approx(
                row["score"] * row["normalizer"], abs=1e-4
            )
        assert {r["normalizer"] == 1.0 for r in result.top_tokens} == {normalize == "none"}
        return result.scores.sort_values("unit_index")["score"].to_numpy()

    raw, default = run("none"), run("sensitivity")
    cache = get_token_cache(tiny_documents, tokenizer, ChunkingConfig(16), tmp_path / "cache")
    slow = _slow_norms(model, cache, [n for n, _ in model.named_parameters()])
    np.testing.assert_allclose(default, raw / slow, rtol=1e-4)
    assert bgotrace.config.ScoreConfig().normalize == "sensitivity"  # the shipped default
