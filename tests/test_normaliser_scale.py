"""The normaliser at scale (issue 14 item 5): over the candidates only, cached per unit,
resumable, in the sweep dtype.

Exactness: with ``batch_size=1`` a unit's loss and gradient norm come from a pass over that
unit alone, so they do not depend on which other units are scored, and a reranked run's
scores must equal the full run's on its candidates bit for bit (as in test_prefilter).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr

import bgotrace
from bgotrace.cache import TokenCache, get_token_cache
from bgotrace.config import PerturbConfig, ScoreConfig
from bgotrace.corpus import ChunkingConfig
from bgotrace.perturb import sensitivity
from bgotrace.perturb.sensitivity import cached_sensitivity, reference_units
from bgotrace.score.context import build_sweep_context
from tests.test_invariance import DOCS, QUERIES


@pytest.fixture
def computed(monkeypatch):
    """Every corpus unit whose gradient norm is computed, in order (a spy)."""
    seen: list[int] = []
    real = sensitivity.unit_gradient_norms

    def spy(model, units, names, device, *, indices=None, **kw):
        seen.extend(int(i) for i in indices)
        return real(model, units, names, device, indices=indices, **kw)

    monkeypatch.setattr(sensitivity, "unit_gradient_norms", spy)
    monkeypatch.setattr(sensitivity, "REFERENCE_UNITS", 5)  # a strict subset of the corpus
    return seen


def run(model, tok, cache_dir, normalize, queries=QUERIES, **scoring):
    cfg = {
        "corpus": {"max_length": 10, "stride": 2, "cache_dir": str(cache_dir)},
        "perturb": {"lr": 3e-3, "steps": 2},
        "output": {"top_tokens": 0},
        "scoring": {"batch_size": 1, "normalize": normalize, **scoring},
    }
    result = bgotrace.attribute(model, tok, DOCS, queries=queries, config=cfg)
    return result.scores.set_index(["query_id", "unit_id"]).sort_index()


@pytest.mark.parametrize("normalize", ["sensitivity", "damped"])
def test_candidates_normalise_their_units_only_and_equal_the_full_run(
    model, tok, tmp_path, computed, normalize
):
    full = run(model, tok, tmp_path / "full", normalize)
    n = len(TokenCache(tmp_path / "full"))
    assert sorted(computed) == list(range(n))
    computed.clear()
    part = run(model, tok, tmp_path / "part", normalize, candidates=3, queries_per_sweep=2)
    chosen = part[part["candidate"]]
    units = np.unique(part.loc[part["candidate"], "unit_index"])
    # the candidates and the reference sample of the median, nothing else
    assert sorted(computed) == sorted(set(units) | set(reference_units(n)))
    assert len(computed) < n
    np.testing.assert_array_equal(chosen["score"], full.loc[chosen.index, "score"])
    computed.clear()
    again = run(model, tok, tmp_path / "part", normalize)  # the full corpus, same cache
    assert sorted(computed) == sorted(set(range(n)) - set(units) - set(reference_units(n)))
    pd.testing.assert_series_equal(again["score"], full["score"], check_exact=True)


def test_an_interrupted_normaliser_resumes_at_its_first_missing_unit(model, tok, tmp_path,
                                                                    monkeypatch):  # fmt: skip
    cache = get_token_cache(DOCS, tok, ChunkingConfig(10, 2), tmp_path)
    names = [n for n, _ in model.named_parameters()]
    kw = dict(reduce="sum", device=torch.device("cpu"), block_units=4)
    real, seen = sensitivity.unit_gradient_norms, []

    def dies_in_block_2(model, units, names, device, *, indices=None, **kw):
        if seen:
            raise KeyboardInterrupt
        seen.extend(int(i) for i in indices)
        return real(model, units, names, device, indices=indices, **kw)

    monkeypatch.setattr(sensitivity, "unit_gradient_norms", dies_in_block_2)
    with pytest.raises(KeyboardInterrupt):
        cached_sensitivity(model, cache, names, **kw)
    assert seen == [0, 1, 2, 3]
    assert len(list((tmp_path / "sensitivity").rglob("*.npz"))) == 1  # block 1, kept
    seen.clear()

    def counting(model, units, names, device, *, indices=None, **kw):
        seen.extend(int(i) for i in indices)
        return real(model, units, names, device, indices=indices, **kw)

    monkeypatch.setattr(sensitivity, "unit_gradient_norms", counting)
    resumed = cached_sensitivity(model, cache, names, **kw)
    assert seen == list(range(4, len(cache)))  # block 1 (units 0..3) was not recomputed
    assert [p.suffix for p in (tmp_path / "sensitivity").iterdir()] == [".npz"]  # merged
    fresh, _ = real(model, cache, names, torch.device("cpu"), batch_size=16)
    np.testing.assert_allclose(resumed, fresh, rtol=1e-6)  # other batches: float32 noise


def test_the_normaliser_runs_in_the_sweep_dtype_and_ranks_like_float32(model, tok, tmp_path):
    """--dtype bfloat16: the norms come from the bfloat16 sweep model (16-bit forward and
    backward, float32 accumulation), keyed apart from float32's; their ranking of the units
    agrees with float32's (Spearman >= 0.99; bfloat16 keeps ~3 significant digits)."""
    cache = get_token_cache(DOCS, tok, ChunkingConfig(10, 2), tmp_path)
    out = {}
    for dtype in ("float32", "bfloat16"):
        ctx = build_sweep_context(
            model, cache, perturb_cfg=PerturbConfig(), pad_id=0,
            score_cfg=ScoreConfig(dtype=dtype, normalize="sensitivity"),
        )  # fmt: skip
        assert ctx.normaliser is not None
        assert next(ctx.normaliser.model.parameters()).dtype == getattr(torch, dtype)
        out[dtype] = ctx.sensitivity
    assert len(list((tmp_path / "sensitivity").glob("*.npz"))) == 2  # one store per dtype
    rho = spearmanr(out["float32"], out["bfloat16"]).statistic
    assert rho >= 0.99, rho
    assert not np.array_equal(out["float32"], out["bfloat16"])  # bfloat16 did run
    np.testing.assert_allclose(out["bfloat16"], out["float32"], rtol=5e-2)


def test_the_reference_sample_is_fixed_and_small():
    assert np.array_equal(reference_units(7), np.arange(7))
    big = reference_units(10**6)
    assert len(big) == sensitivity.REFERENCE_UNITS and np.array_equal(big, reference_units(10**6))
    s = np.full(10**6, np.nan)
    s[big] = np.arange(1.0, len(big) + 1)  # only the reference units computed
    assert sensitivity.reference_median(s) == np.median(np.arange(1.0, len(big) + 1))
