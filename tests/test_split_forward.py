"""The shared-trunk forward path gives the full forward's losses, per architecture.

Tolerance: float32. The split path runs the same modules in the same order on the same
tensors, so on CPU it agrees to the last bit in practice; the stated bound, atol 1e-5 nats
per token (1e-4 per unit sum of ≤ 16 tokens), leaves room for kernels that pick another
reduction order per shape. A wrong mask, a missing rotary table or a dropped block moves
losses by > 1e-2 here.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)

import bgotrace
from bgotrace.config import PerturbConfig
from bgotrace.corpus import Document
from bgotrace.errors import RunDirectoryError
from bgotrace.modeling import split as split_mod
from bgotrace.modeling.bind import bind, swapped
from bgotrace.modeling.losses import forward_logits, head_token_losses, token_losses
from bgotrace.modeling.split import split_block, state_token_losses, trunk
from bgotrace.perturb.steps import ASCENT, perturb
from bgotrace.query import Query, encode_query
from bgotrace.score.resume import check_split
from bgotrace.score.store import RunStore
from bgotrace.score.sweep import unit_loss_sums
from tests.conftest import make_tiny_tokenizer

ATOL = 1e-5
V, LAYERS = 97, 3
_LLAMA_LIKE = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


def _gpt2(attn: str, vocab: int) -> torch.nn.Module:
    cfg = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=LAYERS, n_head=2)
    return GPT2LMHeadModel._from_config(cfg, attn_implementation=attn)


def _neox(attn: str, vocab: int) -> torch.nn.Module:
    cfg = GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        max_position_embeddings=64,
    )
    return GPTNeoXForCausalLM._from_config(cfg, attn_implementation=attn)


def _llama(attn: str, vocab: int) -> torch.nn.Module:
    cfg = LlamaConfig(vocab_size=vocab, **_LLAMA_LIKE)
    return LlamaForCausalLM._from_config(cfg, attn_implementation=attn)


def _mistral(attn: str, vocab: int) -> torch.nn.Module:  # window 4 < length: the mask matters
    cfg = MistralConfig(vocab_size=vocab, **_LLAMA_LIKE, sliding_window=4)
    return MistralForCausalLM._from_config(cfg, attn_implementation=attn)


def _qwen2(attn: str, vocab: int) -> torch.nn.Module:  # layer 0 full attention, 1-2 sliding
    cfg = Qwen2Config(
        vocab_size=vocab, **_LLAMA_LIKE, use_sliding_window=True, sliding_window=4,
        max_window_layers=1,
    )  # fmt: skip
    return Qwen2ForCausalLM._from_config(cfg, attn_implementation=attn)


def _mixtral(attn: str, vocab: int) -> torch.nn.Module:  # 4 experts, 2 per token, windowed
    cfg = MixtralConfig(
        vocab_size=vocab, **_LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=4,
    )  # fmt: skip
    return MixtralForCausalLM._from_config(cfg, attn_implementation=attn)


def _qwen2_moe(attn: str, vocab: int) -> torch.nn.Module:  # routed + shared expert
    cfg = Qwen2MoeConfig(
        vocab_size=vocab, **_LLAMA_LIKE, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=16, shared_expert_intermediate_size=32, decoder_sparse_step=1,
    )  # fmt: skip
    return Qwen2MoeForCausalLM._from_config(cfg, attn_implementation=attn)


def _olmoe(attn: str, vocab: int) -> torch.nn.Module:  # q/k norms, 4 experts
    cfg = OlmoeConfig(
        vocab_size=vocab, **_LLAMA_LIKE, num_experts=4, num_experts_per_tok=2,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return OlmoeForCausalLM._from_config(cfg, attn_implementation=attn)


ARCHS = {
    "gpt2": _gpt2, "gpt_neox": _neox, "llama": _llama, "mistral": _mistral, "qwen2": _qwen2,
    "mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "olmoe": _olmoe,
}  # fmt: skip
"""Tiny models of every architecture with a split adapter (MoE families included)."""


def build(arch: str, attn: str = "sdpa", vocab: int = V) -> torch.nn.Module:
    torch.manual_seed(0)
    return ARCHS[arch](attn, vocab).eval()


def padded_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three right-padded rows of lengths 12, 7 and 3: input_ids, attention_mask, labels."""
    ids = torch.randint(0, V, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 7:], mask[2, 3:] = 0, 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def block_names(model: torch.nn.Module, first: int) -> list[str]:
    """Parameters of blocks >= first, found by the block index in their names."""
    return [
        n
        for n, _ in model.named_parameters()
        if any(f".{b}." in n for b in range(first, LAYERS)) and "embed" not in n
    ]


