"""Token cache: the corpus tokenized and chunked once, memory-mapped by every later stage.

Layout of a cache directory (format 2, or 3 with masks; :mod:`bgotrace.cache.shards`)::

    units.parquet      unit_id, doc_id, source, start, length, char_start, char_end
    shards/            tokens-NNNNN.bin (flat uint32) and documents-NNNNN.parquet (texts for
                       snippets), each shard at most ``shard_tokens`` tokens
    manifest.json      format version, fingerprints, chunking, counts, shards, created_at
    turns.parquet      SFT corpora only: the turns of each conversation unit (its loss mask
                       sits beside its tokens in shards/masks-NNNNN.bin)

The corpus is read as a stream (:class:`~bgotrace.corpus.sources.CorpusFiles`) or given as a
list of documents, tokenized in batches and appended shard by shard, so building holds one
batch in memory whatever the corpus size. ``start`` is a unit's offset as if the shards were
one file, which is how readers find its shard.

A cache is reused only if its manifest matches the request (same tokenizer, chunking and
corpus); otherwise the user is told what differs, since silently mixing tokens from two
tokenizers would corrupt every score. A corpus on disk is fingerprinted once, at build (full
sha256 of its files, sizes, mtimes, sampled bytes); later runs compare sizes and samples and
re-hash only files whose mtime moved (``verify="full"`` re-hashes all). The manifest is
written last and the directory is renamed into place, so a directory with a manifest is
always complete. Checking and building happen under an inter-process lock
(``bgotrace.cache.locking``), so two runs that start on the same directory at once build it
once and both use that build.

Without an explicit directory a cache goes to a location keyed by its content (corpus,
tokenizer, chunking: :func:`default_cache_dir`), so two corpora of the same file name never
meet in one directory; an explicit directory made with other settings is refused instead.
Caches of format 1 (one ``tokens.bin``) are refused with the same advice: rebuild them.

A cache whose units need more than tokens to be read right lists those features in its
manifest (``requires``, e.g. ``loss-masks``: an SFT corpus's masks, which a reader that
ignored them would score on every token) and has format 3: a bgotrace that reads format 2
only refuses it, and one that reads format 3 refuses a feature it does not know, with the
advice to upgrade or rebuild. Plain-text caches stay format 2 without the list.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bgotrace.cache.fingerprint import (
    canonical_json,
    file_differences,
    file_records,
    file_signature,
    sha256_text,
    short,
    tokenizer_fingerprint,
)
from bgotrace.cache.locking import exclusive
from bgotrace.cache.shards import (
    DEFAULT_SHARD_TOKENS,
    SHARD_DIR,
    TURNS_FILE,
    UNITS_FILE,
    ShardTexts,
    ShardWriter,
    TurnTable,
    document_starts,
    open_tokens,
    unit_columns,
)
from bgotrace.chat import conversation_renderer
from bgotrace.corpus.chunking import TOKEN_DTYPE, ChunkingConfig, iter_chunked_batches
from bgotrace.corpus.conversations import UnitTurns
from bgotrace.corpus.documents import CorpusHasher, Document, corpus_fingerprint
from bgotrace.corpus.sources import CorpusFiles
from bgotrace.errors import CacheMismatchError, ConfigError, InputError
from bgotrace.runtime.progress import progress_task

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
"""Bump when the layout changes; old caches are then refused instead of misread."""
REQUIRES_FORMAT_VERSION = 3
"""Format 2 with a ``requires`` list: what a cache holding features is written as (readers
of format 2 only refuse it, so none reads it without them)."""
READABLE_FORMATS = (FORMAT_VERSION, REQUIRES_FORMAT_VERSION)
KNOWN_FEATURES = frozenset({"loss-masks"})
"""Features of ``requires`` this bgotrace reads. ``loss-masks``: per-token loss masks of SFT
conversation units (``shards/masks-*.bin``) and their turns (``turns.parquet``)."""

MANIFEST_FILE = "manifest.json"
LEGACY_FILES = ("tokens.bin", "documents.parquet")
"""Files of a format-1 cache, replaced by a rebuild like the rest of it."""
CACHE_FILES = (UNITS_FILE, MANIFEST_FILE, SHARD_DIR, TURNS_FILE, *LEGACY_FILES)
DERIVED_DIRS = ("fisher", "kronfluence", "sensitivity", "trunk")
"""Artefacts computed from a cache's units and kept beside it (keyed by its manifest);
a rebuild replaces them together with the cache."""

COMPARED_KEYS = ("format_version", "tokenizer_fingerprint")
"""Manifest keys (besides each ``chunking.*`` setting) that must match for reuse."""
CORPUS_KEYS = ("corpus_fingerprint", "n_documents")
"""What a corpus given as documents is compared by (a corpus on disk: by its files)."""
VERIFY_MODES = ("quick", "full")
"""How a corpus on disk is checked against its cache: sizes, samples and a re-hash of files
whose mtime moved (quick), or a re-hash of every file (full)."""

FIX = "use --rebuild-cache to rebuild it, or choose another --cache-dir"

DEFAULT_PARENT = Path(".bgotrace-cache")
"""Parent of the default cache directories of corpora read from files (relative to the cwd)."""
KEY_CHARS = 20
"""Hex characters of the content key in a default cache directory's name."""

