"""One BGO path: every perturbation method reads every option, resumes, records, closes.

``bgotrace attribute --method untrac-inv`` once ignored ``--lr``/``--steps`` (a second copy of
the orchestration built the method without them) while config.yaml recorded them. Here:
untrac-inv on the demo model reads them and equals ``--method bgo --score ascent`` bit for
bit; each perturbation/scoring option changes the scores (or, for options that only
organise the sweep, the sweep itself) under each perturbation method; an option a method
ignores is a one-line ConfigError.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pandas as pd
import pytest

import bgotrace
from bgotrace import bgo as bgo_module
from bgotrace.baselines import MethodContext, get_attributor
from bgotrace.bgo import resolve_method
from bgotrace.cache import TokenCache
from bgotrace.config import AttributeConfig, ExecutionConfig, PerturbConfig, ScoreConfig
from bgotrace.corpus import load_documents
from bgotrace.demo import demo_corpus_path, demo_model_path
from bgotrace.errors import ConfigError, RunDirectoryError
from bgotrace.modeling.loading import load_model_and_tokenizer
from bgotrace.pipeline import load_inputs
from bgotrace.query import encode_query
from bgotrace.score import context as context_module
from bgotrace.score import executor as executor_module
from bgotrace.score.store import RunStore
from tests.corpora import QUERIES as SHARED_QUERIES
from tests.corpora import documents

PERTURBATION_METHODS = ("bgo", "untrac-inv")
DOCS = documents(6, n_sources=2)
QUERIES = SHARED_QUERIES[:2]
BASE = {"perturb": {"lr": 3e-3, "steps": 2}, "output": {"top_tokens": 0}}


def attribute(model, tok, cache_dir, method="bgo", out=None, resume=False, **sections):
    config = {"method": method, "corpus": {"max_length": 10, "cache_dir": str(cache_dir)}}
    for name, values in itertools.chain(BASE.items(), sections.items()):
        config.setdefault(name, {}).update(values)
    return bgotrace.attribute(
        model, tok, DOCS, queries=QUERIES, config=config, out=out, resume=resume
    )


def scores_of(result) -> np.ndarray:
    return result.scores.sort_values(["query_id", "unit_index"])["score"].to_numpy()


# --------------------------------------------------------------------------- the demo bug


@pytest.fixture(scope="module")
def demo():
    model, tokenizer = load_model_and_tokenizer(demo_model_path(), device="cpu")
    return model, tokenizer, load_documents(str(demo_corpus_path()))[:12]


def demo_run(demo, tmp_path, method, lr, steps, **scoring):
    model, tokenizer, docs = demo
    config = {
        "method": method,
        "corpus": {"max_length": 64, "cache_dir": str(tmp_path / "cache")},
        "perturb": {"lr": lr, "steps": steps},
        "scoring": scoring,
        "output": {"top_tokens": 2},
    }
    return bgotrace.attribute(
        model, tokenizer, docs, prompt="DIPLOMACY, n.",
        completion="  The patriotic art of lying for one's country.", config=config,
    )  # fmt: skip


def test_untrac_inv_reads_lr_and_steps_and_is_bgo_ascent_bit_for_bit(demo, tmp_path):
    slow = demo_run(demo, tmp_path, "untrac-inv", 1e-4, 10)
    fast = demo_run(demo, tmp_path, "untrac-inv", 3e-3, 2)
    assert not np.allclose(scores_of(slow), scores_of(fast))  # the bug: they were equal
    ascent = demo_run(demo, tmp_path, "bgo", 3e-3, 2, score="ascent")
    pd.testing.assert_frame_equal(fast.scores, ascent.scores)  # bit for bit
    assert fast.top_tokens == ascent.top_tokens
    for result, steps in ((slow, 10), (fast, 2)):
        (query,) = result.summary["queries"]
        assert len(query["loss_trajectories"]["ascent"]) == steps + 1  # θ0 .. θK
        assert result.summary["config"]["scoring"]["score"] == "ascent"  # what ran


# --------------------------------------------------------------------------- every option

# (option section, name, value, options the change needs, what changes: "scores" or "sweep")
CHANGES = [
    ("perturb", "optimizer", "sgd", {"lr": 0.1}, "scores"),
    ("perturb", "lr", 1e-2, {}, "scores"),
    ("perturb", "steps", 3, {}, "scores"),
    ("perturb", "params", "last:1", {}, "scores"),
    ("perturb", "max_grad_norm", 1e-3, {"optimizer": "sgd", "lr": 0.1}, "scores"),
    ("perturb", "adam_beta1", 0.5, {"steps": 3}, "scores"),
    ("perturb", "adam_beta2", 0.5, {"steps": 3}, "scores"),
    ("perturb", "adam_eps", 1.0, {}, "scores"),
    ("perturb", "lr_target", 0.5, {"lr": "auto"}, "scores"),
    ("perturb", "lr_criterion", "radius", {"lr": "auto", "lr_target": 1e-3}, "scores"),
    ("perturb", "fisher_samples", 2, {"optimizer": "fisher", "lr": 1e-6}, "scores"),
    ("perturb", "fisher_eps", 1e-2, {"optimizer": "fisher", "lr": 1e-6}, "scores"),
    ("perturb", "fisher_damping", 0.1, {"optimizer": "fisher", "lr": 1e-6}, "scores"),
    ("scoring", "score", "descent", {}, "scores"),
    ("scoring", "reduce", "mean", {"normalize": "none"}, "scores"),  # cancels under s(z)
    ("scoring", "normalize", "none", {}, "scores"),
    ("scoring", "normalize_damping", 0.1, {"normalize": "damped"}, "scores"),
    ("scoring", "dtype", "bfloat16", {}, "scores"),
    ("scoring", "autocast", True, {}, "scores"),
    ("scoring", "candidates", 2, {}, "scores"),
    ("scoring", "prefilter", "repsim", {"candidates": 2}, "prefilter"),
    ("scoring", "batch_size", 1, {}, "sweep"),
    ("scoring", "block_units", 2, {}, "sweep"),
    ("scoring", "queries_per_sweep", 1, {}, "sweep"),
    ("scoring", "trunk_cache", True, {"params": "last:1", "trunk_cache_dtype": "float32"},
     "sweep"),
    ("scoring", "trunk_cache_dtype", "float32", {"params": "last:1", "trunk_cache": True},
     "scores"),
]  # fmt: skip
NOT_HERE = {
    "linearity_sample": "bgo-linear's diagnostic (tests/test_linear.py)",
    "linearity_share": "the diagnostic's sample size (tests/test_linear.py)",
    "batch_tokens": "batches by tokens (tests/test_batch_tokens.py, test_invariance.py)",
}
"""Options tested elsewhere, with where."""
PINNED = {("untrac-inv", "score")}
"""(method, option) it pins: another value is refused (test_an_option_the_method_ignores...)."""
CASES = [
    pytest.param(method, *change, id=f"{method}-{change[1]}")
    for method in PERTURBATION_METHODS
    for change in CHANGES
    if (method, change[1]) not in PINNED
]


def _section_of(name: str) -> str:
    return "perturb" if name in {f.name for f in dataclasses.fields(PerturbConfig)} else "scoring"


def test_the_table_names_every_perturbation_and_scoring_option():
    names = {f.name for cls in (PerturbConfig, ScoreConfig) for f in dataclasses.fields(cls)}
    assert names - set(NOT_HERE) == {name for _, name, *_ in CHANGES}


def spy_on_sweep(monkeypatch) -> list[tuple]:
    """Records what each block of the sweep is computed with."""
    calls: list[tuple] = []
    real = executor_module.unit_loss_sums

    def spy(model, units, indices, states, **kwargs):
        trunk = kwargs.get("trunk_rows") is not None
        calls.append((kwargs["batch_size"], len(indices), len(states), trunk))
        return real(model, units, indices, states, **kwargs)

    monkeypatch.setattr(executor_module, "unit_loss_sums", spy)
    return calls


@pytest.mark.parametrize(("method", "section", "name", "value", "needs", "effect"), CASES)
def test_every_option_reaches_every_perturbation_method(
    model, tok, tmp_path, monkeypatch, method, section, name, value, needs, effect
):
    base: dict[str, dict] = {"perturb": {}, "scoring": {}}
    for key, given in needs.items():
        base[_section_of(key)][key] = given
    changed = {k: dict(v) for k, v in base.items()}
    changed[section][name] = value
    calls = spy_on_sweep(monkeypatch)
    before = attribute(model, tok, tmp_path / "c", method, **base)
    n_before = len(calls)
    after = attribute(model, tok, tmp_path / "c", method, **changed)
    assert after.summary["config"][section][name] == value
    for query in after.summary["queries"]:  # NaN (not swept) units never among them
        assert query["top_units"] == after.top(5, query["query_id"])["unit_id"].tolist()
    a, b = scores_of(before), scores_of(after)
    if effect == "scores":
        assert np.isnan(a).tolist() != np.isnan(b).tolist() or not np.allclose(a, b, equal_nan=True)
    elif effect == "prefilter":
        assert after.summary["prefilter"]["prefilter"] == value
    else:  # the same scores, from a sweep organised as asked
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
        assert calls[:n_before] != calls[n_before:]


def test_execution_options_reach_the_sweep_context(model, tok, tmp_path, monkeypatch):
    seen = []
    real = bgo_module.ray_executor_for

    def spy(ctx, cache, execution):
        seen.append((ctx, execution))
        return real(ctx, cache, execution)

    monkeypatch.setattr(bgo_module, "ray_executor_for", spy)
    execution = {"block_attempts": 5, "ray_timeout": 7.0, "cpus_per_worker": 2.0}
    attribute(model, tok, tmp_path / "c", "untrac-inv", execution=execution)
    ctx = MethodContext(model, tok, TokenCache(tmp_path / "c"), batch_size=4)
    method = get_attributor("untrac-inv", steps=2, lr=3e-3, **execution)
    method.prepare(ctx)
    method.score([encode_query(QUERIES[0], tok, 64)])
    assert len(seen) == 2
    for sweep, given in seen:
        assert given == ExecutionConfig(**execution)
        assert sweep.perturb_cfg.steps == 2 and sweep.score_cfg.score == "ascent"


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("method", "section", "values", "flag"),
    [
        ("bm25", "perturb", {"lr": 1e-3}, "--lr"),
        ("bm25", "perturb", {"steps": 3}, "--steps"),
        ("random", "perturb", {"optimizer": "sgd"}, "--optimizer"),
        ("bm25", "scoring", {"score": "ascent"}, "--score"),
        ("gradcos", "scoring", {"normalize": "none"}, "--normalize"),
        ("bm25", "execution", {"workers": 2}, "--workers"),
        ("untrac-inv", "scoring", {"score": "descent"}, "--score"),
    ],
)
def test_an_option_the_method_ignores_is_refused(tmp_path, method, section, values, flag):
    config = AttributeConfig.from_dict(
        {
            "model": {"path": str(tmp_path / "no-model")},  # refused before anything loads
            "corpus": {"path": str(tmp_path / "no-corpus.jsonl")},
            "query": {"prompt": "a", "completion": "b"},
            "method": method,
            section: values,
        }
    )
    with pytest.raises(ConfigError, match=f"^{flag} .* --method {method}.*: drop {flag}") as err:
        load_inputs(config)
    assert "\n" not in str(err.value)


def test_options_every_method_reads_are_accepted_and_pinned_ones_recorded():
    data = {
        "model": {"path": "m"}, "corpus": {"path": "c"},
        "query": {"prompt": "a", "completion": "b"},
        "perturb": {"params": "last:1"}, "scoring": {"batch_size": 3},
    }  # fmt: skip
    for method in ("bm25", "gradcos", "random"):
        config = AttributeConfig.from_dict({**data, "method": method})
        assert resolve_method(config) == config
    untrac = resolve_method(AttributeConfig.from_dict({**data, "method": "untrac-inv"}))
    assert untrac.scoring.score == "ascent"  # what config.yaml records, and replays
    assert resolve_method(untrac) == untrac


# --------------------------------------------------------------------------- resume, records


def test_untrac_inv_resumes_and_writes_trajectories(model, tok, tmp_path, monkeypatch):
    scoring = {"block_units": 3, "batch_size": 2, "queries_per_sweep": 1}
    clean = attribute(model, tok, tmp_path / "c", "untrac-inv", scoring=scoring)
    out = tmp_path / "run"
    real, calls = executor_module.unit_loss_sums, {"n": 0}

    def crash_on_third_block(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(executor_module, "unit_loss_sums", crash_on_third_block)
    with pytest.raises(KeyboardInterrupt):
        attribute(model, tok, tmp_path / "c", "untrac-inv", out=out, scoring=scoring)
    assert len(list((out / "shards").rglob("*.npz"))) == 2
    monkeypatch.setattr(executor_module, "unit_loss_sums", real)
    with pytest.raises(RunDirectoryError, match="--resume"):
        attribute(model, tok, tmp_path / "c", "untrac-inv", out=out, scoring=scoring)
    resumed = attribute(
        model, tok, tmp_path / "c", "untrac-inv", out=out, resume=True, scoring=scoring
    )
    np.testing.assert_array_equal(scores_of(clean), scores_of(resumed))
    for query in resumed.summary["queries"]:
        assert len(query["loss_trajectories"]["ascent"]) == 3  # θ0 and K = 2 steps
        assert query["loss_trajectories"]["ascent"][-1] > query["loss_trajectories"]["ascent"][0]


def test_the_attributors_resume_record_and_close(model, tok, tmp_path, monkeypatch):
    attribute(model, tok, tmp_path / "c")  # builds the cache
    ctx = MethodContext(model, tok, TokenCache(tmp_path / "c"), batch_size=2)
    closed = []
    real_close = context_module.SweepContext.close
    monkeypatch.setattr(
        context_module.SweepContext, "close", lambda self: (closed.append(1), real_close(self))
    )
    encoded = [encode_query(q, tok, 64) for q in QUERIES]
    method = get_attributor("untrac-inv", lr=3e-3, steps=2, block_units=4)
    method.prepare(ctx)
    method.resume_from(RunStore.open(tmp_path / "store", overwrite=False, resume=False))
    first = method.score(encoded)
    shards = sorted((tmp_path / "store" / "shards").rglob("*.npz"))
    assert shards and closed == [1]
    stamps = [p.stat().st_mtime_ns for p in shards]
    again = method.score(encoded)  # every block read back from the store
    np.testing.assert_array_equal(first, again)
    assert [p.stat().st_mtime_ns for p in shards] == stamps and closed == [1, 1]
    assert set(method.trajectories) == {"capital", "water"}
    assert len(method.trajectories["capital"]["ascent"]) == 3
