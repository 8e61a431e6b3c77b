"""``bgo-linear`` (∇L(z; θ0)·Δ by forward mode) against finite differences and exact BGO.

Tolerances:
- Finite differences: the reference is a float64 copy of the model, one unit at a time
  through Hugging Face's own forward, central difference with ε = 1e-4 along Δ (|Δ| ~ 1e-2
  per parameter): truncation O(ε²) and rounding ~1e-16/ε are both far below 1e-6 relative.
  Llama's RMSNorm computes in float32 even in a float64 model (rounding ~1e-7 × the loss / ε
  would be 1e-3 here, measured), so the reference replaces it by the float64 formula. The
  JVP runs in float32 (batched, padded, split). rtol 1e-4 with atol 1e-4 × the
  largest |score| separates right from wrong (a missed block, the wrong reduction or
  padding in the loss moves scores by > 1e-2 relative).
- Exact BGO at a tiny step (SGD, lr 1e-4, K = 3): a loss change is ∇L·Δ plus second-order
  terms (relative size ~ the step; they cancel in the bidirectional score up to the
  asymmetry of θ± around θ0) plus float32 rounding of the losses (~1e-6 × a loss sum of
  ~50 nats). Measured on these models: largest |linear − exact| ≤ 0.5% of the largest score
  for every variant (bidirectional 0.02-0.04%), 2-5% at lr 1e-3; atol 1% of the largest
  score.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from bgotrace.cache import get_token_cache
from bgotrace.config import PerturbConfig, ScoreConfig
from bgotrace.corpus import ChunkingConfig
from bgotrace.perturb.params import select_parameters
from bgotrace.query import Query, encode_query
from bgotrace.score.context import build_sweep_context
from bgotrace.score.engine import score_queries
from bgotrace.score.linear import (
    agreement,
    group_linear_scores,
    linear_scores,
    linearity_diagnostic,
    sample_units,
    tangents,
)
from bgotrace.variants import ASCENT, BASE, DESCENT, score_losses
from tests.conftest import make_tiny_tokenizer
from tests.models import tiny_gpt2, tiny_llama

BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama}
SELECTIONS = {"all": lambda n: True, "last": lambda n: ".1." in n and "layers" in n or ".h.1." in n}
QUERY = Query("q", "Paris is the capital of", " France.")
LR_TINY = 1e-4


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


def _cache(tokenizer, documents, root, bos: bool = False):
    bos_id = tokenizer.eos_token_id if bos else None
    chunking = ChunkingConfig(max_length=16, bos_id=bos_id)
    return get_token_cache(documents, tokenizer, chunking, root)


def _random_direction(model, names, seed=0, scale=1e-2):
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    return {n: scale * torch.randn(params[n].shape, generator=gen) for n in names}


def _float64_rms_norm(norm):
    def forward(x):
        return (
            norm.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        )

    return forward


def _slow_central_difference(model, cache, delta, reduce, eps=1e-4):
    """One unit at a time, float64 copy, the model's own forward: (f(θ+εΔ) − f(θ−εΔ)) / 2ε."""
    slow = copy.deepcopy(model).double()
    for module in slow.modules():
        if type(module).__name__.endswith("RMSNorm"):  # casts to float32 inside: not here
            module.forward = _float64_rms_norm(module)
    params = {n: p.detach() for n, p in slow.named_parameters()}
    out = []
    for i in range(len(cache)):
        ids = torch.as_tensor(cache.unit_tokens(i).astype(np.int64))[None]

        def loss(sign, ids=ids):
            moved = {n: params[n] + sign * eps * d.double() for n, d in delta.items()}
            logits = functional_call(slow, moved, args=(ids,)).logits[0, :-1]
            nll = F.cross_entropy(logits, ids[0, 1:], reduction="sum")
            return float(nll) / (ids.shape[1] - 1 if reduce == "mean" else 1)

        with torch.no_grad():
            out.append((loss(+1) - loss(-1)) / (2 * eps))
    return np.array(out)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
