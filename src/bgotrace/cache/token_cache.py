"""Token cache: the corpus tokenized and chunked once, memory-mapped by every later stage.

Layout of a cache directory::

    tokens.bin         flat uint32 token ids of all units, back to back      (n_tokens,)
    units.parquet      unit_id, doc_id, source, start, length, char_start, char_end
    documents.parquet  doc_id, source, text (for snippets in reports)
    manifest.json      format version, fingerprints, chunking, counts, created_at

A cache is reused only if its manifest matches the request (same tokenizer, chunking and
corpus); otherwise the user is told what differs, since silently mixing tokens from two
tokenizers would corrupt every score. The manifest is written last and the directory is
renamed into place, so a directory with a manifest is always complete. Checking and building
happen under an inter-process lock (``bgotrace.cache.locking``), so two runs that start on
the same directory at once build it once and both use that build.

Without an explicit directory a cache goes to a location keyed by its content (corpus,
tokenizer, chunking: :func:`default_cache_dir`), so two corpora of the same file name never
meet in one directory; an explicit directory made with other settings is refused instead.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from bgotrace.cache.fingerprint import canonical_json, sha256_text, short, tokenizer_fingerprint
from bgotrace.cache.locking import exclusive
from bgotrace.corpus.chunking import ChunkingConfig, Unit, iter_unit_batches
from bgotrace.corpus.documents import Document, corpus_fingerprint
from bgotrace.errors import CacheMismatchError, InputError
from bgotrace.runtime.progress import progress_task

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bump when the layout changes; old caches are then refused instead of misread."""

TOKEN_DTYPE = np.uint32
TOKENS_FILE = "tokens.bin"
UNITS_FILE = "units.parquet"
DOCUMENTS_FILE = "documents.parquet"
MANIFEST_FILE = "manifest.json"
CACHE_FILES = (TOKENS_FILE, UNITS_FILE, DOCUMENTS_FILE, MANIFEST_FILE)
DERIVED_DIRS = ("fisher", "kronfluence", "sensitivity")
"""Artefacts computed from a cache's units and kept beside it (keyed by its manifest);
a rebuild replaces them together with the cache."""

COMPARED_KEYS = ("format_version", "tokenizer_fingerprint", "corpus_fingerprint", "n_documents")
"""Manifest keys (besides each ``chunking.*`` setting) that must match for reuse."""

FIX = "use --rebuild-cache to rebuild it, or choose another --cache-dir"

DEFAULT_PARENT = Path(".bgotrace-cache")
"""Parent of the default cache directories of corpora read from files (relative to the cwd)."""
KEY_CHARS = 20
"""Hex characters of the content key in a default cache directory's name."""


