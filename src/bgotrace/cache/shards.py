"""Token shards: a cache's tokens and texts in files of bounded size, written as batches arrive.

Layout inside a cache directory::

    units.parquet                   one row per unit (see token_cache); a row group per batch
    shards/tokens-00000.bin         uint32 tokens of the shard's units, back to back
    shards/documents-00000.parquet  doc_id, source, text of the documents with units in it
    shards/masks-00000.bin          uint8 per token beside tokens-00000.bin: 1 where the
                                    token's prediction is in its unit's loss (only in shards
                                    holding SFT conversations; a shard without one: all 1)
    turns.parquet                   one row per conversation unit: the turns it covers and
                                    its loss tokens (only in caches of SFT corpora)

A shard ends at a document boundary, so each document's units and text sit in one shard and
a shard exceeds its bound only by its last document. Documents that gave no unit are not
stored: no snippet ever needs their text. Nothing here holds more than one batch in memory,
so building a cache costs the same memory for 1e6 tokens as for 1e9.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bgotrace.corpus.chunking import TOKEN_DTYPE, ChunkedBatch
from bgotrace.corpus.conversations import UnitTurns

SHARD_DIR = "shards"
DEFAULT_SHARD_TOKENS = 64 * 2**20
"""Tokens per shard before the next one starts: 64 Mi tokens = 256 MiB of uint32."""
UNITS_FILE = "units.parquet"
UNIT_SCHEMA = pa.schema(
    [
        ("unit_id", pa.string()),
        ("doc_id", pa.string()),
        ("source", pa.string()),
        ("start", pa.int64()),
        ("length", pa.int32()),
        ("char_start", pa.int64()),
        ("char_end", pa.int64()),
    ]
)
DOCUMENT_SCHEMA = pa.schema(
    [("doc_id", pa.string()), ("source", pa.string()), ("text", pa.large_string())]
)
TURNS_FILE = "turns.parquet"
TURN_SCHEMA = pa.schema(
    [
        ("unit", pa.int64()),
        ("turn_first", pa.int32()),
        ("turn_starts", pa.list_(pa.int32())),
        ("turn_roles", pa.list_(pa.string())),
        ("n_loss", pa.int64()),
    ]
)
"""Conversation units only: unit index, first turn, where each covered turn starts in the
unit and its role (:class:`~bgotrace.corpus.conversations.UnitTurns`), and the predicted
tokens in its loss."""


def shard_names(index: int) -> tuple[str, str]:
    """Paths (relative to the cache root) of shard ``index``'s tokens and documents."""
    return f"{SHARD_DIR}/tokens-{index:05d}.bin", f"{SHARD_DIR}/documents-{index:05d}.parquet"


def mask_name(index: int) -> str:
    """Path (relative to the cache root) of shard ``index``'s loss mask."""
    return f"{SHARD_DIR}/masks-{index:05d}.bin"


