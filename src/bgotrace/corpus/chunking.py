"""Cut tokenized documents into units: the windows a model trains on and the scorer ranks.

A document of ``n`` tokens (EOS included) becomes windows ``[s_k, min(s_k + L, n))`` with
``s_k = k * (L - stride)``, stopping at the first window that reaches the end. Consecutive
windows of a document therefore overlap by exactly ``stride`` tokens, and no window lies fully
inside the one before it.

An SFT conversation (a document with ``messages``) is rendered by its chat template and cut
at turn boundaries instead (:mod:`bgotrace.corpus.conversations`): its special tokens come
from the template (no EOS appended; the BOS only in front of a window that continues a
conversation), and its units carry a per-token loss mask and the turns they cover.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from bgotrace.corpus.conversations import (
    UNIT_LOSSES,
    RenderedConversation,
    Renderer,
    UnitTurns,
    turn_windows,
    unit_turns,
)
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
    unit_loss: str = "assistant"
    """What an SFT conversation unit's loss covers: ``assistant`` (its assistant tokens, as
    SFT trained them) or ``all``; plain-text units always take every token."""

    def __post_init__(self) -> None:
        if self.unit_loss not in UNIT_LOSSES:
            raise ConfigError(
                f"unit_loss must be one of {', '.join(UNIT_LOSSES)}, got {self.unit_loss!r}: "
                "pass --unit-loss assistant or all."
            )
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
        """JSON-ready settings, as stored in a cache manifest (``bos_id`` only when set and
        ``unit_loss`` only when not the default, so older caches stay valid)."""
        out: dict[str, Any] = {
            "max_length": self.max_length, "stride": self.stride, "append_eos": self.append_eos
        }  # fmt: skip
        if self.bos_id is not None:
            out["bos_id"] = self.bos_id
        if self.unit_loss != "assistant":
            out["unit_loss"] = self.unit_loss
        return out


@dataclass(frozen=True)
class Unit:
    """One window of one document."""

    unit_id: str
    """``f"{doc_id}#{k}"`` for the k-th unit (0-based) of the document: its k-th window (an
    SFT conversation's k-th kept window; its turn range locates it in the conversation)."""
    doc_id: str
    source: str
    token_ids: list[int]
    """Token ids of the window, EOS included when it falls inside."""
    char_start: int
    """Start of the span of the document text covered by the window's tokens."""
    char_end: int
    """End (exclusive) of that span; the EOS token covers no characters."""
    loss_mask: list[bool] | None = None
    """Per token: whether its prediction is in the unit's loss (None: every token)."""


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
    documents: Iterable[Document],
    tokenizer: Any,
    chunking: ChunkingConfig,
    render: Renderer | None = None,
) -> list[Unit]:
    """All units of ``documents`` in document order; units with < 2 tokens are dropped.

    ``render``: how conversations are rendered (:func:`bgotrace.chat.conversation_renderer`).
    """
    batches = iter_unit_batches(documents, tokenizer, chunking, render=render)
    return [unit for _, units in batches for unit in units]


