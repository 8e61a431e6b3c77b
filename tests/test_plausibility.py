"""The check that says when the model would not produce the query."""

from __future__ import annotations

import pytest
import torch

from bgotrace.config import AttributeConfig
from bgotrace.generate import generate_completion
from bgotrace.modeling.losses import forward_logits
from bgotrace.pipeline import load_inputs, run_attribution
from bgotrace.plausibility import GAP_WARN, check_query, greedy_continuation_loss
from bgotrace.query import Query, encode_query
from tests.conftest import make_tiny_tokenizer
from tests.models import memorise, tiny_gpt2, tiny_llama

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


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_cached_greedy_continuation_equals_reading_the_whole_prefix_each_step(tokenizer, build):
    """The KV-cached decoding against the slow obvious loop (whole sequence every step);
    float32 attention over a cache vs over the full sequence: atol 1e-5 nats."""
    model = build(tokenizer, seed=3)
    prefix = encode_query(ALIEN, tokenizer, None).input_ids[:, :5]  # (1, 5)
    ids, total = prefix, 0.0
    for _ in range(7):
        with torch.no_grad():
            logp = torch.log_softmax(forward_logits(model, ids)[:, -1].float(), dim=-1)
        best = logp.argmax(dim=-1, keepdim=True)
        total -= float(logp.gather(1, best))
        ids = torch.cat([ids, best], dim=1)
    assert greedy_continuation_loss(model, prefix, 7) == pytest.approx(total / 7, abs=1e-5)


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_greedy_decoding_reads_one_new_token_a_step_through_the_returned_cache(
    tokenizer, build, monkeypatch
):
    """The cache the forward returns is found (by the output class's own field, so no
    deprecation warning reaches the user's console) and each step after the first reads
    one token."""
    from transformers.utils import generic

    model = build(tokenizer, seed=3)
    widths, warned = [], []
    forward = model.forward
    monkeypatch.setattr(
        model, "forward", lambda **kw: widths.append(kw["input_ids"].shape[1]) or forward(**kw)
    )
    monkeypatch.setattr(generic.logger, "warning_once", lambda msg, *a: warned.append(msg))
    prefix = encode_query(ALIEN, tokenizer, None).input_ids[:, :5]
    greedy_continuation_loss(model, prefix, 4)
    assert widths == [5, 1, 1, 1] and not warned
