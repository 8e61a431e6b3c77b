"""``--normalize sensitivity|damped`` against slow loops; the hub diagnostic on hand-made scores.

Tolerance of the gradient-norm checks: the batched ("ghost") norms and the slow reference both
take float32 gradients of the summed token NLL; the reference lets Hugging Face's loss (mean
NLL) backpropagate into the model's .grad one unit at a time and rescales by the token count,
the ghost norms take Gram matrices of a padded batch's activations and output gradients. They
differ by float32 rounding only (measured ≤ 1e-7 relative on the three architectures), so rtol
1e-4 separates right from wrong: a missed parameter, a cross term of the tied embedding, a
position embedding summed over the batch or a padding row counted changes a norm by far more.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from bgotrace.cache import get_token_cache
from bgotrace.config import ScoreConfig
from bgotrace.corpus import ChunkingConfig
from bgotrace.errors import ConfigError
from bgotrace.eval.hubs import hub_counts, hub_diagnostics, mean_spearman
from bgotrace.perturb import ghost_norms, sensitivity
from bgotrace.perturb.sensitivity import (
    cached_sensitivity,
    damped,
    normalize_scores,
    normalized,
    sensitivity_from,
    unit_gradient_norms,
    unit_gradient_norms_loop,
    unit_normalizers,
)
from tests.conftest import make_tiny_tokenizer
from tests.models import tiny_gpt2


@pytest.fixture(scope="module")
def setup():
    tokenizer = make_tiny_tokenizer()
    model = tiny_gpt2(tokenizer, seed=3)
    return model, tokenizer


@pytest.fixture
def cache(setup, tiny_documents, tmp_path):
    _, tokenizer = setup
    return get_token_cache(tiny_documents, tokenizer, ChunkingConfig(max_length=16), tmp_path)


def _slow_norms(model, cache, names):
    """One unit at a time: HF's mean loss × tokens, backpropagated into .grad."""
    out = []
    for i in range(len(cache)):
        model.zero_grad()
        ids = torch.as_tensor(cache.unit_tokens(i).astype(np.int64))[None]
        (model(ids, labels=ids).loss * (ids.shape[1] - 1)).backward()
        params = dict(model.named_parameters())
        out.append(float(torch.sqrt(sum((params[n].grad.double() ** 2).sum() for n in names))))
    model.zero_grad()
    return np.array(out)


def _tiny_neox(tokenizer):
    torch.manual_seed(1)
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return GPTNeoXForCausalLM(config).eval()


def _tiny_llama_padded(tokenizer):
    """Llama whose embedding has a padding row (no gradient) on a token the corpus uses."""
    torch.manual_seed(2)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        pad_token_id=int(tokenizer(" the")["input_ids"][0]),
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


CPU = torch.device("cpu")

ARCHITECTURES = {"gpt2": lambda tok: tiny_gpt2(tok, seed=3), "neox": _tiny_neox}
ARCHITECTURES["llama"] = _tiny_llama_padded


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("selection", ["all", "last"])
def test_batched_gradient_norms_match_a_slow_loop(setup, cache, arch, selection):
    """Ghost norms of padded batches of 4 = the per-unit loop, per architecture adapter."""
    model = ARCHITECTURES[arch](setup[1])
    names = [n for n, _ in model.named_parameters()]
    if selection == "last":  # the last block only (+ nothing tied)
        names = [n for n in names if ".1." in n]
    assert not ghost_norms.plan_for(model, names).uncovered  # no loop hides a wrong ghost
    fast, counts = unit_gradient_norms(model, cache, names, torch.device("cpu"), batch_size=4)
    slow = _slow_norms(model, cache, names)
    np.testing.assert_allclose(fast, slow, rtol=1e-4)
    np.testing.assert_array_equal(counts, cache.lengths - 1)
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_the_loop_is_the_slow_reference(setup, cache):
    model, _ = setup
    names = [n for n, _ in model.named_parameters() if ".h.1." in n]
    loop = unit_gradient_norms_loop(model, cache, names, torch.device("cpu"))
    np.testing.assert_allclose(loop, _slow_norms(model, cache, names), rtol=1e-4)