def iter_unit_batches(
    documents: Iterable[Document],
    tokenizer: Any,
    chunking: ChunkingConfig,
    batch_docs: int = TOKENIZE_BATCH_DOCS,
    render: Renderer | None = None,
) -> Iterator[tuple[int, list[Unit]]]:
    """Yield ``(documents done in this batch, their units)``; lets callers show progress."""
    for batch in iter_chunked_batches(documents, tokenizer, chunking, batch_docs, render):
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
    """``(n_units,)`` int64: k of the unit id ``f"{doc_id}#{k}"`` (0, 1, ... per document)."""
    char_start: np.ndarray
    """``(n_units,)`` int64: start of the document text the unit covers."""
    char_end: np.ndarray
    """``(n_units,)`` int64: end (exclusive) of that text; an EOS covers none."""
    loss_mask: np.ndarray | None = None
    """``(n_tokens,)`` bool beside ``tokens``: whether a token's prediction is in its unit's
    loss. None: every token (a batch of plain texts)."""
    turns: list[UnitTurns | None] | None = None
    """Per unit: the conversation turns it covers (None: a plain-text unit, or all are)."""

    def unit_ids(self) -> list[str]:
        ids = [self.documents[d].doc_id for d in self.doc_index.tolist()]
        return [f"{doc_id}#{k}" for doc_id, k in zip(ids, self.window.tolist(), strict=True)]

    def units(self) -> list[Unit]:
        """The same units as :class:`Unit` objects (lists, for callers that want them)."""
        ends = np.cumsum(self.lengths)
        mask = self.loss_mask
        return [
            Unit(
                unit_id,
                doc.doc_id,
                doc.source,
                self.tokens[end - n : end].tolist(),
                s,
                e,
                None if mask is None else mask[end - n : end].tolist(),
            )
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
    render: Renderer | None = None,
) -> Iterator[ChunkedBatch]:
    """Tokenize ``batch_docs`` documents per call (in the tokenizers library's threads) and
    cut them into windows with array operations; documents are read as they are needed.

    ``encode_batch`` releases the GIL, so the next batch is encoded in a helper thread while
    this one is turned into arrays and cut: the Python side overlaps the encoding. A
    conversation is rendered by ``render`` first and its rendered text encoded (with the
    offsets that map units back to text), which must give the template's own tokens.
    """
    backend = fast_backend(tokenizer)
    eos_id = tokenizer.eos_token_id if chunking.append_eos else None
    iterator = iter(documents)
    pending: tuple[_Pending, Future[Any]] | None = None
    with ThreadPoolExecutor(max_workers=1) as pool:
        while True:
            batch = _rendered(list(itertools.islice(iterator, batch_docs)), render)
            encoding = (
                pool.submit(backend.encode_batch, [d.text for d in batch.docs],
                            add_special_tokens=False)
                if batch.docs
                else None
            )  # fmt: skip
            if pending is not None:
                done, encoded = pending
                arrays = encoding_arrays(encoded.result())
                yield _chunk_any(done, *arrays, eos_id, chunking)
            if encoding is None:
                return
            pending = (batch, encoding)


@dataclass
class _Pending:
    """A batch of documents (conversations with their rendered text) and their renderings."""

    docs: list[Document]
    rendered: list[RenderedConversation | None]


def _rendered(docs: list[Document], render: Renderer | None) -> _Pending:
    out = _Pending([], [])
    for doc in docs:
        if doc.messages is None:
            out.docs.append(doc)
            out.rendered.append(None)
            continue
        if render is None:
            raise InputError(
                f"Corpus document {doc.doc_id} is a conversation, and this caller cannot "
                "render chat templates: store the corpus as plain text."
            )
        rendered = render(doc)
        out.docs.append(dataclasses.replace(doc, text=rendered.text))
        out.rendered.append(rendered)
    return out


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


def _chunk_any(
    batch: _Pending,
    ids: np.ndarray,
    offsets: np.ndarray,
    n_text: np.ndarray,
    eos_id: int | None,
    chunking: ChunkingConfig,
) -> ChunkedBatch:
    """:func:`_chunk_batch` for plain texts (unchanged), runs of them and conversations cut
    apart and joined again where a batch holds conversations."""
    docs = batch.docs
    if all(r is None for r in batch.rendered):
        return _chunk_batch(docs, ids, offsets, n_text, eos_id, chunking)
    first = np.cumsum(n_text) - n_text  # (n_docs,) first token of each doc in ``ids``
    parts, at = [], 0
    for plain, run in itertools.groupby(batch.rendered, key=lambda r: r is None):
        group = list(run)
        lo, hi = at, at + len(group)
        tokens = slice(int(first[lo]), int(first[hi - 1] + n_text[hi - 1]))
        if plain:
            parts.append(_chunk_batch(docs[lo:hi], ids[tokens], offsets[tokens],
                                      n_text[lo:hi], eos_id, chunking))  # fmt: skip
        else:
            for i, rendered in zip(range(lo, hi), group, strict=True):
                span = slice(int(first[i]), int(first[i] + n_text[i]))
                parts.append(_chunk_conversation(docs[i], rendered, ids[span], offsets[span],
                                                 chunking))  # fmt: skip
        at = hi
    return _concat(docs, parts)


