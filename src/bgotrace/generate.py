"""Let a causal LM continue a prompt: the usual way to find a query worth attributing.

A query for attribution is a prompt plus the completion the model produced. This
module makes that completion reproducible: greedy by default, seeded when sampling,
with the prompt encoded exactly as the scorer will encode it (no special tokens; for a
conversation, the chat template with its generation prompt).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from bgotrace.chat import Message, render_ids
from bgotrace.errors import ConfigError, InputError


def generate_completion(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    *,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> str:
    """The text the model appends to ``prompt`` (the prompt itself is not included).

    Generation stops at EOS or after ``max_new_tokens``. Sampling draws from a generator
    seeded with ``seed`` inside a forked RNG state, so the same seed gives the same text
    and the caller's global RNG is left untouched. ``top_k=None`` samples from the whole
    vocabulary.
    """
    if not prompt:
        raise InputError("The prompt is empty: give some text for the model to continue.")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    sampling = _Sampling(max_new_tokens, do_sample, temperature, top_k, seed)
    new = _generate_ids(model, tokenizer, list(ids), sampling, tokenizer.eos_token_id)
    return str(tokenizer.decode(new, skip_special_tokens=True))


def generate_reply(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    *,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> str:
    """The next assistant turn of a conversation, rendered with the tokenizer's chat
    template and its generation prompt exactly as a chat query's prompt is
    (:mod:`bgotrace.chat`); special tokens such as the end of turn are left out."""
    if not messages or messages[-1].role == "assistant":
        raise InputError(
            "The conversation ends with an assistant turn (or is empty), so there is no next "
            "assistant turn to generate: end it with a user turn."
        )
    ids = render_ids(tokenizer, messages, "The conversation", generation_prompt=True)
    sampling = _Sampling(max_new_tokens, do_sample, temperature, top_k, seed)
    new = _generate_ids(model, tokenizer, ids, sampling, _stop_ids(model, tokenizer))
    return str(tokenizer.decode(new, skip_special_tokens=True))


@dataclass(frozen=True)
class _Sampling:
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int | None
    seed: int


def _generate_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    ids: list[int],
    sampling: _Sampling,
    eos: int | list[int] | None,
) -> list[int]:
    """The new token ids the model appends to ``ids``, stopping at ``eos``."""
    max_new_tokens, do_sample, seed = sampling.max_new_tokens, sampling.do_sample, sampling.seed
    _validate(max_new_tokens, sampling.temperature, sampling.top_k)
    device = next(model.parameters()).device
    prompt_ids = torch.tensor([ids], dtype=torch.long)  # (1, T)
    _check_length(model, prompt_ids.shape[1], max_new_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    options: dict[str, object] = {"do_sample": do_sample}
    if do_sample:  # 0 disables top-k
        options.update(temperature=sampling.temperature, top_k=sampling.top_k or 0)
    was_training = model.training
    model.eval()  # dropout would make even greedy decoding random
    rng_devices = []
    if device.type == "cuda":
        rng_devices = [torch.cuda.current_device() if device.index is None else device.index]
    generator: Any = model  # GenerationMixin is not part of PreTrainedModel's static type
    try:
        with torch.random.fork_rng(devices=rng_devices), torch.no_grad():
            torch.manual_seed(seed)
            output = generator.generate(
                input_ids=prompt_ids.to(device),  # (1, T)
                attention_mask=torch.ones_like(prompt_ids).to(device),
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                pad_token_id=pad,
                **options,
            )  # (1, T + new)
    finally:
        model.train(was_training)
    return [int(t) for t in output[0, prompt_ids.shape[1] :]]


def _stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int] | None:
    """EOS of the tokenizer and of the model's generation config (a chat model's end of
    turn, e.g. ``<|eot_id|>``, is often only there)."""
    stops = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    config = getattr(model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    for token in extra if isinstance(extra, list) else [extra]:
        # A default config's id may lie beyond a small tokenizer's vocabulary: not a stop.
        if token is not None and int(token) not in stops and int(token) < len(tokenizer):
            stops.append(int(token))
    return stops or None


def _validate(max_new_tokens: int, temperature: float, top_k: int | None) -> None:
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    if not temperature > 0:
        raise ConfigError(f"temperature must be positive, got {temperature}: use e.g. 1.0.")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k must be at least 1 (or unset for no limit), got {top_k}.")


def _check_length(model: PreTrainedModel, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse prompts the model has no positions for, instead of an index error mid-way."""
    context = getattr(model.config, "n_positions", None) or getattr(
        model.config, "max_position_embeddings", None
    )
    if context is not None and prompt_tokens + max_new_tokens > context:
        raise InputError(
            f"The prompt has {prompt_tokens} tokens; with {max_new_tokens} new tokens that "
            f"exceeds the model's context of {context}: shorten the prompt or lower "
            "--max-new-tokens."
        )
