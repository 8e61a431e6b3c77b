"""What a benchmark directory holds, and how it is read (built by :mod:`bgotrace.bench.build`).

A benchmark directory holds everything an evaluation needs and nothing model-specific::

    corpus.jsonl    one document per line: id, text, source (the training data)
    queries.jsonl   fact and style queries with their ground truth
    manifest.json   format version, config, seed, counts and a hash of the two files

The evaluation reads benchmarks; the ``bench`` package (a layer above) builds them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from bgotrace.errors import InputError

FORMAT_VERSION = 1
"""Bumped whenever the files or their fields change meaning; old directories are refused."""

BENCH_FILES = ("corpus.jsonl", "queries.jsonl")


@dataclass(frozen=True)
class Benchmark:
    """A loaded benchmark directory."""

    root: Path
    documents: list[dict]
    """corpus.jsonl records: id, text, source."""
    queries: list[dict]
    """queries.jsonl records; see :func:`bgotrace.bench.build.build_benchmark` for their fields."""
    manifest: dict


def content_hash(root: Path) -> str:
    """SHA-256 of the benchmark's data files (recorded in, and checked against, its manifest)."""
    digest = hashlib.sha256()
    for name in BENCH_FILES:
        digest.update(name.encode())
        digest.update((root / name).read_bytes())
    return digest.hexdigest()


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_benchmark(root: str | Path) -> Benchmark:
    """Load a benchmark directory, refusing other format versions and altered files."""
    root = Path(root)
    rebuild = "rebuild it with `bgotrace bench build`"
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise InputError(f"{root} is not a benchmark directory (no manifest.json): {rebuild}.")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    version = manifest.get("format_version")
    if manifest.get("format") != "bgotrace-benchmark" or version != FORMAT_VERSION:
        raise InputError(
            f"Benchmark {root} has format version {version!r} but this bgotrace reads version "
            f"{FORMAT_VERSION}: {rebuild}."
        )
    missing = [name for name in BENCH_FILES if not (root / name).is_file()]
    if missing or content_hash(root) != manifest.get("content_sha256"):
        problem = f"lacks {missing}" if missing else "files do not match its manifest hash"
        raise InputError(f"Benchmark {root} {problem}: {rebuild}.")
    return Benchmark(
        root, _read_jsonl(root / "corpus.jsonl"), _read_jsonl(root / "queries.jsonl"), manifest
    )
