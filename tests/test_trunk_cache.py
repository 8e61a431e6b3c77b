"""The trunk-activation cache: warm-cache scores equal computed-trunk scores, stale is refused.

Tolerances, per stored dtype: float32 rows are the computed trunk itself, so scores agree
to float32 noise (atol 1e-5 nats). float16 rows round each hidden element to a relative
2^-11 (bfloat16: 2^-8), the same rounding for θ+, θ− and θ0; measured here, scores of up
to 3.5 nats move by ≤ 3e-4 nats (bfloat16 ≤ 2.5e-3), so the bounds are atol 2e-3 nats for
float16 and 1e-2 for bfloat16. A cache from the wrong block or of the wrong units moves
scores by ~1 nat.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import bgotrace
from bgotrace.cache.trunk_cache import MANIFEST, TrunkCache, get_trunk_cache
from bgotrace.cli.main import app
from bgotrace.errors import CacheMismatchError
from bgotrace.score import sweep as sweep_mod
from bgotrace.score.sweep import unit_loss_sums
from tests.models import tiny_gpt2, tiny_llama
from tests.test_split_forward import DOCS, QUERIES

CPU = torch.device("cpu")


def attribute(model, tok, cache_dir, **scoring):
    config = {
        "corpus": {"max_length": 10, "stride": 2, "cache_dir": str(cache_dir)},
        "perturb": {"optimizer": "adam", "lr": 1e-2, "steps": 2, "params": "last:1"},
        "scoring": {"reduce": "sum", "batch_size": 3, **scoring},
        "output": {"top_tokens": 0},
    }
    result = bgotrace.attribute(model, tok, DOCS, queries=QUERIES, config=config)
    return result.scores.sort_values(["query_id", "unit_id"])["score"].to_numpy()


@pytest.mark.parametrize(
    ("dtype", "atol"), [("float32", 1e-5), ("float16", 2e-3), ("bfloat16", 1e-2)]
)
@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_warm_cache_scores_equal_computed_trunk_scores(
    tok, tmp_path, monkeypatch, make, dtype, atol
):
    model = make(tok)
    plain = attribute(model, tok, tmp_path / "c")
    cold = attribute(model, tok, tmp_path / "c", trunk_cache=True, trunk_cache_dtype=dtype)
    (built,) = _visible(tmp_path / "c" / "trunk")
    assert built.name.endswith(f"-b1-{dtype}")  # last:1 of 2 blocks: the trunk is block 0

    def no_trunk(*args, **kwargs):
        raise AssertionError("a warm trunk cache must skip the trunk")

    monkeypatch.setattr(sweep_mod, "trunk", no_trunk)
    warm = attribute(model, tok, tmp_path / "c", trunk_cache=True, trunk_cache_dtype=dtype)
    assert np.abs(plain).max() > 0.05  # scores big enough for the tolerance to mean something
    np.testing.assert_allclose(cold, plain, atol=atol, rtol=0)
    np.testing.assert_allclose(warm, cold, atol=1e-6, rtol=0)


class Subset:
    """A subset view of a token source (what the prefilter's rerank sweeps)."""

    def __init__(self, units, indices):
        self.source, self.indices = units, np.asarray(indices)

    @property
    def lengths(self):
        return self.source.lengths[self.indices]

    def unit_tokens(self, i):
        return self.source.unit_tokens(int(self.indices[i]))


def _cache_and_states(tok, tmp_path):
    model = tiny_gpt2(tok)
    attribute(model, tok, tmp_path / "c")  # builds the token cache
    cache = bgotrace.cache.TokenCache(tmp_path / "c")
    names = [n for n, _ in model.named_parameters() if ".h.1." in n]
    gen = torch.Generator().manual_seed(0)
    params = dict(model.named_parameters())
    state = {
        n: params[n].detach() + 0.05 * torch.randn(params[n].shape, generator=gen) for n in names
    }
    return model, cache, [None, state]


def test_trunk_cache_serves_a_subset_of_units(tok, tmp_path):
    model, cache, states = _cache_and_states(tok, tmp_path)
    trunk = get_trunk_cache(model, cache, 1, dtype="float32", batch_size=4, pad_id=0, device=CPU)
    view = Subset(cache, [5, 0, 3])
    kw = {"batch_size": 2, "pad_id": 0, "device": CPU}
    want, _ = unit_loss_sums(model, view, np.arange(3), states, **kw)
    got, _ = unit_loss_sums(
        model, view, np.arange(3), states, trunk_rows=trunk.for_units(view), **kw
    )
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_stale_trunk_cache_is_refused(tok, tmp_path):
    model, cache, _ = _cache_and_states(tok, tmp_path)
    built = get_trunk_cache(model, cache, 1, dtype="float16", batch_size=4, pad_id=0, device=CPU)
    assert isinstance(built, TrunkCache)
    manifest = json.loads((built.root / MANIFEST).read_text())
    manifest["token_cache_fingerprint"] = "another corpus"  # token cache changed underneath
    (built.root / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CacheMismatchError, match="stale .*token_cache_fingerprint.*rm -r"):
        get_trunk_cache(model, cache, 1, dtype="float16", batch_size=4, pad_id=0, device=CPU)
    assert not list(built.root.parent.glob(".*tmp*"))  # no half-built directory left behind


def test_cli_trunk_cache_second_run_reuses_it(tok, tmp_path):
    model_dir = tmp_path / "model"
    tiny_gpt2(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": d.doc_id, "text": d.text}) + "\n" for d in DOCS))
    args = [
        "attribute", "--model", model_dir, "--corpus", corpus, "--quiet", "--cache-dir",
        tmp_path / "cache", "--max-length", "12", "--steps", "2", "--params", "last:1",
        "--trunk-cache", "--prompt", "Paris is the capital of", "--completion", " France.",
    ]  # fmt: skip
    runner = CliRunner()
    for out in ("a", "b"):
        result = runner.invoke(app, [str(a) for a in [*args, "--out", tmp_path / out]])
        assert result.exit_code == 0, result.output
    assert len(_visible(tmp_path / "cache" / "trunk")) == 1
    a = json.loads((tmp_path / "a" / "summary.json").read_text())["queries"][0]["top_units"]
    b = json.loads((tmp_path / "b" / "summary.json").read_text())["queries"][0]["top_units"]
    assert a == b


def _visible(folder):
    """Entries of a folder without the hidden lock files of bgotrace.cache.locking."""
    return [p for p in folder.iterdir() if not p.name.startswith(".")]