def nudged(model: torch.nn.Module, names: list[str], scale: float = 0.05) -> dict:
    gen = torch.Generator().manual_seed(2)
    params = dict(model.named_parameters())
    return {
        n: params[n].detach() + scale * torch.randn(params[n].shape, generator=gen) for n in names
    }


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("start", [0, 1, LAYERS - 1])
def test_split_token_losses_equal_full_forward(arch, attn, start):
    model = build(arch, attn)
    ids, mask, labels = padded_batch()
    names = block_names(model, start)
    assert split_block(model, names) == start
    with torch.no_grad():
        shared = trunk(model, ids, mask, start)
        for overrides in (None, nudged(model, names)):
            full = token_losses(forward_logits(model, ids, mask, overrides), labels)
            split = state_token_losses(model, shared, overrides, labels)
            torch.testing.assert_close(split, full, atol=ATOL, rtol=0)
    # and the nudge was big enough to matter: a split that ignored overrides would fail
    with torch.no_grad():
        base = state_token_losses(model, shared, None, labels)
        moved = state_token_losses(model, shared, nudged(model, names), labels)
    assert (moved - base).abs().max() > 1e-2


def slow_unit_sums(model, units, states) -> np.ndarray:
    """One unit at a time, no padding, full forward: the obvious reference."""
    rows = []
    for overrides in states:
        row = []
        for i in range(len(units.lengths)):
            ids = torch.from_numpy(units.unit_tokens(i).astype(np.int64))[None]
            row.append(float(token_losses(forward_logits(model, ids, None, overrides), ids).sum()))
        rows.append(row)
    return np.array(rows)


class ListUnits:
    """A TokenSource over a list of token arrays."""

    def __init__(self, seqs: list[np.ndarray]) -> None:
        self.seqs = seqs

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(s) for s in self.seqs])

    def unit_tokens(self, i: int) -> np.ndarray:
        return self.seqs[i]


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("batch_size", [1, 4])
def test_unit_sums_with_shared_trunk_match_slow_reference(arch, batch_size):
    model = build(arch)
    rng = np.random.default_rng(0)
    units = ListUnits([rng.integers(0, V, size=int(n)) for n in rng.integers(2, 16, size=9)])
    names = block_names(model, LAYERS - 1)
    states = [None, nudged(model, names), nudged(model, names, scale=-0.05)]
    with torch.no_grad():
        want = slow_unit_sums(model, units, states)
    got, counts = unit_loss_sums(
        model,
        units,
        np.arange(9),
        states,
        batch_size=batch_size,
        pad_id=0,
        device=torch.device("cpu"),
    )
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(counts, units.lengths - 1)


@pytest.mark.parametrize("where", ["split", "full"])
def test_sweep_window_runs_each_state_over_the_window_and_keeps_every_sum(where, monkeypatch):
    """State by state over a window of batches (for the cache: see score.sweep) gives the same
    sums, bit for bit, as batch by batch; and the order really is state-major."""
    from bgotrace.score import sweep as sweep_mod

    model = build("gpt2")
    rng = np.random.default_rng(3)
    units = ListUnits([rng.integers(0, V, size=int(n)) for n in rng.integers(2, 16, size=11)])
    names = block_names(model, LAYERS - 1) if where == "split" else [
        n for n, _ in model.named_parameters()]  # fmt: skip
    states = [None, nudged(model, names), nudged(model, names, scale=-0.05)]
    calls: list[tuple[int, int]] = []
    real = sweep_mod.bound_token_losses

    def spy(model_, shared, bound, labels, kept):
        calls.append((id(bound), id(shared)))
        return real(model_, shared, bound, labels, kept)

    monkeypatch.setattr(sweep_mod, "bound_token_losses", spy)
    got = {}
    for window in (0, 10_000):
        calls.clear()
        got[window], _ = unit_loss_sums(model, units, np.arange(11), states, batch_size=3,
                                        pad_id=0, device=torch.device("cpu"),
                                        window_tokens=window)  # fmt: skip
        order = [s for s, _ in calls]
        changes = sum(a != b for a, b in itertools.pairwise(order))
        # 4 batches × 3 states: batch-major switches state on every call but one per batch,
        # state-major (one window) only twice
        assert changes == (2 if window else 4 * 3 - 1), (window, changes)
    np.testing.assert_array_equal(got[0], got[10_000])
    with torch.no_grad():
        np.testing.assert_allclose(got[10_000], slow_unit_sums(model, units, states), atol=1e-4)