@pytest.mark.parametrize("selection", sorted(SELECTIONS))
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_linear_scores_match_central_differences(
    tokenizer, tiny_documents, tmp_path, arch, selection, reduce
):
    model = BUILDERS[arch](tokenizer, seed=1)
    cache = _cache(tokenizer, tiny_documents, tmp_path, bos=arch == "llama")
    names = [n for n, _ in model.named_parameters() if SELECTIONS[selection](n)]
    assert 0 < len(names) <= len(list(model.parameters()))
    deltas = [_random_direction(model, names, seed=s) for s in (0, 1)]
    fast = linear_scores(model, cache, deltas, reduce=reduce, batch_size=3)  # padded batches
    for q, delta in enumerate(deltas):
        slow = _slow_central_difference(model, cache, delta, reduce)
        scale = float(np.abs(slow).max())
        np.testing.assert_allclose(fast[q], slow, rtol=1e-4, atol=1e-4 * scale)
    assert all(p.grad is None for p in model.parameters())


def test_linear_scores_do_not_depend_on_batching_or_order(tokenizer, tiny_documents, tmp_path):
    model = tiny_gpt2(tokenizer, seed=2)
    cache = _cache(tokenizer, tiny_documents, tmp_path)
    delta = _random_direction(model, [n for n, _ in model.named_parameters()])
    whole = linear_scores(model, cache, [delta], batch_size=1)[0]
    subset = np.array([5, 0, 3])
    picked = linear_scores(model, cache, [delta], indices=subset, batch_size=8)[0]
    np.testing.assert_allclose(picked, whole[subset], rtol=1e-5, atol=1e-6)


def test_tangents_of_each_variant():
    """Two-state variants take one JVP along θ_a − θ_b; agree takes one per perturbed state."""
    base = {"w": torch.tensor([1.0, 2.0])}
    states = {ASCENT: {"w": torch.tensor([1.5, 1.0])}, DESCENT: {"w": torch.tensor([0.5, 3.0])}}
    expect = {
        "bidirectional": {ASCENT: [1.0, -2.0]},
        "abs": {ASCENT: [1.0, -2.0]},
        "ascent": {ASCENT: [0.5, -1.0]},
        "descent": {BASE: [0.5, -1.0]},
        "agree": {ASCENT: [0.5, -1.0], DESCENT: [-0.5, 1.0]},
    }
    for variant, value in expect.items():
        got = tangents(variant, {**states, BASE: None}, base)
        assert list(got) == list(value), variant
        for key, tangent in value.items():
            torch.testing.assert_close(got[key]["w"], torch.tensor(tangent), rtol=0, atol=0)


def _bgo_context(model, cache, tokenizer, optimizer, lr, steps=3, score="bidirectional"):
    perturb = PerturbConfig(optimizer=optimizer, lr=lr, steps=steps)
    scoring = ScoreConfig(normalize="none", batch_size=4, score=score)
    pad = int(tokenizer.pad_token_id)
    return build_sweep_context(model, cache, perturb_cfg=perturb, score_cfg=scoring, pad_id=pad)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
@pytest.mark.parametrize("score", ["bidirectional", "ascent", "descent", "abs", "agree"])
def test_linear_equals_exact_bgo_for_a_tiny_step(tokenizer, tiny_documents, tmp_path, arch, score):
    model = BUILDERS[arch](tokenizer, seed=4)
    cache = _cache(tokenizer, tiny_documents, tmp_path)
    ctx = _bgo_context(model, cache, tokenizer, "sgd", LR_TINY, score=score)
    query = encode_query(QUERY, tokenizer, None)
    (exact_run,) = score_queries(ctx, [query])
    exact = score_losses(score, exact_run.losses)
    linear = group_linear_scores(ctx, [exact_run.states])[0]
    scale = float(np.abs(exact).max())
    assert scale > 1e-2  # the step moved the losses far above float32 rounding (~5e-5)
    np.testing.assert_allclose(linear, exact, rtol=0, atol=0.01 * scale)


def test_linear_and_exact_part_for_a_large_step(tokenizer, tiny_documents, tmp_path):
    """The control is first order only: at a large Adam step the two disagree (this guards
    against a 'linear' path that secretly evaluates the perturbed states)."""
    model = tiny_gpt2(tokenizer, seed=4)
    cache = _cache(tokenizer, tiny_documents, tmp_path)
    ctx = _bgo_context(model, cache, tokenizer, "adam", 0.05, steps=5)
    (run,) = score_queries(ctx, [encode_query(QUERY, tokenizer, None)])
    exact = score_losses("bidirectional", run.losses)
    linear = group_linear_scores(ctx, [run.states])[0]
    assert np.abs(linear - exact).max() > 0.05 * np.abs(exact).max()