class TokenCache:
    """Read-only view of a complete cache directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.manifest: dict[str, Any] = read_manifest(self.root)
        self.units: pd.DataFrame = pd.read_parquet(self.root / UNITS_FILE)
        self.tokens: np.ndarray = _open_tokens(self.root / TOKENS_FILE)  # (n_tokens,) uint32
        self._starts = self.units["start"].to_numpy(np.int64)  # (n_units,)
        self._lengths = self.units["length"].to_numpy(np.int64)  # (n_units,)
        self._texts: dict[str, str] | None = None
        self._check_consistent()

    def __len__(self) -> int:
        return len(self.units)

    def __repr__(self) -> str:
        return f"TokenCache({str(self.root)!r}, units={len(self)}, tokens={len(self.tokens)})"

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per unit, ``(n_units,)`` int64."""
        return self._lengths

    @property
    def max_token_id(self) -> int:
        """Largest token id in the cache (from the manifest; scanned for older caches)."""
        stored = self.manifest.get("max_token_id")
        if isinstance(stored, int):
            return stored
        return int(self.tokens.max()) if len(self.tokens) else -1

    def unit_tokens(self, i: int) -> np.ndarray:
        """Token ids of unit ``i``: a read-only view into the memory map, ``(length,)``."""
        start = self._starts[i]
        return self.tokens[start : start + self._lengths[i]]

    def unit_text(self, i: int) -> str:
        """The document text that unit ``i`` covers (its EOS, if any, covers none)."""
        row = self.units.iloc[i]
        return self.document_text(row["doc_id"])[row["char_start"] : row["char_end"]]

    def document_text(self, doc_id: str) -> str:
        """Full text of a document; the texts are read on first use, not at open."""
        if self._texts is None:
            table = pd.read_parquet(self.root / DOCUMENTS_FILE, columns=["doc_id", "text"])
            self._texts = dict(zip(table["doc_id"], table["text"], strict=True))
        return self._texts[doc_id]

    def _check_consistent(self) -> None:
        """Catch a cache edited or truncated after it was written, before it is misread."""
        n_units, n_tokens = self.manifest.get("n_units"), self.manifest.get("n_tokens")
        covered = int(self._starts[-1] + self._lengths[-1]) if n_units else 0
        if len(self.units) != n_units or len(self.tokens) != n_tokens or covered != n_tokens:
            raise CacheMismatchError(
                f"Token cache {self.root} is damaged (manifest says {n_units} units and "
                f"{n_tokens} tokens, files hold {len(self.units)} units and "
                f"{len(self.tokens)} tokens): {FIX}."
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


def _open_tokens(path: Path) -> np.ndarray:
    """Memory-map the token file read-only; numpy cannot map an empty file."""
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r")


def get_token_cache(
    documents: Sequence[Document],
    tokenizer: Any,
    chunking: ChunkingConfig,
    cache_dir: str | Path | None,
    *,
    label: str | None = None,
    rebuild: bool = False,
    progress: bool = True,
) -> TokenCache:
    """Open the cache in ``cache_dir`` if it matches the request, else build it.

    An existing cache made with another tokenizer, chunking or corpus is refused with a
    :class:`CacheMismatchError` listing each difference, unless ``rebuild`` is set.
    ``cache_dir=None`` uses :func:`default_cache_dir` (with ``label``, the corpus file's name).
    """
    requested = requested_manifest(documents, tokenizer, chunking)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir(requested, label)
    with exclusive(root, what="token cache"):
        return _open_or_build(root, documents, tokenizer, chunking, requested, rebuild, progress)


def _open_or_build(
    root: Path,
    documents: Sequence[Document],
    tokenizer: Any,
    chunking: ChunkingConfig,
    requested: dict[str, Any],
    rebuild: bool,
    progress: bool,
) -> TokenCache:
    """The check-and-build of :func:`get_token_cache`; the caller holds the lock."""
    if root.exists() and not root.is_dir():
        raise CacheMismatchError(
            f"Cache path {root} is a file, not a directory: choose another --cache-dir."
        )
    if rebuild or _is_absent_or_empty(root):
        _refuse_foreign_files(root)
        build_token_cache(root, documents, tokenizer, chunking, requested, progress=progress)
        return TokenCache(root)
    stored = read_manifest(root)
    differences = manifest_differences(stored, requested)
    if differences:
        raise CacheMismatchError(
            f"Token cache {root} was built with other settings ({'; '.join(differences)}): {FIX}."
        )
    log.info("Reusing token cache %s (%d units).", root, stored.get("n_units", 0))
    return TokenCache(root)


def default_cache_dir(requested: dict[str, Any], label: str | None = None) -> Path:
    """Where a cache lives when no directory is given: named by its content, not its name.

    The key hashes every setting that :func:`manifest_differences` compares, so two requests
    that may not share a cache never share a default directory. ``label`` (the corpus file's
    name) prefixes the key under ``.bgotrace-cache/`` so the directories can be told apart;
    without a label (an in-memory corpus) the cache goes to the system's temporary folder.
    """
    key = sha256_text(canonical_json(_comparable(requested)))[:KEY_CHARS]
    if label is None:
        return Path(tempfile.gettempdir()) / "bgotrace-cache" / key
    return DEFAULT_PARENT / f"{label}-{key}"


def requested_manifest(
    documents: Sequence[Document], tokenizer: Any, chunking: ChunkingConfig
) -> dict[str, Any]:
    """The manifest keys a cache for this request must have (counts are added at build)."""
    return {
        "format_version": FORMAT_VERSION,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "tokenizer_name_or_path": str(getattr(tokenizer, "name_or_path", "") or ""),
        "chunking": chunking.to_dict(),
        "corpus_fingerprint": corpus_fingerprint(documents),
        "n_documents": len(documents),
    }


def manifest_differences(stored: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    """``"key: stored X, requested Y"`` for each compared key whose values differ."""
    old, new = _comparable(stored), _comparable(requested)
    return [
        f"{key}: stored {_show(key, old.get(key), stored)}, "
        f"requested {_show(key, new.get(key), requested)}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key)
    ]


def _comparable(manifest: dict[str, Any]) -> dict[str, Any]:
    """Compared keys with chunking flattened to ``chunking.max_length`` etc."""
    flat = {key: manifest.get(key) for key in COMPARED_KEYS}
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
    documents: Sequence[Document],
    tokenizer: Any,
    chunking: ChunkingConfig,
    manifest: dict[str, Any],
    *,
    progress: bool = True,
) -> None:
    """Build into a temporary sibling directory and rename it over ``root`` when complete."""
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
    try:
        counts = _write_contents(tmp, documents, tokenizer, chunking, progress)
        created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        _write_json(tmp / MANIFEST_FILE, {**manifest, **counts, "created_at": created_at})
        _replace_dir(tmp, root)
    except BaseException:  # also Ctrl-C: leave neither a half cache nor the temporary dir
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "Built token cache %s: %d units, %d tokens.", root, counts["n_units"], counts["n_tokens"]
    )