class ShardWriter:
    """Appends chunked batches to ``units.parquet`` and to shards of ≤ ``max_tokens`` tokens."""

    def __init__(self, root: Path, max_tokens: int = DEFAULT_SHARD_TOKENS) -> None:
        self.root, self.max_tokens = root, max_tokens
        (root / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        self.units = pq.ParquetWriter(root / UNITS_FILE, UNIT_SCHEMA)
        self.shards: list[dict[str, Any]] = []
        self.n_units = self.n_tokens = 0
        self.max_token_id = -1
        self._tokens: Any = None  # binary file of the open shard
        self._masks: Any = None  # its loss-mask file, once a conversation reaches it
        self._documents: pq.ParquetWriter | None = None
        self._turns: pq.ParquetWriter | None = None

    def append(self, batch: ChunkedBatch) -> None:
        """Write a batch's units, starting a new shard before a document that would overflow."""
        if not len(batch.lengths):
            return
        per_doc = np.bincount(batch.doc_index, weights=batch.lengths).astype(np.int64)
        docs = np.flatnonzero(per_doc)  # documents that gave units, in order
        for first, stop, new_shard in self._runs(per_doc[docs]):
            if new_shard:
                self._open_shard()
            self._write_run(batch, docs[first:stop])

    def close(self) -> list[dict[str, Any]]:
        """Finish the files; the shard entries for the manifest."""
        self._close_shard()
        self.units.close()
        if self._turns is not None:
            self._turns.close()
        return self.shards

    @property
    def has_masks(self) -> bool:
        """Whether a shard holds a loss-mask file (a batch of SFT conversations reached it)."""
        return any("masks" in s for s in self.shards)

    @property
    def has_turns(self) -> bool:
        """Whether a conversation unit was written (``turns.parquet`` exists)."""
        return self._turns is not None

    def abort(self) -> None:
        """Close open files after an error (the caller deletes the directory)."""
        for handle in (self._tokens, self._masks, self._documents, self.units, self._turns):
            if handle is not None:
                handle.close()

    def _runs(self, doc_tokens: np.ndarray) -> list[tuple[int, int, bool]]:
        """``(first, stop, starts a new shard)``: runs of documents that go to one shard."""
        is_open = self._tokens is not None
        fill = self.shards[-1]["n_tokens"] if is_open else 0
        runs, first, new = [], 0, not is_open
        for i, n in enumerate(doc_tokens.tolist()):
            if fill and fill + n > self.max_tokens:
                if i > first:
                    runs.append((first, i, new))
                first, fill, new = i, 0, True
            fill += n
        runs.append((first, len(doc_tokens), new))
        return runs

    def _write_run(self, batch: ChunkedBatch, docs: np.ndarray) -> None:
        """Append the units of documents ``docs`` (indices into the batch) to the open shard."""
        lo, hi = (int(i) for i in np.searchsorted(batch.doc_index, [docs[0], docs[-1] + 1]))
        unit_ends = np.cumsum(batch.lengths)
        span = slice(int(unit_ends[lo - 1]) if lo else 0, int(unit_ends[hi - 1]))
        tokens = batch.tokens[span]
        self._write_masks(batch, span)
        self._write_turns(batch, lo, hi)
        self._tokens.write(tokens.tobytes())
        self.units.write_table(self._unit_rows(batch, lo, hi))
        assert self._documents is not None
        self._documents.write_table(_document_rows(batch, docs))
        entry = self.shards[-1]
        entry["n_tokens"] += len(tokens)
        entry["n_units"] += hi - lo
        entry["n_documents"] += len(docs)
        self.n_tokens += len(tokens)
        self.n_units += hi - lo
        self.max_token_id = max(self.max_token_id, int(tokens.max()))

    def _write_masks(self, batch: ChunkedBatch, span: slice) -> None:
        """The loss mask of tokens ``span``; a shard's mask file starts with its first masked
        batch (the tokens before it in the shard: all in the loss)."""
        if batch.loss_mask is None and self._masks is None:
            return
        if self._masks is None:
            entry = self.shards[-1]
            entry["masks"] = mask_name(len(self.shards) - 1)
            self._masks = (self.root / entry["masks"]).open("wb")
            self._masks.write(np.ones(entry["n_tokens"], np.uint8).tobytes())
        n = span.stop - span.start
        mask = np.ones(n, bool) if batch.loss_mask is None else batch.loss_mask[span]
        self._masks.write(mask.astype(np.uint8).tobytes())

    def _write_turns(self, batch: ChunkedBatch, lo: int, hi: int) -> None:
        """Rows of ``turns.parquet`` for the conversation units among units ``lo:hi``."""
        turns = batch.turns[lo:hi] if batch.turns is not None else []
        rows = [(i, t) for i, t in enumerate(turns) if t is not None]
        if not rows:
            return
        assert batch.loss_mask is not None
        ends = np.cumsum(batch.lengths)
        n_loss = [
            int(batch.loss_mask[ends[lo + i] - batch.lengths[lo + i] + 1 : ends[lo + i]].sum())
            for i, _ in rows
        ]
        table = pa.table(
            {
                "unit": pa.array([self.n_units + i for i, _ in rows], pa.int64()),
                "turn_first": pa.array([t.first for _, t in rows], pa.int32()),
                "turn_starts": pa.array([list(t.starts) for _, t in rows], TURN_SCHEMA[2].type),
                "turn_roles": pa.array([list(t.roles) for _, t in rows], TURN_SCHEMA[3].type),
                "n_loss": pa.array(n_loss, pa.int64()),
            },
            schema=TURN_SCHEMA,
        )
        if self._turns is None:
            self._turns = pq.ParquetWriter(self.root / TURNS_FILE, TURN_SCHEMA)
        self._turns.write_table(table)

    def _unit_rows(self, batch: ChunkedBatch, lo: int, hi: int) -> pa.Table:
        lengths = batch.lengths[lo:hi]
        starts = self.n_tokens + np.cumsum(lengths) - lengths  # global: as if one flat file
        docs = [batch.documents[d] for d in batch.doc_index[lo:hi].tolist()]
        windows = batch.window[lo:hi].tolist()
        columns = [
            [f"{d.doc_id}#{k}" for d, k in zip(docs, windows, strict=True)],
            [d.doc_id for d in docs],
            [d.source for d in docs],
            starts,
            lengths.astype(np.int32),
            batch.char_start[lo:hi],
            batch.char_end[lo:hi],
        ]
        return pa.Table.from_arrays(
            [pa.array(c, type=f.type) for c, f in zip(columns, UNIT_SCHEMA, strict=True)],
            schema=UNIT_SCHEMA,
        )

    def _open_shard(self) -> None:
        self._close_shard()
        tokens, documents = shard_names(len(self.shards))
        self._tokens = (self.root / tokens).open("wb")
        self._documents = pq.ParquetWriter(self.root / documents, DOCUMENT_SCHEMA)
        self.shards.append(
            {"tokens": tokens, "documents": documents, "n_tokens": 0, "n_units": 0,
             "n_documents": 0}
        )  # fmt: skip

    def _close_shard(self) -> None:
        for handle in (self._tokens, self._masks, self._documents):
            if handle is not None:
                handle.close()
        self._tokens = self._masks = self._documents = None


def _document_rows(batch: ChunkedBatch, docs: np.ndarray) -> pa.Table:
    chosen = [batch.documents[d] for d in docs.tolist()]
    return pa.table(
        {
            "doc_id": pa.array([d.doc_id for d in chosen], pa.string()),
            "source": pa.array([d.source for d in chosen], pa.string()),
            "text": pa.array([d.text for d in chosen], pa.large_string()),
        },
        schema=DOCUMENT_SCHEMA,
    )


# ---------------------------------------------------------------- reading

READ_BATCH = 1 << 16
"""Rows of the unit table decoded at a time while reading columns of it."""


def unit_columns(path: Path, names: tuple[str, ...]) -> tuple[np.ndarray, ...]:
    """Numeric columns of the unit table as int64 arrays ``(n_units,)``, read batch by batch
    so that no more than one batch of it is decoded at once."""
    table = pq.ParquetFile(path)
    out = tuple(np.empty(table.metadata.num_rows, dtype=np.int64) for _ in names)
    at = 0
    for batch in table.iter_batches(batch_size=READ_BATCH, columns=list(names)):
        for column, values in zip(out, batch.columns, strict=True):
            column[at : at + len(batch)] = values.to_numpy()
        at += len(batch)
    return out


def document_starts(path: Path) -> np.ndarray:
    """``(n_units,)`` bool: True where a unit's doc_id differs from the unit before it."""
    table = pq.ParquetFile(path)
    out = np.ones(table.metadata.num_rows, dtype=bool)
    at, previous = 0, None
    for batch in table.iter_batches(batch_size=READ_BATCH, columns=["doc_id"]):
        ids = batch.column(0)
        if len(ids) > 1:
            out[at + 1 : at + len(ids)] = pc.not_equal(ids[1:], ids[:-1]).to_numpy(
                zero_copy_only=False
            )
        if previous is not None and len(ids):
            out[at] = ids[0].as_py() != previous
        at, previous = at + len(ids), ids[-1].as_py() if len(ids) else previous
    return out


def open_tokens(path: Path, dtype: Any = TOKEN_DTYPE) -> np.ndarray:
    """Memory-map a token (or mask) file read-only; numpy cannot map an empty file."""
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class TurnTable:
    """``turns.parquet`` read once as columns: numbers as arrays, each unit's turn starts and
    roles kept as Arrow lists and made into a :class:`UnitTurns` only when asked for."""

    def __init__(self, path: Path) -> None:
        table = pq.read_table(path)
        self.units = table.column("unit").to_numpy()  # (n_conv,) int64, increasing
        self.first = table.column("turn_first").to_numpy().astype(np.int64)  # (n_conv,)
        self.n_loss = table.column("n_loss").to_numpy()  # (n_conv,) int64
        self._starts = table.column("turn_starts").combine_chunks()
        self._roles = table.column("turn_roles").combine_chunks()

    @property
    def last(self) -> np.ndarray:
        """``(n_conv,)`` index of each unit's last turn."""
        return self.first + pc.list_value_length(self._starts).to_numpy() - 1

    def row_of(self, unit: int) -> int | None:
        row = int(np.searchsorted(self.units, unit))
        return row if row < len(self.units) and self.units[row] == unit else None

    def turns(self, row: int) -> UnitTurns:
        starts = tuple(self._starts[row].as_py())
        return UnitTurns(int(self.first[row]), starts, tuple(self._roles[row].as_py()))


class ShardTexts:
    """Document texts of a sharded cache, read one row group at a time when first needed.

    A unit's document is found without an index of all documents: units are stored in
    document order, so its row in the shard's table is the number of document changes
    between the shard's first unit and it.
    """

    def __init__(self, root: Path, shards: list[dict[str, Any]], starts: np.ndarray) -> None:
        """``starts``: ``(n_units,)`` bool, True where a unit begins a new document."""
        self.root, self.shards = root, shards
        first_units = np.cumsum([0] + [s["n_units"] for s in shards])  # (n_shards + 1,)
        ordinal = np.cumsum(starts, dtype=np.int64) - 1  # (n_units,) document over the cache
        shard = np.searchsorted(first_units, np.arange(len(starts)), side="right") - 1
        self.shard_of = shard.astype(np.int32)  # (n_units,)
        self.row_of = ordinal - ordinal[first_units[shard]]  # (n_units,) row in its shard

    def unit_document(self, unit: int) -> str:
        """Full text of unit ``unit``'s document."""
        shard, row = int(self.shard_of[unit]), int(self.row_of[unit])
        bounds = self._group_bounds(shard)
        group = int(np.searchsorted(bounds, row, side="right") - 1)
        return self._group_texts(shard, group)[row - int(bounds[group])]

    @functools.cache  # noqa: B019 - one small array per shard, for the cache's lifetime
    def _group_bounds(self, shard: int) -> np.ndarray:
        meta = pq.ParquetFile(self.root / self.shards[shard]["documents"]).metadata
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        return np.cumsum([0, *sizes])

    @functools.lru_cache(maxsize=4)  # noqa: B019 - reports read units in order: a group at a time
    def _group_texts(self, shard: int, group: int) -> list[str]:
        table = pq.ParquetFile(self.root / self.shards[shard]["documents"])
        return table.read_row_group(group, columns=["text"]).column("text").to_pylist()