def test_perturbation_outside_the_blocks_runs_the_full_forward(caplog):
    model = build("gpt2")
    names = ["transformer.ln_f.weight", *block_names(model, 2)]
    with caplog.at_level(logging.INFO, logger="bgotrace.modeling.split"):
        split_mod._logged.clear()
        assert split_block(model, names) is None
        assert split_block(model, ["transformer.wte.weight"]) is None  # tied to the LM head
    assert "transformer.ln_f.weight, outside the blocks" in caplog.text


def test_model_without_adapter_falls_back_to_the_full_forward(caplog):
    torch.manual_seed(0)
    cfg = OPTConfig(
        vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=64, word_embed_proj_dim=32,
    )  # fmt: skip
    model = OPTForCausalLM(cfg).eval()
    names = [n for n, _ in model.named_parameters() if ".layers.1." in n]
    with caplog.at_level(logging.INFO, logger="bgotrace.modeling.split"):
        split_mod._logged.clear()
        assert split_block(model, names) is None
    assert "no split adapter for OPTForCausalLM" in caplog.text
    ids, mask, labels = padded_batch()
    with torch.no_grad():
        got = state_token_losses(model, trunk(model, ids, mask, None), nudged(model, names), labels)
        want = token_losses(forward_logits(model, ids, mask, nudged(model, names)), labels)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_perturbation_through_the_split_equals_full_forward_steps(arch, monkeypatch):
    tok = make_tiny_tokenizer()
    model = build(arch, vocab=len(tok))
    q = encode_query(Query("q", "Paris is the capital of", " France."), tok, 64)
    names = block_names(model, LAYERS - 1)
    cfg = PerturbConfig(optimizer="adam", lr=1e-2, steps=3)
    split = perturb(model, q, names, cfg, ASCENT, n_units=10)
    monkeypatch.setattr("bgotrace.perturb.steps.split_block", lambda m, n: None)
    full = perturb(model, q, names, cfg, ASCENT, n_units=10)
    np.testing.assert_allclose(split.loss_trajectory, full.loss_trajectory, atol=ATOL, rtol=0)
    assert split.loss_trajectory[-1] > split.loss_trajectory[0] + 1e-2  # it did move
    for n in names:
        torch.testing.assert_close(split.params[n], full.params[n], atol=1e-6, rtol=0)


def test_resume_refuses_a_different_split(tmp_path):
    store = RunStore.open(tmp_path / "run", overwrite=False, resume=False)
    check_split(store, 2)
    check_split(store, 2)  # the same split resumes
    with pytest.raises(RunDirectoryError, match="sweep_split"):
        check_split(store, None)


# --- end to end through the pipeline ---------------------------------------------------------

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France, Berlin of Germany.",
    "Rome is the capital of Italy and Madrid of Spain.",
    "Water boils at one hundred degrees and ice melts at zero.",
    "Rivers carry sand to the sea, mountains rise slowly.",
    "A language model predicts the next token from the tokens before it.",
]
DOCS = [Document(f"d{i}", t, f"s{i % 2}") for i, t in enumerate(TEXTS)]
QUERIES = [
    Query("capital", "Paris is the capital of", " France."),
    Query("fox", "The quick", " fox."),
]


