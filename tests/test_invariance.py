"""Scores do not depend on how the sweep is organised, and the base model is never written.

Tolerance: float32 forward passes of different batch shapes differ by ~1e-7 relative;
scores (default reduce=sum) are differences of unit losses of ~50 nats, so atol=1e-5 nats
(a wrong mask or a dropped token changes scores by > 1e-3 here).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import bgotrace
from bgotrace.errors import RunDirectoryError
from bgotrace.score import executor as engine
from tests.corpora import QUERIES as SHARED_QUERIES
from tests.corpora import documents
from tests.models import tiny_gpt2, tiny_llama

ATOL = 1e-5
DOCS = documents()
QUERIES = SHARED_QUERIES[:3]


def run(model, tok, tmp_path, docs=DOCS, queries=QUERIES, **sections):
    config = {
        "corpus": {"max_length": 10, "stride": 2, "cache_dir": str(tmp_path / "c")},
        "perturb": {"optimizer": "adam", "lr": 3e-3, "steps": 2},
        "output": {"top_tokens": 0},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return bgotrace.attribute(model, tok, docs, queries=queries, config=config)


def by_unit(result) -> dict[tuple[str, str], float]:
    return {(r.query_id, r.unit_id): r.score for r in result.scores.itertuples()}


def assert_same(a, b):
    sa, sb = by_unit(a), by_unit(b)
    assert sa.keys() == sb.keys()
    keys = sorted(sa)
    np.testing.assert_allclose([sa[k] for k in keys], [sb[k] for k in keys], atol=ATOL, rtol=0)


def test_batch_size_and_block_size_do_not_change_scores(tok, tmp_path, monkeypatch):
    """… and a group's states are bound once for all of its blocks, however many."""
    from bgotrace.score import sweep

    binds = []
    real = sweep.bind_state
    monkeypatch.setattr(sweep, "bind_state", lambda *a: binds.append(a) or real(*a))
    model = tiny_gpt2(tok)
    one = run(model, tok, tmp_path, scoring={"batch_size": 1, "block_units": 3})
    small_blocks = len(binds)
    binds.clear()
    many = run(model, tok, tmp_path, scoring={"batch_size": 7, "block_units": 1000})
    assert_same(one, many)
    assert small_blocks == len(binds) == 2 * len(QUERIES)  # θ+ and θ− of each query, once


def test_batch_tokens_do_not_change_scores(tok, tmp_path, monkeypatch):
    """--batch-tokens 30 (max length 10: 3 full units, more short ones) vs --batch-size 1,
    and the sweep's batches do hold ≤ 30 padded tokens and several units (the normaliser's
    batches too: the default --normalize sensitivity divides by norms batched the same way)."""
    from bgotrace.score import sweep

    shapes = []
    real = sweep.collate
    monkeypatch.setattr(sweep, "collate", lambda *a: shapes.append(a[1].shape) or real(*a))
    model = tiny_gpt2(tok)
    one = run(model, tok, tmp_path, scoring={"batch_size": 1})
    shapes.clear()
    tokens = run(model, tok, tmp_path, scoring={"batch_size": 1, "batch_tokens": 30})
    assert_same(one, tokens)
    assert max(shapes)[0] >= 3


def test_corpus_order_does_not_change_scores(tok, tmp_path):
    model = tiny_gpt2(tok)
    shuffled = DOCS[:]
    random.Random(1).shuffle(shuffled)
    assert_same(
        run(model, tok, tmp_path / "a", docs=DOCS), run(model, tok, tmp_path / "b", docs=shuffled)
    )


def test_query_order_and_grouping_do_not_change_scores(tok, tmp_path):
    model = tiny_llama(tok)
    together = run(model, tok, tmp_path, scoring={"queries_per_sweep": 8})
    apart = run(model, tok, tmp_path, queries=QUERIES[::-1], scoring={"queries_per_sweep": 1})
    assert_same(together, apart)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "fisher"])
def test_base_model_is_bit_identical_after_attribution(tok, tmp_path, optimizer):
    model = tiny_gpt2(tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    run(
        model,
        tok,
        tmp_path,
        perturb={"optimizer": optimizer, "lr": 1e-6 if optimizer == "fisher" else 1e-3},
    )
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.requires_grad == flags[n]


def test_resume_after_interruption_gives_the_same_scores(tok, tmp_path, monkeypatch):
    model = tiny_gpt2(tok)
    scoring = {"block_units": 4, "batch_size": 2, "queries_per_sweep": 2}
    clean = run(model, tok, tmp_path / "clean", scoring=scoring)
    out = tmp_path / "run"
    real = engine.unit_loss_sums
    calls = {"n": 0}

    def crash_on_third_block(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "unit_loss_sums", crash_on_third_block)
    config = {
        "scoring": scoring,
        "perturb": {"optimizer": "adam", "lr": 3e-3, "steps": 2},
        "corpus": {"max_length": 10, "stride": 2, "cache_dir": str(tmp_path / "c")},
    }
    with pytest.raises(KeyboardInterrupt):
        bgotrace.attribute(model, tok, DOCS, queries=QUERIES, config=config, out=out)
    assert not (out / "summary.json").exists()  # an interrupted run never looks complete
    assert len(list((out / "shards").rglob("*.npz"))) == 2
    with pytest.raises(RunDirectoryError, match="--resume"):
        bgotrace.attribute(model, tok, DOCS, queries=QUERIES, config=config, out=out)
    monkeypatch.setattr(engine, "unit_loss_sums", real)
    calls["n"] = 0
    resumed = bgotrace.attribute(
        model, tok, DOCS, queries=QUERIES, config=config, out=out, resume=True
    )
    assert (out / "summary.json").exists()
    assert_same(clean, resumed)
    again = bgotrace.AttributionResult.load(out)
    assert_same(clean, again)


def test_resume_refuses_a_run_with_other_perturbed_states(tok, tmp_path):
    model = tiny_gpt2(tok)
    config = {
        "corpus": {"max_length": 10, "cache_dir": str(tmp_path / "c")},
        "perturb": {"optimizer": "adam", "lr": 3e-3, "steps": 1},
    }
    out = tmp_path / "run"
    bgotrace.attribute(model, tok, DOCS, queries=QUERIES[:1], config=config, out=out)
    config["perturb"]["lr"] = 1e-2
    with pytest.raises(RunDirectoryError, match="config.yaml differs"):
        bgotrace.attribute(
            model, tok, DOCS, queries=QUERIES[:1], config=config, out=out, resume=True
        )
