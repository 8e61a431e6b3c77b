"""Cut tokenized documents into units: the windows a model trains on and the scorer ranks.

A document of ``n`` tokens (EOS included) becomes windows ``[s_k, min(s_k + L, n))`` with
``s_k = k * (L - stride)``, stopping at the first window that reaches the end. Consecutive
windows of a document therefore overlap by exactly ``stride`` tokens, and no window lies fully
inside the one before it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from bgotrace.corpus.documents import Document
from bgotrace.errors import ConfigError, InputError

MIN_UNIT_TOKENS = 2
"""A unit needs one token of context and one to predict; shorter ones are dropped."""

TOKENIZE_BATCH_DOCS = 256
"""Documents per tokenizer call: fast tokenizers parallelise within a batch."""


@dataclass(frozen=True)
class ChunkingConfig:
    """How documents are cut into units."""

    max_length: int = 256
    """Tokens per unit at most (EOS included); at least 2."""
    stride: int = 0
    """Tokens of overlap between consecutive units of a document; 0 <= stride < max_length."""
    append_eos: bool = True
    """Append the tokenizer's EOS after each document's last token (if it has one)."""
    bos_id: int | None = None
    """Token put in front of every unit (``--bos``, :mod:`bgotrace.corpus.bos`); the window
    then holds ``max_length - 1`` document tokens. None: no BOS."""

    def __post_init__(self) -> None:
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int):
            raise ConfigError(f"max_length must be an integer, got {self.max_length!r}.")
        if isinstance(self.stride, bool) or not isinstance(self.stride, int):
            raise ConfigError(f"stride must be an integer, got {self.stride!r}.")
        if self.max_length < MIN_UNIT_TOKENS:
            raise ConfigError(
                f"max_length must be at least {MIN_UNIT_TOKENS}, got {self.max_length}: "
                "pass a larger --max-length."
            )
        if not 0 <= self.stride < self.max_length:
            raise ConfigError(
                f"stride must satisfy 0 <= stride < max_length ({self.max_length}), "
                f"got {self.stride}: pass a smaller --stride."
            )
        if self.bos_id is not None and self.stride >= self.text_length:
            raise ConfigError(
                f"With a BOS in front a unit holds {self.text_length} document tokens, so "
                f"stride must be < {self.text_length}, got {self.stride}: pass a smaller --stride."
            )

    @property
    def text_length(self) -> int:
        """Document tokens per window (one fewer than ``max_length`` with a BOS in front)."""
        return self.max_length - (self.bos_id is not None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings, as stored in a cache manifest (``bos_id`` only when set, so
        caches made before ``--bos`` existed stay valid)."""
        out: dict[str, Any] = {
            "max_length": self.max_length, "stride": self.stride, "append_eos": self.append_eos
        }  # fmt: skip
        if self.bos_id is not None:
            out["bos_id"] = self.bos_id
        return out


@dataclass(frozen=True)
class Unit:
    """One window of one document."""

    unit_id: str
    """``f"{doc_id}#{k}"`` for the k-th window (0-based) of the document."""
    doc_id: str
    source: str
    token_ids: list[int]
    """Token ids of the window, EOS included when it falls inside."""
    char_start: int
    """Start of the span of the document text covered by the window's tokens."""
    char_end: int
    """End (exclusive) of that span; the EOS token covers no characters."""


def window_bounds(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int]]:
    """Token ``[start, end)`` of each window of a sequence of ``n_tokens``."""
    step = max_length - stride
    bounds = []
    start = 0
    while True:
        end = min(start + max_length, n_tokens)
        bounds.append((start, end))
        if end >= n_tokens:
            return bounds
        start += step


def tokenize_and_chunk(
    documents: Sequence[Document], tokenizer: Any, chunking: ChunkingConfig
) -> list[Unit]:
    """All units of ``documents`` in document order; units with < 2 tokens are dropped."""
    return [
        unit for _, units in iter_unit_batches(documents, tokenizer, chunking) for unit in units
    ]


def iter_unit_batches(
    documents: Sequence[Document],
    tokenizer: Any,
    chunking: ChunkingConfig,
    batch_docs: int = TOKENIZE_BATCH_DOCS,
) -> Iterator[tuple[int, list[Unit]]]:
    """Yield ``(documents done in this batch, their units)``; lets callers show progress."""
    _require_fast(tokenizer)
    eos_id = tokenizer.eos_token_id if chunking.append_eos else None
    for first in range(0, len(documents), batch_docs):
        batch = documents[first : first + batch_docs]
        encoded = tokenizer(
            [doc.text for doc in batch],
            add_special_tokens=False,
            return_offsets_mapping=True,
            return_attention_mask=False,
            verbose=False,  # long documents are expected; windows handle the length
        )
        units: list[Unit] = []
        for doc, ids, offsets in zip(
            batch, encoded["input_ids"], encoded["offset_mapping"], strict=True
        ):
            units.extend(_chunk_document(doc, ids, offsets, eos_id, chunking))
        yield len(batch), units


def _require_fast(tokenizer: Any) -> None:
    """Character offsets, which map units back to text, exist only in fast tokenizers."""
    if not getattr(tokenizer, "is_fast", False):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise InputError(
            f"Tokenizer {name} is not a fast tokenizer, so it cannot report character "
            "offsets: use a tokenizer with a tokenizer.json (AutoTokenizer, use_fast=True)."
        )


def _chunk_document(
    doc: Document,
    ids: list[int],
    offsets: list[tuple[int, int]],
    eos_id: int | None,
    chunking: ChunkingConfig,
) -> list[Unit]:
    """Windows of one document; ``offsets[j]`` is the character span of text token ``j``."""
    n_text = len(ids)
    all_ids = [*ids, eos_id] if eos_id is not None else list(ids)
    units = []
    bos = [] if chunking.bos_id is None else [chunking.bos_id]
    for k, (start, end) in enumerate(
        window_bounds(len(all_ids), chunking.text_length, chunking.stride)
    ):
        if len(bos) + end - start < MIN_UNIT_TOKENS:
            continue
        char_start, char_end = _char_span(offsets, start, min(end, n_text), len(doc.text))
        units.append(
            Unit(
                unit_id=f"{doc.doc_id}#{k}",
                doc_id=doc.doc_id,
                source=doc.source,
                token_ids=bos + all_ids[start:end],
                char_start=char_start,
                char_end=char_end,
            )
        )
    return units


def _char_span(
    offsets: list[tuple[int, int]], start: int, text_end: int, text_len: int
) -> tuple[int, int]:
    """Span of text tokens ``[start, text_end)``; a window holding only EOS maps to the end.

    Byte-level tokenizers give the pieces of one character overlapping, and trimmed
    offsets of space tokens can be empty, so take the min start and max end.
    """
    if start >= text_end:
        return text_len, text_len
    window = offsets[start:text_end]
    return min(s for s, _ in window), max(e for _, e in window)
