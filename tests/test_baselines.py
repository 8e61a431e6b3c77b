"""Every baseline against a slow, obvious reference; BGO through the interface equals the API.

Tolerances: gradients are float32; the library takes them in batch-1 passes like the
reference, so inner products of ~5e4 float32 terms agree to ~1e-6 relative (rtol 1e-4,
atol scaled to the scores' magnitude). Pooled hidden states of padded batches differ from
one-sequence passes by ~1e-7 (atol 1e-5 on cosines). BGO through the interface and through
``bgotrace.api.attribute`` runs the same engine on the same cache: bit-equal at the same
batch size; at another batch size float32 losses of ~6 nats round differently by ~1e-6
nats (atol 5e-6 nats).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from bgotrace.api import attribute
from bgotrace.baselines import MethodContext, available_methods, get_attributor
from bgotrace.baselines.influence import conv1d_to_linear
from bgotrace.baselines.projection import GaussianProjection
from bgotrace.cache import get_token_cache
from bgotrace.corpus import ChunkingConfig, Document
from bgotrace.errors import ConfigError
from bgotrace.perturb.fisher import sample_units
from bgotrace.perturb.params import select_parameters
from bgotrace.query import Query, encode_query
from tests.bgo_reference import fisher_diag, query_loss
from tests.models import tiny_gpt2, tiny_llama

DUPLICATE = "Zorblax lives in Zanzibar."  # 19 tokens + EOS: exactly one unit
TEXTS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps on a warm mat.",
    "Paris is the capital of France, Berlin of Germany, Madrid of Spain and Rome of Italy.",
    "Water boils at one hundred degrees, ice melts at zero, and steam rises from the pot.",
    "def add(a, b): return a + b  # code shows up in corpora too",
    "Gradients point uphill; a small step against the gradient lowers the loss of a query.",
    "Rivers carry sand to the sea, mountains rise slowly, and forests grow back after fire.",
    DUPLICATE,
    "A language model predicts the next token from the tokens before it, one step at a time.",
    "Numbers like 1, 2, 3, 42 and 2024 appear in text, as do dates such as 14 July 1789.",
    "Cafés serve crème brûlée; naïve façades hide Zürich's old streets.",
]
DOCS = [Document(f"d{i}", text, f"s{i % 3}") for i, text in enumerate(TEXTS)]
QUERIES = [
    Query("zorblax", "Zorblax lives in", " Zanzibar."),
    Query("capital", "Paris is the capital of", " France, Berlin of Germany."),
    Query("water", "Water boils at", " one hundred degrees."),
]
CHUNKING = ChunkingConfig(max_length=20, stride=0)
GRAD_TOL = {"rtol": 1e-4}


@pytest.fixture(scope="module")
def cache(tok, tmp_path_factory):
    return get_token_cache(DOCS, tok, CHUNKING, tmp_path_factory.mktemp("c") / "c", progress=False)


@pytest.fixture(scope="module")
def models(tok):
    return {"llama": tiny_llama(tok), "gpt2": tiny_gpt2(tok)}


@pytest.fixture(scope="module")
def queries(tok):
    return [encode_query(q, tok, None) for q in QUERIES]


def context(models, tok, cache, model="llama", **kw):
    return MethodContext(models[model], tok, cache, batch_size=kw.pop("batch_size", 4), **kw)


def run(name, ctx, queries, **options):
    method = get_attributor(name, **options)
    method.prepare(ctx)
    scores = method.score(queries)
    assert scores.shape == (len(queries), len(ctx.cache)) and scores.dtype == np.float64
    assert np.isfinite(scores).all()
    return scores


def duplicate_unit(cache) -> int:
    (index,) = [i for i in range(len(cache)) if cache.unit_text(i) == DUPLICATE]
    return index


# --- slow references -----------------------------------------------------------------------


def ref_grads(model, seqs, names) -> torch.Tensor:
    """(n, D) loss gradients, one ``backward()`` per sequence on a deep copy."""
    m = copy.deepcopy(model)
    rows = []
    for ids, labels in seqs:
        m.zero_grad()
        query_loss(m, ids, labels).backward()
        params = dict(m.named_parameters())
        rows.append(torch.cat([params[n].grad.reshape(-1) for n in names]))
    return torch.stack(rows).double()


def unit_seqs(cache):
    seqs = []
    for i in range(len(cache)):
        ids = torch.tensor([cache.unit_tokens(i).tolist()])
        seqs.append((ids, ids))
    return seqs


def query_seqs(queries):
    return [(q.input_ids, q.labels) for q in queries]


def cosine(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    a = a / a.norm(dim=1, keepdim=True)
    b = b / b.norm(dim=1, keepdim=True)
    return (b @ a.T).numpy()


def ref_fisher(model, cache, names, n_samples=256) -> torch.Tensor:
    seqs = [s[0][0].tolist() for s in unit_seqs(cache)]
    fisher = fisher_diag(model, seqs, sample_units(len(cache), n_samples, seed=0))
    return torch.cat([fisher[n].reshape(-1) for n in names]).double()


# --- gradient baselines ----------------------------------------------------------------------


@pytest.mark.parametrize("model,params", [("llama", "all"), ("gpt2", "all"), ("llama", "last:1")])
def test_graddot_and_gradcos_match_reference(models, tok, cache, queries, model, params):
    ctx = context(models, tok, cache, model, params=params)
    names = select_parameters(models[model], params)
    g_units = ref_grads(models[model], unit_seqs(cache), names)  # (N, D)
    g_queries = ref_grads(models[model], query_seqs(queries), names)  # (Q, D)
    dot = (g_queries @ g_units.T).numpy()
    atol = 1e-5 * np.abs(dot).max()
    np.testing.assert_allclose(run("graddot", ctx, queries), dot, atol=atol, **GRAD_TOL)
    cos = cosine(g_units, g_queries)
    np.testing.assert_allclose(run("gradcos", ctx, queries), cos, atol=1e-5, **GRAD_TOL)


def test_fisher_graddot_matches_reference(models, tok, cache, queries):
    ctx = context(models, tok, cache)
    names = select_parameters(models["llama"], "all")
    g_units = ref_grads(models["llama"], unit_seqs(cache), names)
    g_queries = ref_grads(models["llama"], query_seqs(queries), names)
    inv = 1.0 / (ref_fisher(models["llama"], cache, names) + 1e-6)
    expected = ((g_queries * inv) @ g_units.T).numpy()
    got = run("fisher-graddot", ctx, queries)
    np.testing.assert_allclose(got, expected, atol=1e-5 * np.abs(expected).max(), **GRAD_TOL)


def test_fisher_graddot_is_bgo_first_order_limit(models, tok, cache, queries):
    """One fisher step of size η each way: BGO ≈ 2(η/N)·fisher-graddot (to < 1% at η=3e-6).

    Second-order terms cancel in the central difference; what is left (third order,
    float32 rounding) stays below 1% of the largest score here, while a wrong sign,
    factor 2 or preconditioner would be off by 100% or more.
    """
    ctx = context(models, tok, cache)
    lr, n = 3e-6, len(cache)
    bgo = run(
        "bgo", ctx, queries, optimizer="fisher", lr=lr, steps=1, reduce="mean", normalize="none"
    )
    predicted = 2 * lr / n * run("fisher-graddot", ctx, queries)
    assert np.abs(bgo - predicted).max() < 1e-2 * np.abs(predicted).max()


def _adam_state(model, names, path, step=10, beta2=0.95):
    gen = torch.Generator().manual_seed(1)
    params = dict(model.named_parameters())
    v = {n: torch.rand(params[n].shape, generator=gen) * 1e-4 + 1e-6 for n in names}
    meta = {"step": str(step), "betas": json.dumps([0.9, beta2]), "eps": "1e-08"}
    save_file({f"exp_avg_sq.{n}": t for n, t in v.items()}, str(path), metadata=meta)
    v_hat = torch.cat([v[n].reshape(-1) for n in names]).double() / (1 - beta2**step)
    return v_hat


def test_trackstar_unprojected_matches_reference(models, tok, cache, queries, tmp_path):
    ctx = context(models, tok, cache)
    names = select_parameters(models["llama"], "all")
    v_hat = _adam_state(models["llama"], names, tmp_path / "opt.safetensors")
    w = 1.0 / (v_hat.sqrt() + 1e-8)
    g_units = ref_grads(models["llama"], unit_seqs(cache), names) * w
    g_queries = ref_grads(models["llama"], query_seqs(queries), names) * w
    got = run(
        "trackstar", ctx, queries, proj_dim=None, optimizer_state=str(tmp_path / "opt.safetensors")
    )
    np.testing.assert_allclose(got, cosine(g_units, g_queries), atol=1e-5, **GRAD_TOL)


def test_trackstar_projected_with_fisher_fallback_matches_reference(models, tok, cache, queries):
    """No optimizer state next to an in-memory model: v is the Fisher; projection seeded."""
    ctx = context(models, tok, cache, seed=3)
    names = select_parameters(models["llama"], "all")
    w = 1.0 / (ref_fisher(models["llama"], cache, names).sqrt() + 1e-8)
    proj = GaussianProjection(len(w), 64, seed=3).matrix().double()  # (D, k), whole
    f_units = (ref_grads(models["llama"], unit_seqs(cache), names) * w) @ proj
    f_queries = (ref_grads(models["llama"], query_seqs(queries), names) * w) @ proj
    method = get_attributor("trackstar", proj_dim=64)
    method.prepare(ctx)
    assert method.second_moment == "fisher"
    np.testing.assert_allclose(
        method.score(queries), cosine(f_units, f_queries), atol=1e-4, **GRAD_TOL
    )


def test_projection_preserves_cosines_and_is_seeded():
    """JL: with k=2048 the cosine of two 20k-dim vectors moves by ~1/sqrt(k) = 0.02."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 20_000, generator=gen)
    x[1] = 0.6 * x[0] + 0.8 * x[1]  # cosine about 0.6
    proj = GaussianProjection(20_000, 2048, seed=7, chunk_rows=3000)
    y = proj(x)
    before = float(torch.nn.functional.cosine_similarity(x[0], x[1], dim=0))
    after = float(torch.nn.functional.cosine_similarity(y[0], y[1], dim=0))
    assert abs(after - before) < 0.1
    assert abs(float(y[0].norm() / x[0].norm()) - 1) < 0.1  # norms kept in expectation
    torch.testing.assert_close(GaussianProjection(20_000, 2048, 7, 3000)(x), y)
    assert not torch.allclose(GaussianProjection(20_000, 2048, 8, 3000)(x), y)
    torch.testing.assert_close(proj(x[:1]), y[:1])  # rows are projected independently


