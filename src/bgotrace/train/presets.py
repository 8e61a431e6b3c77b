"""Named sizes of the small causal LMs that bgotrace trains from scratch.

Attribution methods are checked on models whose training data is known exactly, so
bgotrace trains them itself. A preset fixes the shape of such a model (architecture,
depth, width, heads, vocabulary, context); :func:`build_model` turns it into a freshly
initialised Hugging Face model from a config written in code, so nothing is fetched
from a hub and the saved result loads with ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from bgotrace.errors import ConfigError

ARCHS = ("gpt2", "llama")


@dataclass(frozen=True)
class ModelPreset:
    """The shape of a small causal LM trained from scratch."""

    name: str
    """Registry name, recorded in ``train_config.json`` so a run says what it trained."""
    n_layer: int
    """Number of transformer blocks."""
    d_model: int
    """Hidden width; must be divisible by ``n_head``."""
    n_head: int
    """Attention heads per block."""
    vocab_size: int
    """Target size of the BPE vocabulary trained for this preset (special token included)."""
    context_length: int
    """Positions the model supports; units used for training may not be longer."""
    arch: str = "gpt2"
    """``gpt2`` (learned positions, LayerNorm, GELU) or ``llama`` (RoPE, RMSNorm, SwiGLU)."""
    dropout: float = 0.0
    """GPT-2 residual, embedding and attention dropout. Zero by default: these models
    are meant to memorise their corpus, and zero keeps training order-only random.
    Llama models always use zero."""

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(
                f"Preset {self.name!r} has unknown arch {self.arch!r}: use one of {ARCHS}."
            )
        for field in ("n_layer", "d_model", "n_head", "vocab_size", "context_length"):
            if getattr(self, field) < 1:
                raise ConfigError(f"Preset {self.name!r}: {field} must be at least 1.")
        if self.d_model % self.n_head:
            raise ConfigError(
                f"Preset {self.name!r}: d_model {self.d_model} is not divisible by "
                f"n_head {self.n_head}: pick a head count that divides the width."
            )
        if self.vocab_size < 257:
            raise ConfigError(
                f"Preset {self.name!r}: vocab_size {self.vocab_size} is below 257, the 256 "
                "byte tokens plus <|endoftext|>: use a larger vocabulary."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"Preset {self.name!r}: dropout must be in [0, 1).")

    def with_arch(self, arch: str | None) -> ModelPreset:
        """The same shape in another architecture (``None`` keeps this one)."""
        return self if arch is None or arch == self.arch else replace(self, arch=arch)


PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        # Unit tests: a forward/backward pass takes milliseconds.
        ModelPreset("test", n_layer=2, d_model=32, n_head=2, vocab_size=512, context_length=128),
        # Quick experiments: trains on a few hundred KB of text in a minute on a laptop CPU.
        ModelPreset("tiny", n_layer=2, d_model=64, n_head=4, vocab_size=1024, context_length=128),
        # The shipped demo model (2.7 MB): memorises ~60 KB of short entries in < 3 CPU minutes.
        ModelPreset("demo", n_layer=2, d_model=128, n_head=4, vocab_size=2048, context_length=128),
        # Benchmarks on CPU: still minutes per epoch on a few MB of text.
        ModelPreset("small", n_layer=4, d_model=128, n_head=4, vocab_size=4096, context_length=256),
    )
}


def get_preset(name: str, arch: str | None = None) -> ModelPreset:
    """Look up a preset by name, optionally switching its architecture."""
    if name not in PRESETS:
        raise ConfigError(f"Unknown model preset {name!r}: use one of {', '.join(PRESETS)}.")
    return PRESETS[name].with_arch(arch)


def _swiglu_width(d_model: int) -> int:
    """Llama MLP width with about the parameters of GPT-2's 4x MLP (8/3 x, multiple of 16)."""
    return 16 * math.ceil(8 * d_model / 3 / 16)


def build_model(preset: ModelPreset, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A freshly initialised causal LM of this shape, sized to the tokenizer's vocabulary.

    The embedding matrix has ``len(tokenizer)`` rows rather than ``preset.vocab_size``:
    a BPE trainer stops early on a small corpus, and unused rows would only add noise to
    the gradients that attribution methods inspect. Input and output embeddings are tied.
    Initialisation draws from torch's global generator, so seed it first.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("The tokenizer has no EOS token: give it one (e.g. <|endoftext|>).")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    ids = {"vocab_size": len(tokenizer), "bos_token_id": bos, "eos_token_id": eos}
    if preset.arch == "gpt2":
        gpt2 = GPT2Config(
            n_layer=preset.n_layer,
            n_embd=preset.d_model,
            n_head=preset.n_head,
            n_positions=preset.context_length,
            resid_pdrop=preset.dropout,
            embd_pdrop=preset.dropout,
            attn_pdrop=preset.dropout,
            tie_word_embeddings=True,
            pad_token_id=pad,
            **ids,
        )
        return GPT2LMHeadModel(gpt2)
    llama = LlamaConfig(
        num_hidden_layers=preset.n_layer,
        hidden_size=preset.d_model,
        num_attention_heads=preset.n_head,
        num_key_value_heads=preset.n_head,
        intermediate_size=_swiglu_width(preset.d_model),
        max_position_embeddings=preset.context_length,
        attention_dropout=0.0,
        tie_word_embeddings=True,
        pad_token_id=pad,
        **ids,
    )
    return LlamaForCausalLM(llama)
