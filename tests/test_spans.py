"""Spans of a completion as queries: splitting, one shared sweep, and scores equal to a
slow reference that attributes each span as a separate query with that loss mask."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bgotrace.config import AttributeConfig, PerturbConfig
from bgotrace.corpus import Document
from bgotrace.errors import ConfigError
from bgotrace.pipeline import load_inputs, run_attribution
from bgotrace.query import EncodedQuery, Query, encode_query
from bgotrace.spans import expand_spans, sentence_boundaries
from tests.conftest import make_tiny_tokenizer
from tests.models import tiny_gpt2

PROMPT = "Paris is the capital of"
COMPLETION = " France. Water boils at one hundred degrees. The fox jumps!"
SENTENCES = [" France.", " Water boils at one hundred degrees.", " The fox jumps!"]
DOCS = [
    Document("fox", "The quick brown fox jumps over the lazy dog.", "animals"),
    Document("paris", "Paris is the capital of France, Berlin of Germany.", "geography"),
    Document("water", "Water boils at one hundred degrees and ice melts at zero.", "science"),
    Document("code", "def add(a, b): return a + b", "code"),
]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_gpt2(tokenizer)


def config(tmp_path, spans: str = "none", **scoring) -> AttributeConfig:
    return AttributeConfig.from_dict(
        {
            "model": {"path": "<in-memory>"},
            "corpus": {"path": "<docs>", "max_length": 12, "cache_dir": str(tmp_path / "cache")},
            "query": {"prompt": PROMPT, "completion": COMPLETION, "spans": spans},
            "perturb": {"steps": 2, "lr": 1e-3},
            "scoring": {"batch_size": 3, **scoring},
            "output": {"top_tokens": 2},
        }
    )


def run(cfg, model, tokenizer, queries=None, out=None):
    if out is not None:
        cfg.output.out = str(out)
    inputs = load_inputs(cfg, model=model, tokenizer=tokenizer, documents=DOCS)
    if queries is not None:
        inputs.queries = queries
    return run_attribution(cfg, inputs)


def reference_span_query(tokenizer, start: int, end: int, name: str) -> EncodedQuery:
    """The loss mask of completion characters [start, end), built without bgotrace.spans:
    tokens of the completion prefix up to ``end`` that are not tokens of the prefix up to
    ``start`` (sentence boundaries are before a space, where byte-level BPE splits anyway)."""
    whole = encode_query(Query(name, PROMPT, COMPLETION), tokenizer, None)
    n_prompt = len(tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
    first = len(tokenizer(COMPLETION[:start], add_special_tokens=False)["input_ids"])
    last = len(tokenizer(COMPLETION[:end], add_special_tokens=False)["input_ids"])
    labels = torch.full_like(whole.input_ids, -100)
    labels[0, n_prompt + first : n_prompt + last] = whole.input_ids[
        0, n_prompt + first : n_prompt + last
    ]
    return EncodedQuery(Query(name, PROMPT, COMPLETION), whole.input_ids, labels)


def test_sentence_boundaries_keep_the_space_with_the_next_sentence():
    assert sentence_boundaries(COMPLETION) == [8, 44]
    assert sentence_boundaries("One. Two") == [4]
    assert sentence_boundaries("No end") == []
    assert sentence_boundaries("Ends here. ") == []  # nothing but space after the last stop
    assert sentence_boundaries("One.\n\nTwo! Three") == [4, 10]  # ".\n\n" ends one sentence


@pytest.mark.parametrize("mode", ["sentence", "tokens:3", "tokens:1", "auto"])
def test_spans_partition_the_completion_and_its_loss_tokens(tokenizer, mode):
    whole = encode_query(Query("q", PROMPT, COMPLETION), tokenizer, None)
    family = expand_spans(whole, tokenizer, mode)
    assert family[0] is whole
    spans = family[1:]
    assert len(spans) >= 2
    assert "".join(s.span.text for s in spans) == COMPLETION
    assert [s.span.char_start for s in spans[1:]] == [s.span.char_end for s in spans[:-1]]
    masks = torch.stack([s.labels[0] != -100 for s in spans])  # (n_spans, T)
    assert masks.sum(dim=0).le(1).all()  # disjoint
    assert torch.equal(masks.any(dim=0), whole.labels[0] != -100)  # together: the whole loss
    assert all(torch.equal(s.input_ids, whole.input_ids) for s in spans)
    assert [s.query.query_id for s in spans] == [f"q#s{k}" for k in range(len(spans))]


def test_sentence_mode_gives_the_sentences(tokenizer):
    whole = encode_query(Query("q", PROMPT, COMPLETION), tokenizer, None)
    assert [s.span.text for s in expand_spans(whole, tokenizer, "sentence")[1:]] == SENTENCES
    one = encode_query(Query("q", PROMPT, " France."), tokenizer, None)
    assert expand_spans(one, tokenizer, "sentence") == [one]  # one span would repeat the query


def test_unknown_span_mode_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="--spans='words' is unknown"):
        config(tmp_path, spans="words")


def test_span_scores_equal_separate_queries_with_that_loss_mask(tmp_path, model, tokenizer):
    result = run(config(tmp_path, spans="sentence"), model, tokenizer)
    spans = result.spans("query")
    assert spans["span_text"].tolist() == SENTENCES
    reference = [
        reference_span_query(tokenizer, r.span_start, r.span_end, r.query_id)
        for r in spans.itertuples()
    ]
    slow = run(config(tmp_path), model, tokenizer, queries=reference)
    for span_qid in spans["query_id"]:
        mine = result.scores[result.scores["query_id"] == span_qid].set_index("unit_id")
        ref = slow.scores[slow.scores["query_id"] == span_qid].set_index("unit_id")
        # Same states, same sweep arithmetic: only float32 summation order may differ.
        torch.testing.assert_close(
            torch.tensor(mine.loc[ref.index, "score"].to_numpy()),
            torch.tensor(ref["score"].to_numpy()),
            rtol=1e-5,
            atol=1e-7,
        )


def test_spans_leave_the_whole_query_unchanged(tmp_path, model, tokenizer):
    plain = run(config(tmp_path), model, tokenizer)
    with_spans = run(config(tmp_path, spans="tokens:4"), model, tokenizer)
    a = plain.top(100, "query").set_index("unit_id")["score"]
    b = with_spans.top(100, "query").set_index("unit_id")["score"]
    torch.testing.assert_close(torch.tensor(b[a.index].to_numpy()), torch.tensor(a.to_numpy()))
    assert with_spans.query_ids == ["query"]


def test_spans_share_one_sweep_and_are_written(tmp_path, model, tokenizer):
    out = tmp_path / "run"
    result = run(config(tmp_path, spans="sentence", queries_per_sweep=1), model, tokenizer, out=out)
    # Four queries (the whole + 3 sentences) but one group: a single corpus sweep.
    assert [p.name for p in (out / "shards").iterdir()] == ["g000"]
    scores = result.scores
    assert {"span_id", "span_start", "span_end", "span_text", "parent_query_id"} <= set(scores)
    whole = scores[scores["query_id"] == "query"]
    assert (whole["span_id"] == -1).all() and (whole["span_text"] == COMPLETION).all()
    summary = json.loads((out / "summary.json").read_text())
    (entry,) = summary["queries"]
    assert [s["text"] for s in entry["spans"]] == SENTENCES
    assert [(s["char_start"], s["char_end"]) for s in entry["spans"]] == [(0, 8), (8, 44), (44, 59)]
    assert all(len(s["top_units"]) == 5 for s in entry["spans"])
    support = entry["top_unit_spans"]
    for row in support:
        per_span = [
            float(
                scores[
                    (scores["query_id"] == f"query#s{k}") & (scores["unit_id"] == row["unit_id"])
                ]["score"].iloc[0]
            )
            for k in range(3)
        ]
        assert row["span_scores"] == pytest.approx(per_span)
        assert row["best_span"] == int(np.argmax(per_span))


def test_auto_spans_of_several_queries_nest_under_each_query(tmp_path, model, tokenizer):
    queries = [
        Query("one", PROMPT, " France is a country in the west of the old world"),  # 1 sentence
        Query("two", "Water boils", " at one hundred degrees. Ice melts at zero."),
    ]
    cfg = config(tmp_path, spans="auto")
    cfg.output.out = str(tmp_path / "run")
    inputs = load_inputs(cfg, model=model, tokenizer=tokenizer, documents=DOCS, queries=queries)
    result = run_attribution(cfg, inputs)
    assert result.query_ids == ["one", "two"]
    one, two = result.summary["queries"]
    assert len(one["spans"]) == 4  # one sentence: about four token spans
    assert [s["text"] for s in two["spans"]] == [" at one hundred degrees.", " Ice melts at zero."]
    assert "".join(s["text"] for s in one["spans"]) == queries[0].completion
    assert result.spans("two")["query_id"].tolist() == ["two#s0", "two#s1"]


def test_a_span_reads_as_the_text_before_it_then_the_span(tmp_path, model, tokenizer):
    whole = encode_query(Query("q", PROMPT, COMPLETION), tokenizer, None)
    second = expand_spans(whole, tokenizer, "sentence")[2]
    assert second.query.prompt == PROMPT + SENTENCES[0]
    assert second.query.completion == SENTENCES[1]
    # So a text-based method scores a span by its own words: bm25 on the span equals bm25
    # on a query whose completion is that sentence alone.
    cfg = config(tmp_path, spans="sentence")
    cfg.method, cfg.perturb = "bm25", PerturbConfig()  # bm25 reads no perturbation option
    spans = run(cfg, model, tokenizer).scores
    alone = [Query(f"s{k}", PROMPT, text) for k, text in enumerate(SENTENCES)]
    plain = config(tmp_path)
    plain.method, plain.perturb = "bm25", PerturbConfig()
    inputs = load_inputs(plain, model=model, tokenizer=tokenizer, documents=DOCS, queries=alone)
    reference = run_attribution(plain, inputs).scores
    for k in range(len(SENTENCES)):
        mine = spans[spans["query_id"] == f"query#s{k}"].set_index("unit_id")["score"]
        ref = reference[reference["query_id"] == f"s{k}"].set_index("unit_id")["score"]
        np.testing.assert_allclose(mine[ref.index].to_numpy(), ref.to_numpy())