# --- model-free and representation baselines --------------------------------------------------


def test_bm25_ranks_the_unit_with_the_rare_words_first(models, tok, cache, queries):
    ctx = context(models, tok, cache)
    target = duplicate_unit(cache)
    for query_text in ("completion", "prompt+completion"):
        scores = run("bm25", ctx, queries[:1], query_text=query_text)
        assert int(scores[0].argmax()) == target
        assert scores[0, target] > 0
    nothing = encode_query(Query("none", "The", " xylophones."), tok, None)
    assert not run("bm25", ctx, [nothing]).any()  # no shared word: all zeros


def test_random_is_seeded_and_independent_of_batching(models, tok, cache, queries):
    scores = run("random", context(models, tok, cache, seed=1), queries)
    again = run("random", context(models, tok, cache, seed=1), queries[1:])
    other = run("random", context(models, tok, cache, seed=2), queries)
    np.testing.assert_array_equal(scores[1:], again)
    assert not np.allclose(scores, other)
    assert abs(np.corrcoef(scores[0], scores[1])[0, 1]) < 0.6


@pytest.mark.parametrize("pool", ["all", "completion"])
def test_repsim_matches_reference(models, tok, cache, queries, pool):
    model = models["llama"]

    def embed(ids, keep=None):
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
        return hidden[keep].mean(0) if keep is not None else hidden.mean(0)

    units = torch.stack([embed(ids) for ids, _ in unit_seqs(cache)]).double()
    keep = [None if pool == "all" else q.labels[0] != -100 for q in queries]
    qs = torch.stack([embed(q.input_ids, k) for q, k in zip(queries, keep, strict=True)])
    got = run("repsim", context(models, tok, cache, batch_size=5), queries, query_pool=pool)
    np.testing.assert_allclose(got, cosine(units, qs.double()), atol=1e-5)


