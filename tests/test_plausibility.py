"""The check that says when the model would not produce the query."""

from __future__ import annotations

import pytest

from bgotrace.config import AttributeConfig
from bgotrace.generate import generate_completion
from bgotrace.pipeline import load_inputs, run_attribution
from bgotrace.plausibility import GAP_WARN, check_query
from bgotrace.query import Query, encode_query
from tests.conftest import make_tiny_tokenizer
from tests.models import memorise, tiny_gpt2

TEXT_PROMPT, TEXT_COMPLETION = "Paris is the capital of", " France, Berlin of Germany."
OWN = Query("own", TEXT_PROMPT, TEXT_COMPLETION)
ALIEN = Query("alien", TEXT_PROMPT, " the lazy dog while rivers carry sand.")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def memorised(tokenizer):
    """A tiny model that has learned the one sentence of OWN."""
    return memorise(tiny_gpt2(tokenizer, seed=4), encode_query(OWN, tokenizer, None).input_ids)


def test_own_text_passes_and_greedy_reproduces_it(tokenizer, memorised):
    encoded = encode_query(OWN, tokenizer, None)
    check = check_query(memorised, encoded)
    assert check.greedy_reproduces and check.greedy_match == 1.0
    assert check.loss < 0.1 and check.gap is not None and abs(check.gap) < 1e-5
    assert check.warning is None
    # top-1 given the true prefix everywhere == what greedy decoding writes
    n = encoded.n_loss_tokens
    assert generate_completion(memorised, tokenizer, TEXT_PROMPT, max_new_tokens=n) == (
        TEXT_COMPLETION
    )


def test_alien_text_is_flagged(tokenizer, memorised):
    check = check_query(memorised, encode_query(ALIEN, tokenizer, None))
    assert not check.greedy_reproduces and check.gap is not None and check.gap > GAP_WARN
    assert check.warning is not None and "would not write this completion" in check.warning


def test_style_queries_have_no_gap(tokenizer, memorised):
    q = Query("s", "", TEXT_PROMPT + TEXT_COMPLETION, loss_on="all")
    check = check_query(memorised, encode_query(q, tokenizer, None))
    assert check.gap is None and check.warning is None and check.loss < 0.1


def test_summary_carries_checks_and_warnings(tokenizer, memorised, tiny_documents, tmp_path):
    config = AttributeConfig.from_dict(
        {
            "model": {"path": "in-memory"},
            "corpus": {"path": "in-memory", "max_length": 12, "cache_dir": str(tmp_path)},
            "query": {"prompt": TEXT_PROMPT, "completion": " x"},
            "method": "bm25",
        }
    )
    inputs = load_inputs(
        config, model=memorised, tokenizer=tokenizer, documents=tiny_documents,
        queries=[OWN, ALIEN],
    )  # fmt: skip
    summary = run_attribution(config, inputs).summary
    checks = {q["query_id"]: q["model_check"] for q in summary["queries"]}
    assert checks["own"]["warning"] is None and checks["alien"]["warning"]
    assert summary["warnings"] == [checks["alien"]["warning"]]