def test_agreement_on_hand_made_scores():
    exact = np.array([4.0, 3.0, 2.0, 1.0])
    same = agreement(exact, 10 * exact, top_k=2)
    assert same == {"spearman": 1.0, "top2_overlap": 1.0}
    reverse = agreement(exact, -exact, top_k=2)
    assert reverse["spearman"] == pytest.approx(-1.0) and reverse["top2_overlap"] == 0.0
    half = agreement(exact, np.array([4.0, 1.0, 3.0, 2.0]), top_k=2)
    assert half["top2_overlap"] == 0.5


def test_sample_units_is_seeded_and_bounded():
    pool = np.arange(100)
    a, b = sample_units(pool, 10, seed=3), sample_units(pool, 10, seed=3)
    np.testing.assert_array_equal(a, b)
    assert len(set(a.tolist())) == 10 and not np.array_equal(a, sample_units(pool, 10, seed=4))
    np.testing.assert_array_equal(sample_units(pool[:5], 10, seed=0), pool[:5])


def test_linearity_diagnostic_against_its_own_linear_scores(tokenizer, tiny_documents, tmp_path):
    model = tiny_gpt2(tokenizer, seed=5)
    cache = _cache(tokenizer, tiny_documents, tmp_path)
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    delta = _random_direction(model, names)
    states = {
        ASCENT: {n: params[n].detach() + delta[n] / 2 for n in names},
        DESCENT: {n: params[n].detach() - delta[n] / 2 for n in names},
    }
    linear = linear_scores(model, cache, [delta])[0]
    divisors = np.linspace(1.0, 3.0, len(cache))
    exact = linear / divisors
    exact[1] = np.nan  # not swept: never sampled
    diag = linearity_diagnostic(
        model, cache, states, exact, divisors=divisors, sample=4, seed=0, top_k=2
    )
    assert diag["n_sample"] == 4 and diag["spearman"] == pytest.approx(1.0, abs=1e-12)
    assert diag["top2_overlap"] == 1.0
    flipped = linearity_diagnostic(model, cache, states, -exact, divisors=divisors, sample=100)
    assert flipped["n_sample"] == len(cache) - 1
    assert flipped["spearman"] == pytest.approx(-1.0, abs=1e-12)


# --- the method: bgo-linear through the one BGO path ------------------------------------------


def _method_scores(name, model, tokenizer, cache, **options):
    from bgotrace.baselines import MethodContext, get_attributor

    method = get_attributor(name, optimizer="sgd", lr=LR_TINY, steps=3, batch_size=4, **options)
    method.prepare(MethodContext(model, tokenizer, cache))
    queries = [
        encode_query(QUERY, tokenizer, None),
        encode_query(Query("r", "The cat", " sleeps"), tokenizer, None),
    ]
    return method.score(queries)


@pytest.mark.parametrize("normalize", ["none", "sensitivity"])
def test_bgo_linear_method_equals_bgo_for_a_tiny_step(
    tokenizer, tiny_documents, tmp_path, normalize
):
    """Same perturbation, same normalisation: at a tiny step the two methods agree."""
    model = tiny_llama(tokenizer, seed=6)
    cache = _cache(tokenizer, tiny_documents, tmp_path)
    exact = _method_scores("bgo", model, tokenizer, cache, normalize=normalize)
    linear = _method_scores("bgo-linear", model, tokenizer, cache, normalize=normalize)
    assert linear.shape == exact.shape == (2, len(cache))
    for q in range(2):
        scale = float(np.abs(exact[q]).max())
        np.testing.assert_allclose(linear[q], exact[q], rtol=0, atol=0.01 * scale)


def test_bgo_linear_writes_a_run_like_bgo(tokenizer, tiny_documents, tmp_path):
    """``method: bgo-linear`` through ``bgotrace.attribute``: ranked units, loss trajectories
    of the perturbation it linearises, the run directory, and a replayable config."""
    import bgotrace

    model = tiny_gpt2(tokenizer, seed=7)
    config = {
        "method": "bgo-linear",
        "corpus": {"max_length": 16, "cache_dir": str(tmp_path / "cache")},
        "perturb": {"optimizer": "sgd", "lr": LR_TINY, "steps": 2},
        "output": {"granularity": "document"},
    }
    kw = dict(prompt=QUERY.prompt, completion=QUERY.completion, config=config)
    result = bgotrace.attribute(model, tokenizer, tiny_documents, out=tmp_path / "run", **kw)
    assert result.summary["method"] == "bgo-linear"
    assert result.score_unit.startswith("nats")  # as bgo (normalised or not)
    top = result.top(3)
    assert len(top) == 3 and np.isfinite(top["score"]).all()
    assert "loss_linear" in result.scores.columns
    assert (tmp_path / "run" / "scores.parquet").is_file()
    assert (tmp_path / "run" / "config.yaml").is_file()
    config["method"] = "bgo"
    exact = bgotrace.attribute(model, tokenizer, tiny_documents, **kw)
    joined = result.scores.merge(exact.scores, on="unit_id", suffixes=("_lin", "_bgo"))
    scale = float(joined["score_bgo"].abs().max())
    np.testing.assert_allclose(joined["score_lin"], joined["score_bgo"], atol=0.01 * scale)


