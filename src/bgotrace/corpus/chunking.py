"""Cut tokenized documents into units: the windows a model trains on and the scorer ranks.

A document of ``n`` tokens (EOS included) becomes windows ``[s_k, min(s_k + L, n))`` with
``s_k = k * (L - stride)``, stopping at the first window that reaches the end. Consecutive
windows of a document therefore overlap by exactly ``stride`` tokens, and no window lies fully
inside the one before it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from bgotrace.corpus.documents import Document
from bgotrace.errors import ConfigError, InputError

MIN_UNIT_TOKENS = 2
"""A unit needs one token of context and one to predict; shorter ones are dropped."""

TOKENIZE_BATCH_DOCS = 256
"""Documents per tokenizer call: fast tokenizers parallelise within a batch."""

TOKEN_DTYPE = np.uint32
"""Token ids as cached: vocabularies stay below 2**32."""


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
    documents: Iterable[Document], tokenizer: Any, chunking: ChunkingConfig
) -> list[Unit]:
    """All units of ``documents`` in document order; units with < 2 tokens are dropped."""
    return [
        unit for _, units in iter_unit_batches(documents, tokenizer, chunking) for unit in units
    ]


def iter_unit_batches(
    documents: Iterable[Document],
    tokenizer: Any,
    chunking: ChunkingConfig,
    batch_docs: int = TOKENIZE_BATCH_DOCS,
) -> Iterator[tuple[int, list[Unit]]]:
    """Yield ``(documents done in this batch, their units)``; lets callers show progress."""
    for batch in iter_chunked_batches(documents, tokenizer, chunking, batch_docs):
        yield len(batch.documents), batch.units()


@dataclass
class ChunkedBatch:
    """The units of a batch of documents as flat arrays: what the token cache appends."""

    documents: list[Document]
    """The batch's documents, in order (including those too short to give a unit)."""
    tokens: np.ndarray
    """``(n_tokens,)`` uint32: the tokens of every unit, back to back."""
    lengths: np.ndarray
    """``(n_units,)`` int64: tokens per unit."""
    doc_index: np.ndarray
    """``(n_units,)`` int64: each unit's document, an index into ``documents``."""
    window: np.ndarray
    """``(n_units,)`` int64: k of the unit id ``f"{doc_id}#{k}"``."""
    char_start: np.ndarray
    """``(n_units,)`` int64: start of the document text the unit covers."""
    char_end: np.ndarray
    """``(n_units,)`` int64: end (exclusive) of that text; an EOS covers none."""

    def unit_ids(self) -> list[str]:
        ids = [self.documents[d].doc_id for d in self.doc_index.tolist()]
        return [f"{doc_id}#{k}" for doc_id, k in zip(ids, self.window.tolist(), strict=True)]

    def units(self) -> list[Unit]:
        """The same units as :class:`Unit` objects (lists, for callers that want them)."""
        ends = np.cumsum(self.lengths)
        return [
            Unit(unit_id, doc.doc_id, doc.source, self.tokens[end - n : end].tolist(), s, e)
            for unit_id, doc, n, end, s, e in zip(
                self.unit_ids(),
                (self.documents[d] for d in self.doc_index.tolist()),
                self.lengths.tolist(),
                ends.tolist(),
                self.char_start.tolist(),
                self.char_end.tolist(),
                strict=True,
            )
        ]


def iter_chunked_batches(
    documents: Iterable[Document],
    tokenizer: Any,
    chunking: ChunkingConfig,
    batch_docs: int = TOKENIZE_BATCH_DOCS,
) -> Iterator[ChunkedBatch]:
    """Tokenize ``batch_docs`` documents per call (in the tokenizers library's threads) and
    cut them into windows with array operations; documents are read as they are needed.

    ``encode_batch`` releases the GIL, so the next batch is encoded in a helper thread while
    this one is turned into arrays and cut: the Python side overlaps the encoding.
    """
    backend = fast_backend(tokenizer)
    eos_id = tokenizer.eos_token_id if chunking.append_eos else None
    iterator = iter(documents)
    pending: tuple[list[Document], Future[Any]] | None = None
    with ThreadPoolExecutor(max_workers=1) as pool:
        while True:
            batch = list(itertools.islice(iterator, batch_docs))
            encoding = (
                pool.submit(backend.encode_batch, [d.text for d in batch], add_special_tokens=False)
                if batch
                else None
            )
            if pending is not None:
                docs, encoded = pending
                yield _chunk_batch(docs, *encoding_arrays(encoded.result()), eos_id, chunking)
            if encoding is None:
                return
            pending = (batch, encoding)


def fast_backend(tokenizer: Any) -> Any:
    """The Rust tokenizer of ``tokenizer``, set to encode as ``tokenizer(texts,
    add_special_tokens=False)`` does.

    A copy: transformers leaves call-time truncation and padding on its backend, which the
    copy drops while the caller's tokenizer is left alone.
    """
    _require_fast(tokenizer)
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
    return backend