def attribute(model, tok, tmp_path, **scoring):
    config = {
        "corpus": {"max_length": 10, "stride": 2, "cache_dir": str(tmp_path / "c")},
        "perturb": {"optimizer": "adam", "lr": 3e-3, "steps": 2, "params": "last:1"},
        "scoring": {"reduce": "sum", "normalize": "none", **scoring},
        "output": {"top_tokens": 3},
    }
    return bgotrace.attribute(model, tok, DOCS, queries=QUERIES, config=config)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_split_pipeline_scores_equal_full_forward_pipeline(
    arch, tok, tmp_path, monkeypatch, caplog
):
    model = build(arch, vocab=len(tok))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    split_mod._logged.clear()
    with caplog.at_level(logging.INFO, logger="bgotrace.modeling.split"):
        split = attribute(model, tok, tmp_path, batch_size=4, block_units=3)
    assert f"sweep split at block {LAYERS - 1}" in caplog.text  # last:1 of 3 blocks
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n  # base model bit-identical afterwards
    for row in split.top_tokens:  # top-token changes still sum to unit scores
        assert sum(row["token_scores"]) == pytest.approx(row["score"], abs=1e-4)
    other = attribute(model, tok, tmp_path, batch_size=1, block_units=100)
    monkeypatch.setattr("bgotrace.score.sweep.split_block", lambda m, n: None)
    monkeypatch.setattr("bgotrace.perturb.steps.split_block", lambda m, n: None)
    full = attribute(model, tok, tmp_path, batch_size=4, block_units=3)
    a = split.scores.sort_values(["query_id", "unit_id"])["score"].to_numpy()
    for b in (other, full):  # batch and block size invariance, and the full forward's scores
        np.testing.assert_allclose(
            a, b.scores.sort_values(["query_id", "unit_id"])["score"].to_numpy(), atol=1e-4
        )
    assert np.abs(a).max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_rows", [1, 5, 256])
def test_chunked_head_losses_equal_full_logits_losses(dtype, chunk_rows):
    """The chunked head is the same loss: per chunk the same matmul in the sweep dtype and the
    same float32 cross-entropy, so float32 and bfloat16 agree with the full logits to 1e-5."""
    torch.manual_seed(0)
    head_layer = torch.nn.Linear(32, V, bias=False).to(dtype)
    hidden = torch.randn(3, 12, 32).to(dtype)
    _, _, labels = padded_batch()
    want = token_losses(head_layer(hidden), labels)
    got = head_token_losses(hidden, head_layer, labels, chunk_rows=chunk_rows)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert (got[labels[:, 1:] == -100] == 0).all()


def test_bind_shares_weights_keeps_ties_and_never_writes_the_model():
    model = build("gpt2")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    new = {"transformer.wte.weight": torch.zeros_like(model.transformer.wte.weight)}
    bound = bind(model, new)
    assert bound.lm_head.weight is bound.transformer.wte.weight  # the tie survives
    assert bound.transformer.h[0].attn.c_attn.weight is model.transformer.h[0].attn.c_attn.weight
    ids, mask, labels = padded_batch()
    with torch.no_grad():
        want = token_losses(forward_logits(model, ids, mask, new), labels)
        got = token_losses(forward_logits(bound, ids, mask), labels)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    with pytest.raises(KeyError, match="no parameter"):
        bind(model, {"nope.weight": torch.zeros(1)})


def test_swapped_runs_the_values_keeps_ties_and_restores_the_entries():
    """``swapped``: inside, the model computes with the values (equal to functional_call bit
    for bit), every entry of a tied parameter swapped together and gradients flowing to the
    values only; outside, the same parameter objects as before, no tensor written, also
    when the body raises."""
    model = build("gpt2")
    entries = dict(model.named_parameters(remove_duplicate=False))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    wte = model.transformer.wte.weight
    value = torch.nn.Parameter(wte.detach() + 0.01)
    ids, mask, labels = padded_batch()
    with torch.no_grad():
        want = token_losses(forward_logits(model, ids, mask, {"transformer.wte.weight": value}),
                            labels)  # fmt: skip
    with swapped(model, {"transformer.wte.weight": value}):
        assert model.lm_head.weight is value and model.transformer.wte.weight is value
        loss = token_losses(forward_logits(model, ids, mask), labels)
        (grad,) = torch.autograd.grad(loss.sum(), [value])
    torch.testing.assert_close(loss.detach(), want, atol=0, rtol=0)
    assert grad.abs().sum() > 0
    assert all(p is entries[n] for n, p in model.named_parameters(remove_duplicate=False))
    with (
        pytest.raises(RuntimeError, match="boom"),
        swapped(model, {"transformer.wte.weight": value}),
    ):
        raise RuntimeError("boom")
    assert model.lm_head.weight is wte and model.transformer.wte.weight is wte
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    with pytest.raises(KeyError, match="no parameter"), swapped(model, {"nope.weight": value}):
        pass