def test_bgo_linear_reranks_only_the_candidates(tokenizer, tiny_documents, tmp_path):
    """With a prefilter, the candidates get the scores of the full linear pass, the rest NaN."""
    model = tiny_gpt2(tokenizer, seed=8)
    cache = _cache(tokenizer, tiny_documents, tmp_path)
    full = _method_scores("bgo-linear", model, tokenizer, cache, normalize="none")
    some = _method_scores("bgo-linear", model, tokenizer, cache, normalize="none", candidates=4)
    swept = np.isfinite(some)  # the group's candidates: the union of each query's top 4
    assert (swept == swept[0]).all() and 4 <= swept[0].sum() < len(cache)
    np.testing.assert_allclose(some[swept], full[swept], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("size", [0, 5, 1000])
def test_query_linearity_of_a_bgo_run(tokenizer, tiny_documents, tmp_path, size):
    """The diagnostic a BGO run reports per query: sized by ``linearity_sample`` (0: off);
    at a tiny step exact and linear rank alike."""
    from bgotrace.score.linear import query_linearity

    model = tiny_gpt2(tokenizer, seed=9)
    cache = _cache(tokenizer, tiny_documents, tmp_path)
    ctx = _bgo_context(model, cache, tokenizer, "sgd", LR_TINY)
    ctx.score_cfg = dataclasses.replace(ctx.score_cfg, linearity_sample=size, linearity_share=1.0)
    (run,) = score_queries(ctx, [encode_query(QUERY, tokenizer, None)])
    diag = query_linearity(ctx, run, score_losses("bidirectional", run.losses))
    if size == 0:
        assert diag is None
        return
    assert diag["n_sample"] == min(size, len(cache))
    assert diag["spearman"] > 0.99 and diag["top10_overlap"] == 1.0


def test_every_bgo_run_reports_its_linearity_in_the_summary_and_report(
    tokenizer, tiny_documents, tmp_path
):
    """summary.json carries the first-order check per query (a tiny step: the finite steps
    change nothing, so it agrees), the report shows it, and linearity_sample 0 turns it off."""
    import json

    import bgotrace

    model = tiny_gpt2(tokenizer, seed=9)
    config = {
        "corpus": {"max_length": 16},
        "perturb": {"optimizer": "sgd", "lr": LR_TINY, "steps": 2},
        "scoring": {"normalize": "none"},
    }

    def run(out, **scoring):
        cfg = {**config, "scoring": {**config["scoring"], **scoring}}
        bgotrace.attribute(model, tokenizer, tiny_documents, prompt=QUERY.prompt,
                           completion=QUERY.completion, config=cfg, out=out)  # fmt: skip
        return json.loads((out / "summary.json").read_text())["queries"][0]["linearity"]

    on = run(tmp_path / "on")
    assert on["n_sample"] > 0 and on["spearman"] > 0.99 and on["top10_overlap"] == 1.0
    assert "first-order check: Spearman" in (tmp_path / "on" / "report.html").read_text()
    assert run(tmp_path / "off", linearity_sample=0) is None


def test_the_diagnostic_samples_a_share_of_the_swept_units_within_its_bounds():
    """At most --linearity-share of the swept units, never fewer than 32 (or all the corpus
    has), never more than --linearity-sample; 0 stays off."""
    from bgotrace.score.linear import MIN_DIAGNOSTIC_UNITS, diagnostic_size

    assert MIN_DIAGNOSTIC_UNITS == 32
    assert diagnostic_size(256, 0.02, 1_300) == 32  # 26 -> the floor
    assert diagnostic_size(256, 0.02, 5_000) == 100  # 2%
    assert diagnostic_size(256, 0.02, 1_000_000) == 256  # the cap
    assert diagnostic_size(16, 0.02, 1_300) == 16  # the cap below the floor
    assert diagnostic_size(256, 1.0, 1_300) == 256  # share 1: the cap
    assert diagnostic_size(0, 0.02, 1_300) == 0  # off


def test_a_linearity_share_outside_0_1_is_one_line():
    from bgotrace.config import ScoreConfig
    from bgotrace.errors import ConfigError

    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="--linearity-share .* not a fraction"):
            ScoreConfig(linearity_share=bad)