def test_a_module_the_ghost_norms_do_not_know_falls_back_to_the_loop(setup, cache, monkeypatch):
    model, _ = setup
    names = [n for n, _ in model.named_parameters()]
    real = ghost_norms._kind
    monkeypatch.setattr(
        ghost_norms, "_kind", lambda m: None if "Norm" in type(m).__name__ else real(m)
    )
    assert ghost_norms.plan_for(model, names).uncovered == [n for n in names if "ln_" in n]
    fast, _ = unit_gradient_norms(model, cache, names, torch.device("cpu"), batch_size=3)
    np.testing.assert_allclose(fast, _slow_norms(model, cache, names), rtol=1e-4)


def test_ghost_norms_that_disagree_with_the_loop_are_not_used(setup, cache, monkeypatch):
    """A model using a parameter outside its module would give wrong ghost norms: the check
    on the first two units sees it (simulated by doubling every ghost norm²) and loops."""
    model, _ = setup
    names = [n for n, _ in model.named_parameters()]
    real = sensitivity.batch_squared_norms
    monkeypatch.setattr(sensitivity, "batch_squared_norms", lambda *a: 2 * real(*a))
    fast, _ = unit_gradient_norms(model, cache, names, torch.device("cpu"), batch_size=4)
    np.testing.assert_allclose(fast, _slow_norms(model, cache, names), rtol=1e-4)


def test_damped_divisors_add_a_fraction_of_the_median():
    s = np.array([0.5, 4.0, 10.0, 0.0])  # median of the positive s: 4
    np.testing.assert_allclose(damped(s, 0.25), s + 1.0)
    with pytest.raises(ConfigError, match="normalize-damping"):
        ScoreConfig(normalize="damped", normalize_damping=0.0)


def test_unit_normalizers_follow_the_config(setup, cache):
    model, _ = setup
    names = [n for n, _ in model.named_parameters()]
    cpu = torch.device("cpu")
    assert unit_normalizers(model, cache, names, ScoreConfig(normalize="none"), cpu) is None
    s = unit_normalizers(model, cache, names, ScoreConfig(normalize="sensitivity"), cpu)
    np.testing.assert_allclose(s, _slow_norms(model, cache, names), rtol=1e-4)
    cfg = ScoreConfig(normalize="damped", normalize_damping=0.3, reduce="mean")
    d = unit_normalizers(model, cache, names, cfg, cpu)
    per_token = s / (cache.lengths - 1)
    np.testing.assert_allclose(d, per_token + 0.3 * np.median(per_token), rtol=1e-6)


def test_sensitivity_is_cached_and_reduces_like_the_scores(setup, cache):
    model, _ = setup
    names = [n for n, _ in model.named_parameters()]
    kw = dict(device=torch.device("cpu"))
    s_sum = cached_sensitivity(model, cache, names, reduce="sum", block_units=2, **kw)
    assert [p.suffix for p in (cache.root / "sensitivity").iterdir()] == [".npz"]  # blocks gone
    s_mean = cached_sensitivity(model, cache, names, reduce="mean", **kw)  # from the cache
    np.testing.assert_allclose(s_mean, s_sum / (cache.lengths - 1), rtol=1e-12)
    scores = np.arange(len(cache), dtype=np.float64)[None]
    assert normalized(scores, None) is scores
    np.testing.assert_allclose(normalized(scores, s_sum), scores / s_sum)


def test_a_pass_of_many_blocks_checks_the_ghost_norms_once(setup, cache, monkeypatch):
    """The check against the loop is architectural: one per pass, not one per block."""
    model, _ = setup
    names = [n for n, _ in model.named_parameters()]
    checks = []
    real = sensitivity._ghost_agrees
    monkeypatch.setattr(sensitivity, "_ghost_agrees", lambda *a: checks.append(1) or real(*a))
    s = cached_sensitivity(model, cache, names, reduce="sum", block_units=2, device=CPU)
    assert len(cache) > 4 and len(checks) == 1  # ≥ 3 blocks of 2 units
    np.testing.assert_allclose(s, _slow_norms(model, cache, names), rtol=1e-4)