Corpus = Sequence[Document] | CorpusFiles
"""Documents in memory, or a corpus on disk that is streamed."""


class TokenCache:
    """Read-only view of a complete cache directory; its shards are memory-mapped."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.manifest: dict[str, Any] = read_manifest(self.root)
        _require_format(self.root, self.manifest)
        self.shards: list[dict[str, Any]] = list(self.manifest.get("shards", []))
        self.shard_tokens = [open_tokens(self.root / s["tokens"]) for s in self.shards]
        self.shard_masks = [
            open_tokens(self.root / s["masks"], np.uint8) if "masks" in s else None
            for s in self.shards
        ]  # conversations' loss masks (None: every token of the shard is in the loss)
        # Only the numbers a sweep needs are read at open (16 bytes a unit); the unit table
        # with its id strings is read when first asked for (ranking, reports).
        self._starts, self._lengths = unit_columns(self.root / UNITS_FILE, ("start", "length"))
        self._check_consistent()
        first = np.cumsum([0] + [len(t) for t in self.shard_tokens])  # (n_shards + 1,)
        self._shard = (np.searchsorted(first, self._starts, side="right") - 1).astype(np.int32)
        self._local = self._starts - first[self._shard] if len(self.shards) else self._starts
        self._units: pd.DataFrame | None = None
        self._texts: ShardTexts | None = None
        self._char_spans: tuple[np.ndarray, ...] | None = None
        self._turns: TurnTable | None = None
        self._loss_counts: np.ndarray | None = None

    @property
    def units(self) -> pd.DataFrame:
        """unit_id, doc_id, source, start, length, char_start, char_end (read on first use);
        in a cache of an SFT corpus also ``turns``: the turns a unit covers, ``"first-last"``
        (0-based, "" for a plain-text unit)."""
        if self._units is None:
            self._units = pd.read_parquet(self.root / UNITS_FILE)
            if (turns := self._turn_table()) is not None:
                column = np.full(len(self), "", dtype=object)
                spans = zip(turns.first.tolist(), turns.last.tolist(), strict=True)
                column[turns.units] = [f"{a}-{b}" for a, b in spans]
                self._units["turns"] = column
        return self._units

    @property
    def has_turns(self) -> bool:
        """Whether the cache holds SFT conversation units."""
        return (self.root / TURNS_FILE).is_file()

    def unit_turns(self, i: int) -> UnitTurns | None:
        """The turns conversation unit ``i`` covers (None: a plain-text unit)."""
        turns = self._turn_table()
        row = None if turns is None else turns.row_of(i)
        return None if turns is None or row is None else turns.turns(row)

    def _turn_table(self) -> TurnTable | None:
        if self._turns is None and self.has_turns:
            self._turns = TurnTable(self.root / TURNS_FILE)
        return self._turns

    def unit_loss_mask(self, i: int) -> np.ndarray | None:
        """Per token of unit ``i``: whether its prediction is in the unit's loss, ``(length,)``
        bool; None where every token is (plain text)."""
        masks = self.shard_masks[self._shard[i]] if self.shard_masks else None
        if masks is None:
            return None
        start = self._local[i]
        return masks[start : start + self._lengths[i]].astype(bool)

    @property
    def loss_counts(self) -> np.ndarray:
        """Predicted tokens in each unit's loss, ``(n_units,)`` int64: ``length - 1`` for plain
        text, a conversation unit's masked tokens (what the sweep's count gives)."""
        if self._loss_counts is None:
            counts = np.maximum(self._lengths.astype(np.int64) - 1, 0)
            if (turns := self._turn_table()) is not None:
                counts[turns.units] = turns.n_loss
            self._loss_counts = counts
        return self._loss_counts

    def __len__(self) -> int:
        return len(self._lengths)

    def __repr__(self) -> str:
        return (
            f"TokenCache({str(self.root)!r}, units={len(self)}, tokens={self.n_tokens}, "
            f"shards={len(self.shards)})"
        )

    @property
    def n_tokens(self) -> int:
        return sum(len(t) for t in self.shard_tokens)

    @property
    def tokens(self) -> np.ndarray:
        """All tokens as one array: the memory map itself for a one-shard cache, else a copy
        (``(n_tokens,)`` uint32 in memory, so prefer :meth:`unit_tokens` on large caches)."""
        if len(self.shard_tokens) == 1:
            return self.shard_tokens[0]
        if not self.shard_tokens:
            return np.zeros(0, dtype=TOKEN_DTYPE)
        return np.concatenate(self.shard_tokens)

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per unit, ``(n_units,)`` int64."""
        return self._lengths

    @property
    def max_token_id(self) -> int:
        """Largest token id in the cache (recorded in the manifest at build)."""
        return int(self.manifest["max_token_id"])

    def unit_tokens(self, i: int) -> np.ndarray:
        """Token ids of unit ``i``: a read-only view into its shard's memory map, ``(length,)``."""
        start = self._local[i]
        return self.shard_tokens[self._shard[i]][start : start + self._lengths[i]]

    def unit_text(self, i: int) -> str:
        """The document text that unit ``i`` covers (its EOS, if any, covers none)."""
        if self._char_spans is None:
            self._char_spans = unit_columns(self.root / UNITS_FILE, ("char_start", "char_end"))
        start, end = self._char_spans[0][i], self._char_spans[1][i]
        return self._documents().unit_document(i)[start:end]

    def document_text(self, doc_id: str) -> str:
        """Full text of a document that has units; texts are read when first needed."""
        (units,) = np.nonzero(self.units["doc_id"].to_numpy() == doc_id)
        if not len(units):
            raise KeyError(doc_id)
        return self._documents().unit_document(int(units[0]))

    def _documents(self) -> ShardTexts:
        if self._texts is None:
            self._texts = ShardTexts(
                self.root, self.shards, document_starts(self.root / UNITS_FILE)
            )
        return self._texts

    def _check_consistent(self) -> None:
        """Catch a cache edited or truncated after it was written, before it is misread."""
        n_units, n_tokens = self.manifest.get("n_units"), self.manifest.get("n_tokens")
        covered = int(self._starts[-1] + self._lengths[-1]) if len(self._starts) else 0
        shard_sizes = [len(t) for t in self.shard_tokens]
        if (
            len(self._lengths) != n_units
            or sum(shard_sizes) != n_tokens
            or covered != n_tokens
            or shard_sizes != [s["n_tokens"] for s in self.shards]
        ):
            raise CacheMismatchError(
                f"Token cache {self.root} is damaged (manifest says {n_units} units and "
                f"{n_tokens} tokens, files hold {len(self._lengths)} units and "
                f"{sum(shard_sizes)} tokens): {FIX}."
            )