def _write_contents(
    tmp: Path,
    documents: Sequence[Document],
    tokenizer: Any,
    chunking: ChunkingConfig,
    progress: bool,
) -> dict[str, int]:
    """Stream tokens to ``tokens.bin`` batch by batch; write both tables at the end."""
    rows = _UnitRows()
    with (
        (tmp / TOKENS_FILE).open("wb") as out,
        progress_task("Tokenizing", len(documents), enabled=progress) as advance,
    ):
        for n_done, units in iter_unit_batches(documents, tokenizer, chunking):
            for unit in units:
                out.write(np.asarray(unit.token_ids, dtype=TOKEN_DTYPE).tobytes())
                rows.add(unit)
            advance(n_done)
    if not rows.n_units:
        raise InputError(
            f"No unit of at least 2 tokens could be made from {len(documents)} document(s): "
            "check the corpus texts (a document needs 2 tokens or more, EOS included)."
        )
    pq.write_table(rows.table(), tmp / UNITS_FILE)
    pq.write_table(_documents_table(documents), tmp / DOCUMENTS_FILE)
    return {"n_units": rows.n_units, "n_tokens": rows.n_tokens, "max_token_id": rows.max_token_id}


class _UnitRows:
    """Columns of ``units.parquet``, gathered while the token file is written."""

    def __init__(self) -> None:
        self.columns: dict[str, list[Any]] = {
            name: []
            for name in ("unit_id", "doc_id", "source", "start", "length", "char_start", "char_end")
        }
        self.n_tokens = 0
        self.max_token_id = -1

    @property
    def n_units(self) -> int:
        return len(self.columns["unit_id"])

    def add(self, unit: Unit) -> None:
        values = (
            unit.unit_id,
            unit.doc_id,
            unit.source,
            self.n_tokens,
            len(unit.token_ids),
            unit.char_start,
            unit.char_end,
        )
        for column, value in zip(self.columns.values(), values, strict=True):
            column.append(value)
        self.n_tokens += len(unit.token_ids)
        self.max_token_id = max(self.max_token_id, max(unit.token_ids))

    def table(self) -> pa.Table:
        types = {
            "start": pa.int64(),
            "length": pa.int32(),
            "char_start": pa.int64(),
            "char_end": pa.int64(),
        }
        return pa.table(
            {
                name: pa.array(values, type=types.get(name, pa.string()))
                for name, values in self.columns.items()
            }
        )


def _documents_table(documents: Sequence[Document]) -> pa.Table:
    return pa.table(
        {
            "doc_id": pa.array([d.doc_id for d in documents], type=pa.string()),
            "source": pa.array([d.source for d in documents], type=pa.string()),
            "text": pa.array([d.text for d in documents], type=pa.large_string()),
        }
    )


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