def test_ghost_norms_found_wrong_on_the_first_block_are_used_on_none(
    setup, cache, monkeypatch, caplog
):
    """The first block's verdict holds for every block: all of them take the loop, and the
    pass says so once."""
    model, _ = setup
    names = [n for n, _ in model.named_parameters()]
    real = sensitivity.batch_squared_norms
    monkeypatch.setattr(sensitivity, "batch_squared_norms", lambda *a: 2 * real(*a))
    with caplog.at_level("WARNING", logger=sensitivity.__name__):
        s = cached_sensitivity(model, cache, names, reduce="sum", block_units=2, device=CPU)
    np.testing.assert_allclose(s, _slow_norms(model, cache, names), rtol=1e-4)
    said = [r for r in caplog.records if "one unit at a time" in r.getMessage()]
    assert len(said) == 1


def test_the_normaliser_shows_one_progress_bar_for_all_its_blocks(setup, cache, monkeypatch):
    """One bar over the units computed, not a bar (or three) per block of units."""
    from contextlib import contextmanager

    model, _ = setup
    names = [n for n, _ in model.named_parameters()]
    bars: list[list] = []

    @contextmanager
    def recorded(description, total, enabled=True):
        bars.append([description, total, 0] if enabled else None)
        yield lambda n, status="": bars[-1].__setitem__(2, bars[-1][2] + n)

    monkeypatch.setattr(sensitivity, "progress_task", recorded)
    cached_sensitivity(model, cache, names, reduce="sum", block_units=2, device=CPU)
    assert bars == [["Normaliser (gradient norms)", len(cache), len(cache)]]
    cached_sensitivity(model, cache, names, reduce="sum", block_units=2, device=CPU)
    assert bars[1] is None  # from the store: nothing to compute, no bar


def test_sensitivity_units_and_floor():
    norms = np.array([6.0, 0.0])
    np.testing.assert_allclose(sensitivity_from(norms, np.array([3, 1]), "mean"), [2.0, 0.0])
    np.testing.assert_allclose(sensitivity_from(norms, np.array([3, 1]), "sum"), norms)
    scaled = normalize_scores(np.array([[1.0, 1.0]]), np.array([2.0, 0.0]))
    np.testing.assert_allclose(scaled, [[0.5, 1.0 / (1e-3 * 2.0)]])  # zero floored


def test_hub_counts_count_each_group_once():
    scores = np.array(
        [
            [9.0, 1.0, 0.0, 5.0],  # group a
            [9.0, 0.0, 1.0, 5.0],  # group a again: unit 0 counts once for a
            [9.0, 5.0, 0.0, 0.0],  # group b
        ]
    )
    counts = hub_counts(scores, ["a", "a", "b"], k=1)
    np.testing.assert_array_equal(counts, [2, 0, 0, 0])
    diag = hub_diagnostics(
        scores, ["a", "a", "b"], np.array([1, 2, 3, 4]), np.array([4, 3, 2, 1]), k=1, share=1.0
    )
    assert diag["hub_share"] == 1.0 and diag["hub_units"] == 1.0


def test_hub_correlations():
    lengths = np.array([1.0, 2.0, 3.0, 4.0])
    assert mean_spearman(np.array([[1.0, 2.0, 3.0, 4.0]]), lengths) == pytest.approx(1.0)
    assert mean_spearman(np.array([[4.0, 3.0, 2.0, 1.0]]), lengths) == pytest.approx(-1.0)
    assert np.isnan(mean_spearman(np.array([[1.0, 1.0, 1.0, 1.0]]), lengths))


