"""Fingerprints that decide whether a stored artefact may be reused.

A fingerprint must change whenever the thing it summarises would produce different tokens, and
must not change otherwise. For a tokenizer that rules out hashing runtime state: transformers
switches truncation and padding on the backend tokenizer during calls, and that state shows up
in ``backend_tokenizer.to_str()``, so it is removed before hashing.

A corpus on disk is fingerprinted once, when its cache is built (full sha256 of its files,
plus sizes, mtimes and sampled byte ranges); later runs compare the cheap parts only and
hash a file again only when its mtime moved, or when a full check is asked for.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RUNTIME_KEYS = ("truncation", "padding")
"""Keys of the tokenizer JSON that hold call-time state, not the tokenizer itself."""


def sha256_text(*parts: str) -> str:
    """sha256 of several strings, each length-prefixed so ``("ab", "c") != ("a", "bc")``."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces: equal values give equal strings.

    Objects JSON does not know (e.g. ``AddedToken``) are written as their ``str``.
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def short(fingerprint: str, n: int = 12) -> str:
    """Abbreviation for messages; 12 hex characters are plenty to tell two apart."""
    return fingerprint[:n]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's definition (fast: ``tokenizer.json``; else: sorted vocab).

    Special tokens are included because EOS is appended to every document, and a different
    EOS (same vocab) would still change the cached tokens.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        for key in RUNTIME_KEYS:
            definition.pop(key, None)
        body = canonical_json(definition)
    else:
        body = canonical_json(sorted(tokenizer.get_vocab().items()))
    return sha256_text(body, canonical_json(_special_tokens(tokenizer)))


def _special_tokens(tokenizer: Any) -> dict[str, Any]:
    """Special token strings and ids, e.g. ``{"eos_token": "<|endoftext|>", "eos_token_id": 0}``."""
    special = dict(getattr(tokenizer, "special_tokens_map", {}) or {})
    special["eos_token_id"] = getattr(tokenizer, "eos_token_id", None)
    return special


# ---------------------------------------------------------------- corpus files

SAMPLES = 8
"""Byte ranges per file read by the quick check, spread evenly from its start to its end."""
SAMPLE_BYTES = 4096
"""Length of each sampled range."""
HASH_CHUNK = 1 << 20
"""Bytes read at a time while hashing a whole file (the file is never held in memory)."""


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sample_sha256(path: Path, size: int) -> str:
    """sha256 of :data:`SAMPLES` ranges of :data:`SAMPLE_BYTES` (the whole file when small)."""
    digest = hashlib.sha256()
    last = max(size - SAMPLE_BYTES, 0)
    with path.open("rb") as handle:
        for offset in sorted({last * i // (SAMPLES - 1) for i in range(SAMPLES)}):
            handle.seek(offset)
            digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest()


def file_signature(root: Path, files: Sequence[Path]) -> list[dict[str, Any]]:
    """Name, size and sampled content of each file: cheap, and blind to same-size edits
    between the samples (which the recorded full hash catches, see :func:`file_differences`)."""
    out = []
    for path in files:
        size = path.stat().st_size
        out.append({"name": _name(root, path), "size": size, "sample": sample_sha256(path, size)})
    return out


def file_records(root: Path, files: Sequence[Path]) -> list[dict[str, Any]]:
    """:func:`file_signature` plus each file's mtime and full sha256 (read once, at build)."""
    records = file_signature(root, files)
    for record, path in zip(records, files, strict=True):
        record["mtime_ns"] = path.stat().st_mtime_ns
        record["sha256"] = file_sha256(path)
    return records


def file_differences(
    stored: Sequence[dict[str, Any]], root: Path, files: Sequence[Path], *, full: bool
) -> list[str]:
    """How the corpus files differ from ``stored`` (:func:`file_records`), one line each.

    Quick (``full=False``): names, sizes and sampled bytes; a file whose mtime moved is hashed
    in full, so a touched but unchanged file passes and an edit that keeps the size is still
    caught. ``full=True`` hashes every file.
    """
    now = {_name(root, path): path for path in files}
    before = {record["name"]: record for record in stored}
    problems = [f"corpus file {name}: missing" for name in sorted(before.keys() - now.keys())]
    problems += [f"corpus file {name}: new" for name in sorted(now.keys() - before.keys())]
    for name in sorted(before.keys() & now.keys()):
        problem = _file_problem(before[name], now[name], full)
        if problem is not None:
            problems.append(f"corpus file {name}: {problem}")
    return problems


def _file_problem(record: dict[str, Any], path: Path, full: bool) -> str | None:
    stat = path.stat()
    if stat.st_size != record["size"]:
        return f"size stored {record['size']}, now {stat.st_size}"
    if sample_sha256(path, stat.st_size) != record["sample"]:
        return "sampled content differs"
    if (full or stat.st_mtime_ns != record["mtime_ns"]) and file_sha256(path) != record["sha256"]:
        return f"content sha256 stored {short(record['sha256'])}, now differs"
    return None


def _name(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()
