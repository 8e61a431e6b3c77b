"""BGO scores equal the slow reference, per unit and per token, for every optimizer and variant.

Tolerance: float32 forward passes in batches of different shapes differ from the
one-unit float64 log-softmax reference by ~1e-6 nats; scores are differences of
such losses, so atol=2e-5 nats (rtol 1e-4) separates a correct path from a wrong one
(a wrong sign, a missed step or an untied head changes scores by > 1e-3 here).
"""

from __future__ import annotations

import numpy as np
import pytest

import bgotrace
from bgotrace.corpus import Document
from bgotrace.perturb.fisher import sample_units
from bgotrace.query import Query, encode_query
from tests.bgo_reference import fisher_diag, perturbed_copy, unit_token_nll
from tests.conftest import make_tiny_tokenizer
from tests.models import tiny_gpt2

TOL = {"atol": 2e-5, "rtol": 1e-4}
LR = {"sgd": 0.5, "adam": 3e-3, "fisher": 1e-6}


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tokenizer = make_tiny_tokenizer()
    return tiny_gpt2(tokenizer), tokenizer


DOCS = [
    Document(f"d{i}", text, src)
    for i, (text, src) in enumerate(
        [
            ("The quick brown fox jumps over the lazy dog.", "animals"),
            ("The cat sleeps on a warm mat while rivers carry sand.", "animals"),
            ("Paris is the capital of France, Berlin of Germany.", "geo"),
            ("Rome is the capital of Italy and Madrid of Spain.", "geo"),
            ("Water boils at one hundred degrees and ice melts at zero.", "science"),
            ("def add(a, b): return a + b", "code"),
            (
                "Gradients point uphill; a small step against the gradient lowers the loss.",
                "science",
            ),
        ]
    )
]
QUERY = Query("q", "Paris is the capital of", " France.")


def _reference(model, tokenizer, units, optimizer, variant, reduce, n_fisher=4):
    enc = encode_query(QUERY, tokenizer, None)
    fisher = None
    if optimizer == "fisher":
        fisher = fisher_diag(model, units, sample_units(len(units), n_fisher, seed=0))
    kw = dict(optimizer=optimizer, lr=LR[optimizer], steps=3, n_units=len(units), fisher=fisher)
    plus = perturbed_copy(model, enc.input_ids, enc.labels, sign=-1, **kw)
    minus = perturbed_copy(model, enc.input_ids, enc.labels, sign=+1, **kw)
    per_token = {}
    for name, m in (("ascent", minus), ("descent", plus), ("base", model)):
        per_token[name] = [unit_token_nll(m, ids) for ids in units]
    combine = {
        "bidirectional": lambda a, d, b: a - d,
        "ascent": lambda a, d, b: a - b,
        "descent": lambda a, d, b: b - d,
        "abs": lambda a, d, b: np.abs(a - d),
    }[variant]
    red = np.mean if reduce == "mean" else np.sum
    unit = np.array(
        [
            combine(
                red(per_token["ascent"][i]), red(per_token["descent"][i]), red(per_token["base"][i])
            )
            for i in range(len(units))
        ]
    )
    tokens = [
        combine(per_token["ascent"][i], per_token["descent"][i], per_token["base"][i])
        for i in range(len(units))
    ]
    return unit, tokens


def _run(model, tokenizer, tmp_path, optimizer, variant, reduce, batch_size=3):
    cfg = {
        "corpus": {"max_length": 12, "stride": 4, "cache_dir": str(tmp_path / "cache")},
        "perturb": {"optimizer": optimizer, "lr": LR[optimizer], "steps": 3, "fisher_samples": 4},
        # raw loss changes: the normalised default is checked in tests/test_normalize.py
        "scoring": {
            "score": variant,
            "reduce": reduce,
            "batch_size": batch_size,
            "normalize": "none",
        },
        "output": {"top_tokens": 100},
    }
    result = bgotrace.attribute(
        model, tokenizer, DOCS, prompt=QUERY.prompt, completion=QUERY.completion, config=cfg
    )
    from bgotrace.cache import get_token_cache
    from bgotrace.corpus import ChunkingConfig

    cache = get_token_cache(DOCS, tokenizer, ChunkingConfig(12, 4), tmp_path / "cache")
    return result, [cache.unit_tokens(i).tolist() for i in range(len(cache))]


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "fisher"])
@pytest.mark.parametrize("variant", ["bidirectional", "ascent", "descent", "abs"])
def test_scores_match_slow_reference(model_and_tokenizer, tmp_path, optimizer, variant):
    model, tokenizer = model_and_tokenizer
    reduce = "sum" if variant == "descent" else "mean"
    result, units = _run(model, tokenizer, tmp_path, optimizer, variant, reduce)
    ref_unit, ref_tokens = _reference(model, tokenizer, units, optimizer, variant, reduce)
    got = result.scores.sort_values("unit_index")["score"].to_numpy()
    assert len(got) > len(DOCS)  # stride/max_length produced several units per long doc
    np.testing.assert_allclose(got, ref_unit, **TOL)
    assert np.abs(ref_unit).max() > 1e-3  # the perturbation moved the losses measurably
    for row in result.top_tokens:
        i = int(result.scores.set_index("unit_id").loc[row["unit_id"], "unit_index"])
        np.testing.assert_allclose(row["token_scores"], ref_tokens[i], atol=TOL["atol"])
        assert len(row["tokens"]) == len(row["token_scores"]) + 1
