"""``--batch-tokens``: batches sized by padded tokens instead of units.

Checked against the obvious rule (every batch ≤ the budget, every unit once, sorted by
length) and for invariance: the sweep's and the forward-mode pass's per-unit sums equal those
of one unit per batch. Tolerance: float32 forwards of different batch shapes differ by ~1e-7
relative; summed unit losses are ~50 nats, so atol 1e-5 (a dropped or padded token would
move a sum by > 1e-2).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bgotrace.cache import get_token_cache
from bgotrace.cache.batching import length_buckets
from bgotrace.cli.main import app
from bgotrace.config import AttributeConfig, ScoreConfig
from bgotrace.corpus import ChunkingConfig
from bgotrace.errors import ConfigError
from bgotrace.plan.estimate import plan_run
from bgotrace.score import sweep
from bgotrace.score.executor import Block, LocalExecutor
from bgotrace.score.linear import linear_scores
from tests.conftest import make_tiny_tokenizer
from tests.corpora import documents
from tests.models import tiny_gpt2

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = make_tiny_tokenizer()
    root = tmp_path_factory.mktemp("cache")
    cache = get_token_cache(documents(), tok, ChunkingConfig(max_length=24, stride=8), root)
    return tiny_gpt2(tok, seed=1), cache


@pytest.mark.parametrize("budget", [1, 7, 40, 10_000])
def test_token_batches_hold_at_most_the_budget(budget):
    lengths = np.random.default_rng(0).integers(1, 30, size=50)
    indices = np.arange(3, 50)
    batches = length_buckets(indices, lengths, batch_size=4, batch_tokens=budget)
    assert sorted(np.concatenate(batches).tolist()) == indices.tolist()  # each unit once
    flat = np.concatenate(batches)
    assert np.all(np.diff(lengths[flat]) >= 0)  # shortest first, as batch_size batches
    for b in batches:
        assert len(b) == 1 or len(b) * lengths[b].max() <= budget, (b, lengths[b])
    for b, nxt in zip(batches, batches[1:], strict=False):  # greedy: the next unit overflows
        assert (len(b) + 1) * lengths[nxt[0]] > budget
    if budget == 10_000:
        assert len(batches) == 1  # short units: one large batch, not ⌈47 / 4⌉ of 4


def test_zero_or_none_is_batch_size():
    lengths = np.arange(20) % 7 + 1
    for off in (0, None):
        got = length_buckets(np.arange(20), lengths, 6, off)
        assert [b.tolist() for b in got] == [
            b.tolist() for b in length_buckets(np.arange(20), lengths, 6)
        ]
        assert [len(b) for b in got] == [6, 6, 6, 2]


def test_sweep_sums_do_not_depend_on_token_batches(setup, monkeypatch):
    model, cache = setup
    shapes = []
    real = sweep.collate
    monkeypatch.setattr(
        sweep, "collate", lambda *a: shapes.append(a[1].shape) or real(*a)
    )  # count the batches
    states = [None, {n: p.detach() + 1e-3 for n, p in model.named_parameters() if ".h.1." in n}]
    every = np.arange(len(cache))
    kw = dict(pad_id=0, device=CPU)
    one = sweep.unit_loss_sums(model, cache, every, states, batch_size=1, **kw)
    assert len(shapes) == len(cache)
    shapes.clear()
    budget = 3 * int(cache.lengths.max())
    tokens = sweep.unit_loss_sums(
        model, cache, every, states, batch_size=1, batch_tokens=budget, **kw
    )
    assert len(shapes) < len(cache) / 2  # batches of several units, not batch_size's one
    np.testing.assert_allclose(tokens[0], one[0], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(tokens[1], one[1])
    blocks = [Block(0, 0, 5), Block(1, 5, len(cache))]
    executor = LocalExecutor(model, cache, 1, 0, CPU, batch_tokens=budget)
    by_block = np.concatenate([s for _, s, _ in executor.run(blocks, states)], axis=1)
    np.testing.assert_allclose(by_block, one[0], atol=1e-5, rtol=0)


def test_linear_scores_do_not_depend_on_token_batches(setup):
    model, cache = setup
    direction = {n: torch.randn_like(p) * 1e-3 for n, p in model.named_parameters() if ".h.1." in n}
    one = linear_scores(model, cache, [direction], batch_size=1, device=CPU)
    tokens = linear_scores(model, cache, [direction], batch_size=1, batch_tokens=50, device=CPU)
    np.testing.assert_allclose(tokens, one, atol=1e-6, rtol=1e-5)


def test_batch_tokens_is_validated_and_a_flag():
    with pytest.raises(ConfigError, match="--batch-tokens must be >= 0"):
        ScoreConfig(batch_tokens=-1)
    assert ScoreConfig(batch_tokens=0).batch_tokens == 0
    text = CliRunner().invoke(app, ["attribute", "--help"], terminal_width=200).output
    assert "--batch-tokens" in text


def test_the_plan_sizes_batches_by_tokens(tmp_path):
    """A budget of 4 full-length units plans as --batch-size 4; below one unit, as 1."""
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=500).save_pretrained(tmp_path)

    def plan(**scoring):
        cfg = AttributeConfig.from_dict({
            "model": {"path": str(tmp_path)}, "corpus": {"path": "x", "max_length": 128},
            "query": {"prompt": "a", "completion": "b"}, "scoring": scoring,
            "execution": {"device": "cpu"},
        })  # fmt: skip
        return {s.name: s.device_bytes for s in plan_run(cfg, device_memory=2**40).stages}

    assert plan(batch_tokens=4 * 128 + 5) == plan(batch_size=4)
    assert plan(batch_tokens=100) == plan(batch_size=1)
    assert plan(batch_tokens=64 * 128) != plan(batch_size=16)