# --- EK-FAC through kronfluence ---------------------------------------------------------------


def test_ekfac_runs_and_ranks_the_duplicate_first(models, tok, cache, queries):
    """Sign check: the unit that repeats the query is the most helpful, with a positive score."""
    ctx = context(models, tok, cache)
    scores = run("ekfac", ctx, queries[:1])
    target = duplicate_unit(cache)
    assert int(scores[0].argmax()) == target
    assert scores[0, target] > 0 and scores[0, target] > 3 * np.median(np.abs(scores[0]))
    assert (cache.root / "kronfluence").is_dir()


def test_ekfac_refuses_models_without_linear_layers(models, tok, cache, queries):
    ctx = context(models, tok, cache, params="regex:embed_tokens")
    with pytest.raises(ConfigError, match="nn.Linear"):
        get_attributor("ekfac").prepare(ctx)


def test_conv1d_conversion_keeps_gpt2_outputs(models, queries):
    model = copy.deepcopy(models["gpt2"])
    assert conv1d_to_linear(model) == 8  # c_attn, c_proj, c_fc, mlp.c_proj in 2 blocks
    with torch.no_grad():
        expected = models["gpt2"](input_ids=queries[1].input_ids).logits
        got = model(input_ids=queries[1].input_ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# --- BGO and UnTrac-Inv through the interface ---------------------------------------------


def _attribute(models, tok, cache, **scoring):
    config = {
        "corpus": {"max_length": CHUNKING.max_length, "stride": 0, "cache_dir": str(cache.root)},
        "perturb": {"optimizer": "adam", "lr": 1e-3, "steps": 2},
        "scoring": scoring,
        "output": {"top_tokens": 0},
    }
    result = attribute(models["llama"], tok, DOCS, queries=QUERIES, config=config)
    table = result.scores.pivot(index="query_id", columns="unit_index", values="score")
    return table.loc[[q.query_id for q in QUERIES]].to_numpy()


def test_bgo_equals_attribute(models, tok, cache, queries):
    """Same engine, cache and batch size as the API: equal to the last bit."""
    got = run("bgo", context(models, tok, cache, batch_size=16), queries, lr=1e-3, steps=2)
    np.testing.assert_allclose(got, _attribute(models, tok, cache), rtol=0, atol=1e-12)


def test_untrac_inv_equals_bgo_ascent(models, tok, cache, queries):
    got = run("untrac-inv", context(models, tok, cache), queries, lr=1e-3, steps=2)
    expected = _attribute(models, tok, cache, score="ascent")  # batch size 16 there, 4 here
    np.testing.assert_allclose(got, expected, rtol=0, atol=5e-6)
    with pytest.raises(ConfigError, match="score='ascent'"):
        get_attributor("untrac-inv", score="bidirectional")


# --- the registry and bad input --------------------------------------------------------------


def test_registry_lists_every_method():
    """The registry and the names the config accepts (and the CLI lists) are the same."""
    from bgotrace.config import METHODS

    assert available_methods() == sorted(METHODS)
    assert len(METHODS) == 11  # bgo + the nine methods of the evaluation issue + bgo-linear


def test_unknown_method_or_option_is_a_config_error(models, tok, cache, queries):
    with pytest.raises(ConfigError) as err:
        get_attributor("tracin")
    assert all(name in str(err.value) for name in available_methods())
    with pytest.raises(ConfigError, match="proj_dim"):
        get_attributor("graddot", projdim=3)
    with pytest.raises(ConfigError, match="query_text"):
        get_attributor("bm25", query_text="prompt")
    with pytest.raises(ConfigError, match="prepare"):
        get_attributor("random").score(queries)
    with pytest.raises(ConfigError, match="unknown method"):
        context(models, tok, cache, options={"bm-25": {}})


def test_context_options_apply_and_constructor_options_win(models, tok, cache, queries):
    ctx = context(models, tok, cache, options={"bm25": {"query_text": "prompt+completion"}})
    method = get_attributor("bm25")
    method.prepare(ctx)
    assert method.opts.query_text == "prompt+completion"
    method = get_attributor("bm25", query_text="completion")
    method.prepare(ctx)
    assert method.opts.query_text == "completion"
