"""Whether text is encoded with a BOS token in front, as the model saw it in training.

Llama-family tokenizers add ``<s>`` (or ``<|begin_of_text|>``) when asked for special
tokens, and their models were trained with it at position 0; GPT-2-style tokenizers add
nothing. Queries and units are tokenized piecewise with ``add_special_tokens=False`` (the
prompt and completion separately, documents in windows), so the BOS must be put back by
hand, or a Llama model sees every text out of distribution and every loss is distorted.

``--bos`` modes:

- ``auto`` (default): prepend the tokenizer's BOS exactly when the tokenizer itself adds one
  at the start of an encoded text (checked on a probe string);
- ``always``: prepend ``bos_token`` (an error if the tokenizer has none);
- ``never``: prepend nothing (what bgotrace did before ``--bos`` existed).

The BOS sits at position 0, which is never a prediction target, so it changes the context of
every scored token and no loss is taken on it.

Chat queries (``bgotrace.chat``) are the exception: their chat template decides the special
tokens, as ``apply_chat_template`` encodes them; :func:`would_double_bos` flags a template
that writes the BOS itself for a tokenizer that adds one too.
"""

from __future__ import annotations

from typing import Any

from bgotrace.errors import ConfigError

BOS_MODES = ("auto", "always", "never")
_PROBE = "Hello world"


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether encoding with special tokens puts ``bos_token_id`` in front of the text."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    plain = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    special = tokenizer(_PROBE, add_special_tokens=True)["input_ids"]
    return len(special) > len(plain) and special[0] == bos and special[1:][: len(plain)] == plain


def resolve_bos(tokenizer: Any, mode: str) -> int | None:
    """The token id to prepend to every query and unit under ``mode`` (None: nothing)."""
    if mode not in BOS_MODES:
        raise ConfigError(f"--bos={mode!r} is unknown: use one of {', '.join(BOS_MODES)}.")
    if mode == "never":
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if mode == "always":
        if bos is None:
            raise ConfigError(
                "--bos always, but the tokenizer has no bos_token: use --bos auto or never."
            )
        return int(bos)
    if bos is None or not tokenizer_adds_bos(tokenizer):
        return None
    return int(bos)


def would_double_bos(tokenizer: Any, rendered: str) -> bool:
    """Whether a chat-rendered text already starts with the BOS string and the tokenizer
    would add another in front when asked for special tokens.

    Chat queries take their special tokens from the template (no ``--bos`` on top), as
    ``apply_chat_template`` encodes them; a trainer that tokenized the rendered text with
    special tokens fed the model two BOS, which is worth a warning.
    """
    bos = getattr(tokenizer, "bos_token", None)
    return isinstance(bos, str) and rendered.startswith(bos) and tokenizer_adds_bos(tokenizer)
