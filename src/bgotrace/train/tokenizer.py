"""Byte-level BPE tokenizers trained on the corpus a known-data model learns from.

A tokenizer trained on the same documents keeps sequences short, so a tiny model
memorises more text per parameter. Byte-level BPE never meets an unknown character,
and its offsets (with ``trim_offsets``) map every token back to a character span, which
the corpus chunker needs to report units as spans of the original text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from bgotrace.errors import ConfigError, InputError

SPECIAL_TOKEN = "<|endoftext|>"
"""The single special token: end of document, and stand-in for BOS, padding and UNK."""


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a GPT-2-style byte-level BPE tokenizer on ``texts``.

    ``vocab_size`` counts the 256 byte tokens and ``<|endoftext|>``; on a small corpus
    the trainer may stop below it when no pair occurs ``min_frequency`` times. Training
    is deterministic for the same texts in the same order.
    """
    if vocab_size < 257:
        raise ConfigError(
            f"vocab_size {vocab_size} is below 257 (256 bytes + {SPECIAL_TOKEN}): raise it."
        )
    if min_frequency < 1:
        raise ConfigError("min_frequency must be at least 1.")
    corpus = [t for t in texts if t]
    if not corpus:
        raise InputError("Cannot train a tokenizer on no text: give at least one non-empty text.")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets: a token " cat" maps to the characters of "cat", not the space before.
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[SPECIAL_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    return wrap_tokenizer(tok)


def wrap_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a raw ``tokenizers`` object so ``save_pretrained``/``AutoTokenizer`` work.

    No BOS is prepended when encoding: documents are chunked into units of raw text
    tokens, each document closed by EOS, exactly as GPT-2 was trained.
    """
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKEN,
        eos_token=SPECIAL_TOKEN,
        pad_token=SPECIAL_TOKEN,
        unk_token=SPECIAL_TOKEN,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
    """``save_pretrained``, naming the class so that transformers 4 and 5 both load it.

    transformers 5 records a tokenizer built from a ``tokenizers`` object as
    ``TokenizersBackend``, a name transformers 4 does not know; both read the older name
    ``PreTrainedTokenizerFast``, so that is written instead.
    """
    tokenizer.save_pretrained(directory)
    path = Path(directory) / "tokenizer_config.json"
    if path.is_file():
        settings = json.loads(path.read_text())
        if settings.get("tokenizer_class") == "TokenizersBackend":
            settings["tokenizer_class"] = "PreTrainedTokenizerFast"
            path.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
