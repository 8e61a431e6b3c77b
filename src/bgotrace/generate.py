"""Let a causal LM continue a prompt: the usual way to find a query worth attributing.

A query for attribution is a prompt plus the completion the model produced. This
module makes that completion reproducible: greedy by default, seeded when sampling,
with the prompt encoded exactly as the scorer will encode it (no special tokens).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

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
    _validate(prompt, max_new_tokens, temperature, top_k)
    device = next(model.parameters()).device
    prompt_ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    _check_length(model, prompt_ids.shape[1], max_new_tokens)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    options: dict[str, object] = {"do_sample": do_sample}
    if do_sample:
        options.update(temperature=temperature, top_k=top_k or 0)  # 0 disables top-k
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
    return str(tokenizer.decode(output[0, prompt_ids.shape[1] :], skip_special_tokens=True))


def _validate(prompt: str, max_new_tokens: int, temperature: float, top_k: int | None) -> None:
    if not prompt:
        raise InputError("The prompt is empty: give some text for the model to continue.")
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
