"""Prefilter + rerank: candidates are the prefilter's top-M, their scores are the full sweep's.

Exactness: with ``batch_size=1`` every unit's loss comes from a forward pass of that unit
alone, so a candidate's loss does not depend on which other units are swept and its score
must equal the full sweep's bit for bit (asserted with zero tolerance). With M = the corpus
size the batches are the same as the full sweep's, so any batch size gives equal scores.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

import bgotrace
from bgotrace.baselines import MethodContext, get_attributor
from bgotrace.cache import TokenCache
from bgotrace.config import AttributeConfig, ScoreConfig
from bgotrace.errors import ConfigError
from bgotrace.eval.runner import EvalOptions, build_methods
from bgotrace.perturb.params import select_parameters
from bgotrace.prefilter import SubsetUnits, candidate_count, plan_from_scores
from bgotrace.query import Query, encode_query
from bgotrace.ranking.aggregate import aggregate, unit_scores
from tests.conftest import make_tiny_tokenizer
from tests.models import tiny_gpt2
from tests.test_cli import invoke
from tests.test_invariance import DOCS, QUERIES


def config(tmp_path, **scoring):
    return {
        "corpus": {"max_length": 10, "stride": 2, "cache_dir": str(tmp_path / "c")},
        "perturb": {"lr": 3e-3, "steps": 2},
        "output": {"top_tokens": 2},
        "scoring": {"batch_size": 1, **scoring},
    }


def run(model, tok, tmp_path, **scoring):
    cfg = config(tmp_path, **scoring)
    return bgotrace.attribute(model, tok, DOCS, queries=QUERIES, config=cfg)


def by_unit(result) -> pd.Series:
    return result.scores.set_index(["query_id", "unit_id"])["score"].sort_index()


# --------------------------------------------------------------------------- M


@pytest.mark.parametrize(
    "spec,n,m", [(3, 40, 3), ("3", 40, 3), ("5%", 40, 2), ("100%", 40, 40), (0.05, 41, 3)]
)
def test_candidate_count_takes_counts_percentages_and_fractions(spec, n, m):
    assert candidate_count(spec, n) == m


@pytest.mark.parametrize("spec", [0, "0", -2, "150%", "0%", "abc", 1.5, "1.0", True, "nan%"])
def test_bad_candidates_are_refused_with_the_rule(spec):
    with pytest.raises(ConfigError, match="count of units .* percentage"):
        ScoreConfig(candidates=spec)


def test_more_candidates_than_units_is_refused_at_run_time(model, tok, tmp_path):
    with pytest.raises(ConfigError, match="corpus has 28"):
        run(model, tok, tmp_path, candidates=1000)


def test_a_prefilter_without_candidates_is_refused():
    with pytest.raises(ConfigError, match="--prefilter repsim has no effect without --candidates"):
        ScoreConfig(prefilter="repsim")


@pytest.mark.parametrize(
    "scoring,match",
    [
        ({"prefilter": "bgo"}, "full corpus sweep"),
        ({"prefilter": "untrac-inv"}, "full corpus sweep"),
        ({"prefilter": "nope"}, "unknown: use one of"),
    ],
)
def test_prefilter_must_be_a_cheap_local_method(scoring, match):
    with pytest.raises(ConfigError, match=match):
        ScoreConfig(candidates=5, **scoring)


def test_candidates_may_be_reranked_on_workers():
    """Accepted (tests/test_dist.py runs it: the rerank groups sweep on the workers)."""
    run = {"model": {"path": "m"}, "corpus": {"path": "c"}, "query": {"queries": "q.jsonl"}}
    config = AttributeConfig.from_dict(
        {**run, "scoring": {"candidates": 5}, "execution": {"workers": 2}}
    )
    assert (config.scoring.candidates, config.execution.workers) == (5, 2)


# --------------------------------------------------------------------------- candidate sets


def test_candidates_are_each_querys_top_m_unioned_per_group():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(5, 30)).astype(float)  # many ties, as BM25's zeros
    queries = [encode_query(Query(f"q{i}", "a", " b"), make_tiny_tokenizer(), 64) for i in range(5)]
    plan = plan_from_scores(scores, queries, prefilter="bm25", spec=4, group_size=2)
    assert plan.proposed.shape == (5, 4)
    for row, proposed in zip(scores, plan.proposed, strict=True):
        rest = np.setdiff1d(np.arange(30), proposed)
        assert len(set(proposed)) == 4
        assert row[proposed].min() >= row[rest].max()  # nothing better was left out
    assert len(plan.groups) == 3
    for g, start in enumerate(range(0, 5, 2)):
        union = np.unique(plan.proposed[start : start + 2])
        np.testing.assert_array_equal(plan.groups[g], union)
        assert plan.mask(g).sum() == len(union)


def test_subset_view_reads_the_chosen_units(tok, tmp_path):
    bgotrace.attribute(
        tiny_gpt2(tok), tok, DOCS, queries=QUERIES[:1], config=config(tmp_path, candidates=2)
    )
    cache = TokenCache(tmp_path / "c")
    view = SubsetUnits(cache, np.array([5, 2, 9]))
    assert len(view) == 3
    np.testing.assert_array_equal(view.lengths, cache.lengths[[5, 2, 9]])
    np.testing.assert_array_equal(view.unit_tokens(1), cache.unit_tokens(2))


# --------------------------------------------------------------------------- scores


def test_all_units_as_candidates_equal_the_full_sweep_exactly(model, tok, tmp_path):
    full = run(model, tok, tmp_path, batch_size=4)
    every = run(model, tok, tmp_path, batch_size=4, candidates="100%")
    pd.testing.assert_series_equal(by_unit(full), by_unit(every), check_exact=True)
    assert every.scores["candidate"].all()


@pytest.mark.parametrize("optimizer", ["adam", "fisher"])
def test_candidate_scores_equal_the_full_sweep_and_the_rest_is_nan(model, tok, tmp_path, optimizer):
    extra = {"perturb": {"optimizer": optimizer, "lr": 3e-3 if optimizer == "adam" else 1e-2}}
    cfg_full = config(tmp_path)
    cfg_part = config(tmp_path, candidates=3, queries_per_sweep=2)
    for cfg in (cfg_full, cfg_part):
        cfg["perturb"].update(extra["perturb"])
    full = bgotrace.attribute(model, tok, DOCS, queries=QUERIES, config=cfg_full)
    part = bgotrace.attribute(model, tok, DOCS, queries=QUERIES, config=cfg_part)
    scores = part.scores.set_index(["query_id", "unit_id"]).sort_index()
    chosen = scores[scores["candidate"]]
    # the Fisher step's N is the corpus size, so the perturbed states are the full run's
    np.testing.assert_array_equal(chosen["score"], by_unit(full).loc[chosen.index])
    assert scores.loc[~scores["candidate"], "score"].isna().all()
    assert scores.loc[scores["candidate"], "score"].notna().all()
    ranks = part.scores.groupby("query_id").apply(
        lambda f: f.loc[f.candidate, "rank"].max() < f.loc[~f.candidate, "rank"].min()
    )
    assert ranks.all()  # every candidate ranks above every unscored unit


def test_candidate_flags_are_the_prefilters_top_m_union(model, tok, tmp_path):
    result = run(model, tok, tmp_path, candidates=3, queries_per_sweep=2)
    cache = TokenCache(tmp_path / "c")
    bm25 = get_attributor("bm25")
    bm25.prepare(MethodContext(model, tok, cache))
    encoded = [encode_query(q, tok, 64) for q in QUERIES]
    plan = plan_from_scores(bm25.score(encoded), encoded, prefilter="bm25", spec=3, group_size=2)
    for i, q in enumerate(QUERIES):
        rows = result.scores[result.scores.query_id == q.query_id].sort_values("unit_index")
        np.testing.assert_array_equal(rows["candidate"], plan.mask(plan.group_of(i)))
    assert result.summary["prefilter"]["swept_units_per_group"] == [len(g) for g in plan.groups]
    assert all(t["unit_id"] in set(result.scores[result.scores.candidate].unit_id)
               for t in result.top_tokens)  # fmt: skip


def test_documents_without_candidates_are_nan_and_last():
    units = pd.DataFrame(
        {"unit_id": list("abcd"), "doc_id": ["d1", "d1", "d2", "d3"], "source": "s",
         "char_start": 0, "char_end": 1}
    )  # fmt: skip
    scores = unit_scores(
        units, "q", np.array([1.0, np.nan, -2.0, np.nan]), np.ones(4),
        candidate=np.array([True, False, True, False]),
    )  # fmt: skip
    docs = aggregate(scores, "doc_id").set_index("doc_id")
    assert docs.loc["d1", "score_sum"] == 1.0 and docs.loc["d1", "n_candidates"] == 1
    assert np.isnan(docs.loc["d3", "score_sum"]) and docs.loc["d3", "rank"] == 3
    assert docs.loc["d1", "n_units"] == 2


def test_top_lists_leave_unscored_units_and_documents_out(model, tok, tmp_path):
    result = run(model, tok, tmp_path, candidates=2, queries_per_sweep=1)
    for granularity in ("unit", "document", "source"):
        top = result.top(1000, "capital", granularity=granularity)
        assert len(top) and top.filter(like="score").notna().all().all()
    assert len(result.top(1000, "capital")) == 2  # the two candidates, not every unit


def test_bgo_method_reranks_and_lds_refuses_it(model, tok, tmp_path):
    run(model, tok, tmp_path)  # builds the cache
    ctx = MethodContext(model, tok, TokenCache(tmp_path / "c"), batch_size=1)
    encoded = [encode_query(q, tok, 64) for q in QUERIES]
    opts = {"lr": 3e-3, "steps": 2}
    full = get_attributor("bgo", **opts)
    full.prepare(ctx)
    part = get_attributor("bgo", candidates=4, prefilter="repsim", **opts)
    part.prepare(ctx)
    s_full, s_part = full.score(encoded), part.score(encoded)
    assert part.last_plan is not None and part.last_plan.prefilter == "repsim"
    scored = ~np.isnan(s_part)
    np.testing.assert_array_equal(s_part[scored], s_full[scored])
    assert scored.sum(axis=1).min() >= 4
    options = EvalOptions(method_options={"bgo": {"candidates": "5%"}})
    with pytest.raises(ConfigError, match="drop the candidates option"):
        build_methods(["bgo"], ["fact", "lds"], options)


# --------------------------------------------------------------------------- CLI, resume


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("model")
    tiny_gpt2(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def cli_args(model_dir, corpus, tmp_path, *extra):
    return [
        "attribute", "--model", model_dir, "--corpus", corpus, "--quiet",
        "--cache-dir", tmp_path / "cache", "--max-length", "10", "--steps", "2",
        "--batch-size", "1", "--prompt", "Paris is the capital of", "--completion", " France.",
        *extra,
    ]  # fmt: skip


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    rows = [{"id": d.doc_id, "text": d.text, "source": d.source} for d in DOCS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_rerank_writes_flags_and_summary_and_resumes(model_dir, corpus, tmp_path):
    out = tmp_path / "run"
    args = cli_args(model_dir, corpus, tmp_path, "--candidates", "25%", "--out", out)
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prefilter"]["prefilter"] == "bm25"
    assert summary["prefilter"]["candidates"] == "25%"
    scores = pd.read_parquet(out / "scores.parquet")
    m = summary["prefilter"]["m"]
    assert scores["candidate"].sum() == m == int(np.ceil(0.25 * len(scores)))
    assert scores.loc[~scores.candidate, "score"].isna().all()
    assert (out / "rerank" / "g000" / "shards").is_dir()
    # interrupted after the sweep: a resume reuses the shards and gives the same scores
    (out / "summary.json").unlink()
    assert invoke(*args, "--resume").exit_code == 0
    again = pd.read_parquet(out / "scores.parquet")
    pd.testing.assert_frame_equal(scores, again)
    # a resume that would sweep other candidates is refused
    state = json.loads((out / "state.json").read_text())
    state["candidates000"]["units"] = "0" * 16
    (out / "state.json").write_text(json.dumps(state))
    refused = invoke(*args, "--resume")
    assert refused.exit_code == 2 and "candidates000" in refused.output


def test_cli_refuses_bad_candidates_in_one_line(model_dir, corpus, tmp_path):
    result = invoke(*cli_args(model_dir, corpus, tmp_path, "--candidates", "0.0"))
    assert result.exit_code == 2
    # one line: the rule and the fix (the value may be echoed as a string or a number)
    assert re.fullmatch(r"error: --candidates='?0\.0'? is neither .* \(0\.05\)\.\n", result.output)


# --------------------------------------------------------------------------- --params


def test_params_last_half_selects_the_upper_ceil_half_of_the_blocks(tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=16, n_embd=16,
                                       n_layer=5, n_head=2))  # fmt: skip
    half = select_parameters(model, "last:half")
    assert half == select_parameters(model, "last:3")  # ceil(5 / 2)
    assert {n.split(".")[2] for n in half} == {"2", "3", "4"}


def test_api_keywords_choose_the_candidates_and_the_prefilter(model, tok, tmp_path):
    result = bgotrace.attribute(
        model, tok, DOCS, queries=QUERIES[:1], config=config(tmp_path),
        candidates="10%", prefilter="repsim",
    )  # fmt: skip
    assert result.summary["prefilter"]["prefilter"] == "repsim"
    assert result.summary["config"]["scoring"]["candidates"] == "10%"
    assert result.scores["candidate"].sum() == 3  # ceil(0.1 * 28)