def _require_format(root: Path, manifest: dict[str, Any]) -> None:
    """A cache of another layout (format 1: one tokens.bin), or one needing a feature this
    bgotrace does not know, would be misread: refuse it."""
    version = manifest.get("format_version")
    if version not in READABLE_FORMATS:
        newer = isinstance(version, int) and version > max(READABLE_FORMATS)
        fix = f"upgrade bgotrace, or {FIX}" if newer else FIX
        raise CacheMismatchError(
            f"Token cache {root} has format {version}, this bgotrace reads formats "
            f"{FORMAT_VERSION} (sharded) and {REQUIRES_FORMAT_VERSION} (with features): {fix}."
        )
    unknown = sorted(set(manifest.get("requires", [])) - KNOWN_FEATURES)
    if unknown:
        raise CacheMismatchError(
            f"Token cache {root} requires {', '.join(unknown)}, which this bgotrace does not "
            f"read (it would score the units wrongly): upgrade bgotrace, or {FIX}."
        )


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of a cache directory; a directory without one is not a usable cache."""
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise CacheMismatchError(
            f"Token cache directory {root} exists but has no {MANIFEST_FILE}, so it is "
            "incomplete or not a token cache: delete it, or pass --rebuild-cache."
        )
    return json.loads(path.read_text(encoding="utf-8"))


def get_token_cache(
    documents: Corpus,
    tokenizer: Any,
    chunking: ChunkingConfig,
    cache_dir: str | Path | None,
    *,
    label: str | None = None,
    rebuild: bool = False,
    progress: bool = True,
    verify: str = "quick",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
) -> TokenCache:
    """Open the cache in ``cache_dir`` if it matches the request, else build it.

    An existing cache made with another tokenizer, chunking or corpus is refused with a
    :class:`CacheMismatchError` listing each difference, unless ``rebuild`` is set.
    ``cache_dir=None`` uses :func:`default_cache_dir` (with ``label``, the corpus file's name).
    ``verify`` says how a corpus on disk is checked (:data:`VERIFY_MODES`).
    """
    if verify not in VERIFY_MODES:
        raise ConfigError(f"--verify-cache={verify!r} is unknown: use quick or full.")
    requested = requested_manifest(documents, tokenizer, chunking)
    if label is None and isinstance(documents, CorpusFiles):
        label = documents.label
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir(requested, label)
    build = _Build(documents, tokenizer, chunking, requested, progress, shard_tokens)
    with exclusive(root, what="token cache"):
        return _open_or_build(root, build, rebuild, verify, own_dir=cache_dir is None)


class _Build:
    """What to build a cache from, as one value (the request and how to fulfil it)."""

    def __init__(
        self,
        corpus: Corpus,
        tokenizer: Any,
        chunking: ChunkingConfig,
        requested: dict[str, Any],
        progress: bool,
        shard_tokens: int,
    ) -> None:
        self.corpus, self.tokenizer, self.chunking = corpus, tokenizer, chunking
        self.requested, self.progress, self.shard_tokens = requested, progress, shard_tokens

    def into(self, root: Path) -> None:
        build_token_cache(
            root, self.corpus, self.tokenizer, self.chunking, self.requested,
            progress=self.progress, shard_tokens=self.shard_tokens,
        )  # fmt: skip


def _open_or_build(
    root: Path, build: _Build, rebuild: bool, verify: str, own_dir: bool
) -> TokenCache:
    """The check-and-build of :func:`get_token_cache`; the caller holds the lock.

    A default directory (``own_dir``) whose corpus changed in place is simply rebuilt: it
    belongs to bgotrace and only ever held this corpus. An explicit one is refused.
    """
    if root.exists() and not root.is_dir():
        raise CacheMismatchError(
            f"Cache path {root} is a file, not a directory: choose another --cache-dir."
        )
    if rebuild or _is_absent_or_empty(root):
        _refuse_foreign_files(root)
        build.into(root)
        return TokenCache(root)
    stored = read_manifest(root)
    differences = cache_differences(stored, build.requested, build.corpus, full=verify == "full")
    if differences and own_dir:
        log.warning("Rebuilding token cache %s: %s.", root, "; ".join(differences))
        _refuse_foreign_files(root)
        build.into(root)
        return TokenCache(root)
    if differences:
        raise CacheMismatchError(
            f"Token cache {root} was built with other settings ({'; '.join(differences)}): {FIX}."
        )
    log.info("Reusing token cache %s (%d units).", root, stored.get("n_units", 0))
    return TokenCache(root)


def default_cache_dir(requested: dict[str, Any], label: str | None = None) -> Path:
    """Where a cache lives when no directory is given: named by its content, not its name.

    The key hashes every setting that :func:`manifest_differences` compares and the corpus
    (its fingerprint, or for a corpus on disk its files' names, sizes and sampled bytes), so
    two requests that may not share a cache never share a default directory. ``label`` (the
    corpus file's name) prefixes the key under ``.bgotrace-cache/`` so the directories can be
    told apart; without a label (an in-memory corpus) the cache goes to the system's
    temporary folder.
    """
    corpus = {key: requested[key] for key in (*CORPUS_KEYS, "corpus_source") if key in requested}
    key = sha256_text(canonical_json({**_comparable(requested), **corpus}))[:KEY_CHARS]
    if label is None:
        return Path(tempfile.gettempdir()) / "bgotrace-cache" / key
    return DEFAULT_PARENT / f"{label}-{key}"


def requested_manifest(
    documents: Corpus, tokenizer: Any, chunking: ChunkingConfig
) -> dict[str, Any]:
    """The manifest keys a cache for this request must have (counts are added at build).

    Documents in memory are fingerprinted here; a corpus on disk only by its files' names,
    sizes and samples (``corpus_source``), its full fingerprint being taken while it is read.
    """
    request = {
        "format_version": FORMAT_VERSION,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "tokenizer_name_or_path": str(getattr(tokenizer, "name_or_path", "") or ""),
        "chunking": chunking.to_dict(),
    }
    if isinstance(documents, CorpusFiles):
        root, files = documents.files()
        source = {**documents.identity(), "files": file_signature(root, files)}
        return {**request, "corpus_source": source}
    return {
        **request,
        "corpus_fingerprint": corpus_fingerprint(documents),
        "n_documents": len(documents),
    }


def cache_differences(
    stored: dict[str, Any], requested: dict[str, Any], corpus: Corpus, *, full: bool
) -> list[str]:
    """Every reason the stored cache does not fit the request (empty: reuse it)."""
    differences = manifest_differences(stored, requested)
    if not isinstance(corpus, CorpusFiles):
        return differences + _differ(stored, requested, CORPUS_KEYS)
    return differences or corpus_file_differences(stored, corpus, full=full)


def corpus_file_differences(
    stored: dict[str, Any], corpus: CorpusFiles, *, full: bool
) -> list[str]:
    """How a corpus on disk differs from the one a cache was built from.

    Files recorded at build are compared by :func:`file_differences`. A cache built from
    documents in memory, or with other fields, has no such record: the corpus is then read
    once (as a stream) and compared by its fingerprint.
    """
    recorded = stored.get("corpus_files")
    if recorded is not None and _identity(recorded) == corpus.identity():
        root, files = corpus.files()
        return file_differences(recorded["files"], root, files, full=full)
    hasher = CorpusHasher()
    for doc in corpus.documents():
        hasher.add(doc)
    now = {"corpus_fingerprint": hasher.hexdigest(), "n_documents": hasher.n_documents}
    return _differ(stored, now, CORPUS_KEYS)


def _identity(recorded: dict[str, Any]) -> dict[str, Any]:
    return {"fields": recorded.get("fields"), "split": recorded.get("split")}


def manifest_differences(stored: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    """``"key: stored X, requested Y"`` for each compared setting whose values differ."""
    old, new = _comparable(stored), _comparable(requested)
    return _differ(old, new, sorted(old.keys() | new.keys()), stored, requested)


def _differ(
    old: dict[str, Any],
    new: dict[str, Any],
    keys: Sequence[str],
    old_manifest: dict[str, Any] | None = None,
    new_manifest: dict[str, Any] | None = None,
) -> list[str]:
    return [
        f"{key}: stored {_show(key, old.get(key), old_manifest or old)}, "
        f"requested {_show(key, new.get(key), new_manifest or new)}"
        for key in keys
        if old.get(key) != new.get(key)
    ]


def _comparable(manifest: dict[str, Any]) -> dict[str, Any]:
    """Compared keys with chunking flattened to ``chunking.max_length`` etc.; the formats
    this bgotrace reads count as one (a request does not know if its corpus has masks)."""
    flat = {key: manifest.get(key) for key in COMPARED_KEYS}
    if flat["format_version"] in READABLE_FORMATS:
        flat["format_version"] = FORMAT_VERSION
    for key, value in (manifest.get("chunking") or {}).items():
        flat[f"chunking.{key}"] = value
    return flat


def _show(key: str, value: Any, manifest: dict[str, Any]) -> str:
    """Readable value: fingerprints abbreviated, the tokenizer's name added when known."""
    if not key.endswith("fingerprint") or not isinstance(value, str):
        return repr(value)
    name = manifest.get("tokenizer_name_or_path") if key.startswith("tokenizer") else None
    return f"{short(value)} ({name})" if name else short(value)


def _is_absent_or_empty(root: Path) -> bool:
    """A missing or empty directory holds nothing to protect, so it is simply built."""
    return not root.exists() or (root.is_dir() and not any(root.iterdir()))


def _refuse_foreign_files(root: Path) -> None:
    """Never delete a path that holds more than a cache (say, a mistyped --cache-dir)."""
    if not root.exists():
        return
    if not root.is_dir():
        raise CacheMismatchError(
            f"Cache path {root} is a file, not a directory: choose another --cache-dir."
        )
    known = CACHE_FILES + DERIVED_DIRS
    foreign = sorted(p.name for p in root.iterdir() if p.name not in known)
    if foreign:
        raise CacheMismatchError(
            f"Cache directory {root} holds files that are not part of a token cache "
            f"({', '.join(foreign[:3])}), so it is not replaced: choose another --cache-dir."
        )


def build_token_cache(
    root: Path,
    documents: Corpus,
    tokenizer: Any,
    chunking: ChunkingConfig,
    manifest: dict[str, Any],
    *,
    progress: bool = True,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
) -> None:
    """Build into a temporary sibling directory and rename it over ``root`` when complete."""
    if shard_tokens < 1:
        raise ConfigError(f"shard_tokens must be >= 1, got {shard_tokens}: pass a larger value.")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
    try:
        source = _corpus_record(documents)  # hashed before reading: an edit during it shows
        counts = _write_contents(tmp, documents, tokenizer, chunking, progress, shard_tokens)
        created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        request = {k: v for k, v in manifest.items() if k != "corpus_source"}
        _write_json(tmp / MANIFEST_FILE, {**request, **source, **counts, "created_at": created_at})
        _replace_dir(tmp, root)
    except BaseException:  # also Ctrl-C: leave neither a half cache nor the temporary dir
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "Built token cache %s: %d units, %d tokens in %d shard(s).",
        root, counts["n_units"], counts["n_tokens"], len(counts["shards"]),
    )  # fmt: skip


def _corpus_record(documents: Corpus) -> dict[str, Any]:
    """For a corpus on disk: its fields, split and files (sizes, mtimes, samples, sha256)."""
    if not isinstance(documents, CorpusFiles):
        return {}
    root, files = documents.files()
    return {"corpus_files": {**documents.identity(), "files": file_records(root, files)}}


def _write_contents(
    tmp: Path,
    documents: Corpus,
    tokenizer: Any,
    chunking: ChunkingConfig,
    progress: bool,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
) -> dict[str, Any]:
    """Stream batches of units into shards; the corpus is fingerprinted as it passes."""
    hasher = CorpusHasher()
    writer = ShardWriter(tmp, shard_tokens)
    total, measure = _progress_total(documents)
    render = conversation_renderer(tokenizer, chunking.unit_loss)
    try:
        with progress_task("Tokenizing", total, enabled=progress) as advance:
            stream, done = _hashed(_stream(documents), hasher), 0
            for batch in iter_chunked_batches(stream, tokenizer, chunking, render=render):
                writer.append(batch)
                told = measure(batch.documents)
                done += told
                advance(told)
            # A file's total is its bytes; its texts are fewer characters (JSON keys, ids,
            # escapes, multi-byte UTF-8): the estimate ends where the corpus does.
            advance(max(0, total - done))
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    features = {"format_version": REQUIRES_FORMAT_VERSION, "requires": ["loss-masks"]}
    if not writer.n_units:
        raise InputError(
            f"No unit of at least 2 tokens could be made from {hasher.n_documents} document(s): "
            "check the corpus texts (a document needs 2 tokens or more, EOS included)."
        )
    return {
        "corpus_fingerprint": hasher.hexdigest(),
        "n_documents": hasher.n_documents,
        "n_units": writer.n_units,
        "n_tokens": writer.n_tokens,
        "max_token_id": writer.max_token_id,
        "shards": shards,
        **(features if writer.has_masks else {}),
    }


def _stream(documents: Corpus) -> Iterator[Document]:
    return documents.documents() if isinstance(documents, CorpusFiles) else iter(documents)


def _hashed(documents: Iterator[Document], hasher: CorpusHasher) -> Iterator[Document]:
    for doc in documents:
        hasher.add(doc)
        yield doc


def _progress_total(documents: Corpus) -> tuple[int, Any]:
    """Progress in documents, or for a corpus on disk in characters of its file size."""
    if not isinstance(documents, CorpusFiles):
        return len(documents), len
    _, files = documents.files()
    return sum(p.stat().st_size for p in files), lambda docs: sum(len(d.text) for d in docs)


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def _replace_dir(new: Path, target: Path) -> None:
    """Put ``new`` at ``target``; an old target is moved aside first, then deleted."""
    if not target.exists():
        os.replace(new, target)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