def encoding_arrays(encodings: list[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids ``(T,)``, character offsets ``(T, 2)`` and tokens per text ``(n,)`` (int64) of a
    batch of encodings, texts back to back."""
    n_text = np.fromiter((len(e) for e in encodings), np.int64, len(encodings))
    total = int(n_text.sum())
    chain = itertools.chain.from_iterable
    ids = np.fromiter(chain(e.ids for e in encodings), np.int64, total)
    flat = np.fromiter(chain(chain(e.offsets for e in encodings)), np.int64, 2 * total)
    return ids, flat.reshape(total, 2), n_text


def _require_fast(tokenizer: Any) -> None:
    """Character offsets, which map units back to text, exist only in fast tokenizers."""
    if not getattr(tokenizer, "is_fast", False):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise InputError(
            f"Tokenizer {name} is not a fast tokenizer, so it cannot report character "
            "offsets: use a tokenizer with a tokenizer.json (AutoTokenizer, use_fast=True)."
        )


def _chunk_batch(
    docs: list[Document],
    ids: np.ndarray,
    offsets: np.ndarray,
    n_text: np.ndarray,
    eos_id: int | None,
    chunking: ChunkingConfig,
) -> ChunkedBatch:
    """Windows of every document of a batch at once (:func:`window_bounds` per document)."""
    text_first = np.cumsum(n_text) - n_text  # (n_docs,) first token of each doc in ``ids``
    if eos_id is not None:  # EOS after each document: (T + n_docs,)
        ids = np.insert(ids, text_first + n_text, eos_id)
    n_all = n_text + (eos_id is not None)  # (n_docs,) tokens per doc, EOS included
    doc, k, start, end = _windows(n_all, chunking)
    n_bos = int(chunking.bos_id is not None)
    keep = n_bos + end - start >= MIN_UNIT_TOKENS
    doc, k, start, end = doc[keep], k[keep], start[keep], end[keep]
    tokens = _gather(ids, (np.cumsum(n_all) - n_all)[doc] + start, end - start, chunking.bos_id)
    text_end = np.minimum(end, n_text[doc])
    char_start, char_end = _char_spans(offsets, text_first[doc], start, text_end)
    text_len = np.fromiter((len(d.text) for d in docs), np.int64, len(docs))[doc]
    empty = start >= text_end  # a window holding only EOS maps to the end of the text
    char_start = np.where(empty, text_len, char_start)
    char_end = np.where(empty, text_len, char_end)
    lengths = end - start + n_bos
    return ChunkedBatch(docs, tokens, lengths, doc, k, char_start, char_end)


def _windows(
    n_all: np.ndarray, chunking: ChunkingConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(doc, k, start, end) of every window, as :func:`window_bounds` gives them per doc."""
    size, step = chunking.text_length, chunking.text_length - chunking.stride
    count = np.where(n_all <= size, 1, 1 - (-(n_all - size) // step))  # ceil division
    doc = np.repeat(np.arange(len(n_all)), count)
    k = np.arange(len(doc)) - np.repeat(np.cumsum(count) - count, count)
    start = k * step
    return doc, k, start, np.minimum(start + size, n_all[doc])


def _gather(
    ids: np.ndarray, first: np.ndarray, length: np.ndarray, bos_id: int | None
) -> np.ndarray:
    """``[bos] + ids[first:first + length]`` of every window, back to back, as uint32."""
    width = length + (bos_id is not None)
    out_first = np.cumsum(width) - width
    source = np.arange(int(width.sum())) - np.repeat(out_first - first, width)
    if bos_id is not None:
        source -= 1  # every position after a window's BOS reads one token earlier
    if not len(ids):  # only BOS positions to fill (they are overwritten below)
        ids = np.zeros(1, np.int64)
    tokens = ids[np.clip(source, 0, None)].astype(TOKEN_DTYPE)
    if bos_id is not None:
        tokens[out_first] = bos_id
    return tokens


def _char_spans(
    offsets: np.ndarray, text_first: np.ndarray, start: np.ndarray, text_end: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Min start and max end of the offsets of text tokens ``[start, text_end)`` per window.

    Byte-level tokenizers give the pieces of one character overlapping offsets, and trimmed
    offsets of space tokens can be empty, so take the min start and max end. Windows that
    hold no text token get 0 here (the caller maps them to the end of the text).
    """
    lo, hi = text_first + start, text_first + np.maximum(text_end, start)
    padded = np.concatenate([offsets, np.zeros((1, 2), np.int64)])  # reduceat may index len
    bounds = np.stack([lo, hi], axis=1).ravel()  # (2W,) [lo0, hi0, lo1, hi1, ...]
    if not len(bounds):
        return lo, hi
    first = np.minimum.reduceat(padded[:, 0], bounds)[::2]
    last = np.maximum.reduceat(padded[:, 1], bounds)[::2]
    return first, last