def test_normalized_scores_are_raw_scores_over_slow_gradient_norms(setup, tiny_documents, tmp_path):
    """End to end: sensitivity ranks by raw BGO score / ‖∇L(z)‖ of the slow loop, the default
    (damped) by raw score / (‖∇L(z)‖ + λ·median) (rtol 1e-4)."""
    import bgotrace

    model, tokenizer = setup

    def run(normalize: str):
        cfg = {
            "corpus": {"max_length": 16, "cache_dir": str(tmp_path / "cache")},
            "perturb": {"steps": 2},
            "scoring": {"normalize": normalize},
        }
        result = bgotrace.attribute(
            model, tokenizer, tiny_documents, prompt="Paris is the capital of",
            completion=" France.", config=cfg,
        )  # fmt: skip
        for row in result.top_tokens:  # token changes (nats) add up to the unit's raw change
            # float32 per-token losses of a unit alone vs in a batch, 6 decimals kept: 1e-4 nats
            assert sum(row["token_scores"]) == pytest.approx(
                row["score"] * row["normalizer"], abs=1e-4
            )
        assert {r["normalizer"] == 1.0 for r in result.top_tokens} == {normalize == "none"}
        return result.scores.sort_values("unit_index")["score"].to_numpy()

    raw, default = run("none"), run("sensitivity")
    cache = get_token_cache(tiny_documents, tokenizer, ChunkingConfig(16), tmp_path / "cache")
    slow = _slow_norms(model, cache, [n for n, _ in model.named_parameters()])
    np.testing.assert_allclose(default, raw / slow, rtol=1e-4)
    assert bgotrace.config.ScoreConfig().normalize == "damped"  # the shipped default
    lam = bgotrace.config.ScoreConfig().normalize_damping  # --normalize damped, default λ
    np.testing.assert_allclose(run("damped"), raw / (slow + lam * np.median(slow)), rtol=1e-4)


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_moe_blocks_ghost_norms_match_the_loop(setup, cache, arch):
    """MoE blocks run their routers and shared experts on flattened tokens (B·T, D): the
    ghost norms view them per unit again; what they do not cover comes from the loop."""
    from tests.test_split_forward import build

    model = build(arch, vocab=len(setup[1]))
    names = [n for n, _ in model.named_parameters() if ".layers.2." in n]
    uncovered = ghost_norms.plan_for(model, names).uncovered
    # only the fused experts (3-D tensors) and routers that are no nn.Linear use the loop
    assert uncovered and all(".experts." in n or ".mlp.gate." in n for n in uncovered)
    fast, _ = unit_gradient_norms(model, cache, names, torch.device("cpu"), batch_size=4)
    np.testing.assert_allclose(fast, _slow_norms(model, cache, names), rtol=1e-4)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_bfloat16_ghost_norms_match_a_float32_loop(setup, cache, arch, monkeypatch):
    """A bfloat16 model's ghost norms (inputs and output gradients kept in bfloat16, upcast a
    chunk of units at a time) against the float32 loop on the same weights. Tolerance: every
    weight, activation and gradient of the bfloat16 pass is rounded to 8 significant bits
    (2^-9 ≈ 0.2% each); measured ≤ 0.6% on the three adapters, so rtol 2e-2, while a missed
    parameter, cross term or padding row moves a norm by far more. A budget of 1,000
    elements forces one-unit chunks, which must equal one chunk of the whole batch."""
    model = ARCHITECTURES[arch](setup[1])
    names = [n for n, _ in model.named_parameters()]
    slow = _slow_norms(model, cache, names)
    half = model.to(torch.bfloat16)
    plan, cpu, every = ghost_norms.plan_for(half, names), torch.device("cpu"), np.arange(len(cache))
    whole = sensitivity._ghost_squares(half, cache, names, plan, cpu, every, 4)
    monkeypatch.setattr(ghost_norms, "UPCAST_ELEMENTS", 1000)
    chunked = sensitivity._ghost_squares(half, cache, names, plan, cpu, every, 4)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5)  # float32 sums in another order
    np.testing.assert_allclose(np.sqrt(chunked), slow, rtol=2e-2)