def _chunk_conversation(
    doc: Document,
    rendered: RenderedConversation | None,
    ids: np.ndarray,
    offsets: np.ndarray,
    chunking: ChunkingConfig,
) -> ChunkedBatch:
    """Turn-aligned units of one rendered conversation (one-document batch)."""
    assert rendered is not None
    if ids.tolist() != list(rendered.ids):
        raise InputError(
            f"Corpus document {doc.doc_id}: its chat-rendered text tokenizes to other tokens "
            "than apply_chat_template gives, so units cannot be mapped back to the text: "
            "use a tokenizer whose template output re-tokenizes to the same ids."
        )
    mask = np.asarray(rendered.loss_mask, dtype=bool)  # (n,)
    windows = turn_windows(rendered.turn_ends, chunking.text_length, chunking.stride)
    parts = [
        (k, *_conversation_unit(rendered, ids, mask, start, end, chunking.bos_id))
        for k, (start, end) in enumerate(windows)
    ]
    kept = [p for p in parts if len(p[1]) >= MIN_UNIT_TOKENS and p[2][1:].any()]
    spans = [offsets[start:end] for start, end in (windows[p[0]] for p in kept)]
    return ChunkedBatch(
        documents=[doc],
        tokens=np.concatenate([p[1] for p in kept] or [np.zeros(0, TOKEN_DTYPE)]),
        lengths=np.array([len(p[1]) for p in kept], dtype=np.int64),
        doc_index=np.zeros(len(kept), np.int64),
        window=np.arange(len(kept), dtype=np.int64),  # kept units numbered 0, 1, ...
        char_start=np.array([span[:, 0].min() for span in spans], dtype=np.int64),
        char_end=np.array([span[:, 1].max() for span in spans], dtype=np.int64),
        loss_mask=np.concatenate([p[2] for p in kept] or [np.zeros(0, np.bool_)]),
        turns=[p[3] for p in kept],
    )


def _conversation_unit(
    rendered: RenderedConversation,
    ids: np.ndarray,
    mask: np.ndarray,
    start: int,
    end: int,
    bos_id: int | None,
) -> tuple[np.ndarray, np.ndarray, UnitTurns]:
    """Tokens (uint32), loss mask (bool) and turns of window ``[start, end)``: a window that
    continues a conversation gets the BOS in front (as plain units do), the first has the
    template's own."""
    bos = [bos_id] if start > 0 and bos_id is not None else []
    tokens = np.array(bos + ids[start:end].tolist(), dtype=TOKEN_DTYPE)
    unit_mask = np.concatenate([np.zeros(len(bos), np.bool_), mask[start:end]])
    return tokens, unit_mask, unit_turns(rendered, start, end, len(bos))


def _concat(docs: list[Document], parts: Sequence[ChunkedBatch]) -> ChunkedBatch:
    """One batch of ``docs`` from batches of consecutive runs of them, in order."""
    first_doc = np.cumsum([0] + [len(p.documents) for p in parts])[:-1]
    join = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
    masks = [np.ones(len(p.tokens), bool) if p.loss_mask is None else p.loss_mask for p in parts]
    turns = [t for p in parts for t in (p.turns or [None] * len(p.lengths))]
    return ChunkedBatch(
        documents=docs,
        tokens=join("tokens").astype(TOKEN_DTYPE),
        lengths=join("lengths").astype(np.int64),
        doc_index=np.concatenate([p.doc_index + f for p, f in zip(parts, first_doc, strict=True)]),
        window=join("window").astype(np.int64),
        char_start=join("char_start").astype(np.int64),
        char_end=join("char_end").astype(np.int64),
        loss_mask=np.concatenate(masks),
        turns=turns,
    )
