"""Damaged resume points are recomputed, never merged; execution-only options may change
on resume; how workers reach the token cache. No Ray needed (default suite).

Tolerance: as in test_invariance, atol=1e-5 nats (a merged wrong shard moves scores by
the size of the damage, here > 1).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

import bgotrace
from bgotrace.cache.batching import length_buckets
from bgotrace.config import ExecutionConfig
from bgotrace.corpus import Document
from bgotrace.dist.units import UnitSlice, open_cache_at
from bgotrace.errors import ConfigError
from bgotrace.query import Query
from bgotrace.score.executor import Block
from bgotrace.score.store import RunStore
from tests.models import tiny_gpt2

ATOL = 1e-5
DOCS = [
    Document(f"d{i}", t, "s")
    for i, t in enumerate(
        [
            "The quick brown fox jumps over the lazy dog.",
            "Paris is the capital of France, Berlin of Germany.",
            "Water boils at one hundred degrees and ice melts at zero.",
            "Rivers carry sand to the sea, mountains rise slowly.",
        ]
    )
]
QUERIES = [Query("capital", "Paris is the capital of", " France.")]


def run(tok, tmp_path, resume=False, **scoring):
    where = {k: scoring.pop(k) for k in list(scoring) if k in ExecutionConfig.__dataclass_fields__}
    config = {
        "corpus": {"max_length": 8, "stride": 2, "cache_dir": str(tmp_path / "cache")},
        "perturb": {"optimizer": "adam", "lr": 3e-3, "steps": 1},
        "scoring": {"block_units": 3, **scoring},
        "output": {"top_tokens": 0},
        "execution": where,
    }
    return bgotrace.attribute(
        tiny_gpt2(tok), tok, DOCS, queries=QUERIES, config=config, out=tmp_path / "run",
        resume=resume,
    )  # fmt: skip


def scores(result) -> np.ndarray:
    return result.scores.sort_values("unit_id")["score"].to_numpy()


def test_truncated_and_altered_shards_are_recomputed(tok, tmp_path, caplog):
    clean = run(tok, tmp_path)
    shards = sorted((tmp_path / "run" / "shards").rglob("*.npz"))
    assert len(shards) >= 3
    truncated, altered = shards[0], shards[1]
    truncated.write_bytes(truncated.read_bytes()[:100])
    with np.load(altered) as data:  # a well-formed file whose numbers were changed
        fields = dict(data)
    fields["sums"] = fields["sums"] + 1.0
    np.savez(altered, **fields)
    with caplog.at_level(logging.WARNING, logger="bgotrace.score.store"):
        resumed = run(tok, tmp_path, resume=True)
    damaged = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(damaged) == 2 and str(truncated) in damaged[0] and str(altered) in damaged[1]
    np.testing.assert_allclose(scores(resumed), scores(clean), atol=ATOL, rtol=0)
    store = RunStore(tmp_path / "run")
    assert store.load_shard(0, 0) is not None and store.load_shard(0, 1) is not None


def test_shard_moved_to_another_block_is_refused(tmp_path):
    store = RunStore(tmp_path)
    store.save_shard(0, 1, np.ones((2, 3)), np.arange(3))
    store.shard_path(0, 1).replace(store.shard_path(0, 2))
    assert store.load_shard(0, 2) is None and not store.shard_path(0, 2).exists()


def test_resume_may_change_where_the_sweep_runs_but_not_what_it_computes(tok, tmp_path):
    run(tok, tmp_path)
    run(tok, tmp_path, resume=True, ship_cache="always", block_attempts=5)  # accepted
    with pytest.raises(bgotrace.errors.RunDirectoryError, match="config.yaml differs"):
        run(tok, tmp_path, resume=True, block_units=2)


def test_unit_slice_batches_like_the_cache(tok, tmp_path):
    """A shipped block is the same TokenSource as the cache's block, re-indexed from 0."""
    run(tok, tmp_path)
    cache = bgotrace.cache.TokenCache(tmp_path / "cache")
    block = Block(1, 2, min(7, len(cache)))
    part = UnitSlice.of_block(cache, block)
    local = part.local_block(block)
    assert (local.index, local.stop - local.start) == (1, block.stop - block.start)
    for i in range(local.stop):
        np.testing.assert_array_equal(part.unit_tokens(i), cache.unit_tokens(block.start + i))
    theirs = length_buckets(np.arange(block.start, block.stop), cache.lengths, 2)
    ours = length_buckets(np.arange(local.stop), part.lengths, 2)
    assert [list(b - block.start) for b in theirs] == [list(b) for b in ours]


def test_workers_use_the_cache_path_only_when_it_is_the_drivers_cache(tok, tmp_path):
    run(tok, tmp_path)
    root = str(tmp_path / "cache")
    manifest = bgotrace.cache.TokenCache(root).manifest
    cache, why = open_cache_at(root, {"corpus_fingerprint": manifest["corpus_fingerprint"]})
    assert cache is not None and why == ""
    assert open_cache_at(str(tmp_path / "elsewhere"), {})[0] is None
    cache, why = open_cache_at(root, {"corpus_fingerprint": "another corpus"})
    assert cache is None and "corpus_fingerprint" in why


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("ship_cache", "sometimes", "--ship-cache"),
        ("cpus_per_worker", -1.0, "--cpus-per-worker"),
        ("gpus_per_worker", float("nan"), "--gpus-per-worker"),
        ("block_attempts", 0, "--block-attempts"),
        ("ray_timeout", 0.0, "--ray-timeout"),
        ("ray_address", " ", "--ray-address"),
    ],
)
def test_bad_ray_options_are_config_errors(field, value, message):
    with pytest.raises(ConfigError, match=message):
        ExecutionConfig(**{field: value})