def test_a_bgo_run_samples_its_share_of_a_larger_corpus(tokenizer, tiny_documents, tmp_path):
    """The diagnostic of a run over more than 32 units samples max(32, share x units)."""
    from bgotrace.score.linear import query_linearity

    docs = [
        dataclasses.replace(d, doc_id=f"{d.doc_id}-{i}") for i in range(12) for d in tiny_documents
    ]
    model = tiny_gpt2(tokenizer, seed=9)
    cache = _cache(tokenizer, docs, tmp_path)
    assert len(cache) > 2 * 32
    ctx = _bgo_context(model, cache, tokenizer, "sgd", LR_TINY)
    ctx.score_cfg = dataclasses.replace(ctx.score_cfg, linearity_sample=256, linearity_share=0.01)
    (run,) = score_queries(ctx, [encode_query(QUERY, tokenizer, None)])
    assert query_linearity(ctx, run, score_losses("bidirectional", run.losses))["n_sample"] == 32


@pytest.mark.parametrize("params", ["all", "last:1"])
def test_stacked_directions_equal_one_at_a_time(tokenizer, tiny_documents, tmp_path, monkeypatch,
                                                 params):  # fmt: skip
    """Several directions' JVPs in one vmap (sharing the primal forward) equal the same JVPs
    one at a time, also in uneven runs (STACK_MAX 2 over 5 directions)."""
    from bgotrace.score import linear

    model = tiny_gpt2(tokenizer, seed=9)
    cache = _cache(tokenizer, tiny_documents, tmp_path)
    names = select_parameters(model, params)
    directions = [_random_direction(model, names, seed=k) for k in range(5)]
    monkeypatch.setattr(linear, "STACK_MAX", 2)
    stacked = linear.linear_scores(model, cache, directions, batch_size=3)
    monkeypatch.setattr(linear, "STACK_BYTES", 0)  # every direction alone
    alone = linear.linear_scores(model, cache, directions, batch_size=3)
    assert stacked.shape == (5, len(cache))
    np.testing.assert_allclose(stacked, alone, rtol=1e-6, atol=1e-9)
    assert len({tuple(r) for r in np.round(alone, 6)}) == 5  # five different directions

    def refuse(fn):  # a model vmap cannot batch: the stacked runs go one at a time
        raise RuntimeError("vmap: no batching rule")

    monkeypatch.setattr(linear, "STACK_BYTES", 1 << 30)
    monkeypatch.setattr(linear, "vmap", refuse)
    looped = linear.linear_scores(model, cache, directions, batch_size=3)
    np.testing.assert_array_equal(looped, alone)


def test_a_groups_first_order_checks_equal_each_querys_own(tokenizer, tiny_documents, tmp_path):
    """The diagnostic of a sweep group's queries (one pass over the sample, directions
    stacked) equals each query's own (one query per sweep), and differs between queries."""
    import bgotrace

    model = tiny_gpt2(tokenizer, seed=9)
    queries = [QUERY, Query("b", "The cat sleeps on", " a warm mat."),
               Query("c", "The quick brown fox", " jumps over the lazy dog.")]  # fmt: skip
    config = {"corpus": {"max_length": 16},
              "perturb": {"optimizer": "sgd", "lr": 3e-2, "steps": 3}}  # fmt: skip

    def checks(per_sweep: int) -> list[dict]:
        cfg = {**config, "scoring": {"queries_per_sweep": per_sweep}}
        result = bgotrace.attribute(model, tokenizer, tiny_documents, queries=queries, config=cfg)
        return [q["linearity"] for q in result.summary["queries"]]

    alone, grouped = checks(1), checks(3)
    for a, g in zip(alone, grouped, strict=True):
        assert a["n_sample"] == g["n_sample"] > 0 and a["top10_overlap"] == g["top10_overlap"]
        assert g["spearman"] == pytest.approx(a["spearman"], abs=1e-9)
    assert len({round(c["spearman"], 9) for c in alone}) > 1
