"""Build a benchmark with known training data: real texts plus planted facts, and queries.

A benchmark directory holds everything an evaluation needs and nothing model-specific::

    corpus.jsonl    one document per line: id, text, source (the training data)
    queries.jsonl   fact queries (ground truth: the documents that state the fact) and style
                    queries (held-out text of a source; ground truth: that source)
    manifest.json   format version, config, seed, counts and a hash of the two files

It is written to a temporary sibling directory and renamed into place when complete, so a
crashed build never leaves a directory that looks valid. Python::

    from bgotrace.bench.build import BenchConfig, build_benchmark, load_benchmark
    build_benchmark(BenchConfig(), "bench/default")        # needs the Debian text packages
    bench = load_benchmark("bench/default")

The default sizes (~1,200 documents per real source, 50 facts) give about 1.3M characters,
enough for a 4-layer, width-128 model to learn on 2 CPU cores in minutes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from bgotrace.bench import textsources
from bgotrace.bench.facts import fact_capacity, generate_facts
from bgotrace.errors import ConfigError, InputError
from bgotrace.eval.benchmark import (  # noqa: F401  (Benchmark, load_benchmark: re-exported)
    FORMAT_VERSION,
    Benchmark,
    content_hash,
    load_benchmark,
)

SOURCE_READERS: dict[str, Callable[..., list[dict]]] = {
    "fortunes": textsources.read_fortunes,
    "devil": textsources.read_devil,
    "foldoc": textsources.read_foldoc,
    "text": textsources.read_text_folder,  # needs a path in source_paths
}


@dataclass(frozen=True)
class BenchConfig:
    """What goes into a benchmark. Round-trips through JSON (stored in the manifest)."""

    sources: tuple[str, ...] = ("fortunes", "devil", "foldoc")
    """Real text sources, from: fortunes, devil, foldoc, text (a folder of *.txt files)."""
    source_paths: dict[str, str] = field(default_factory=dict)
    """Path per source, overriding the Debian location; required for "text"."""
    max_documents_per_source: int = 1200
    """Documents sampled from each real source (all of them if it has fewer)."""
    max_chars_per_document: int = 1500
    """Longer documents are cut at a word boundary so no single entry dominates training."""
    n_entities: int = 40
    """Invented entities (2 persons per organisation) that the facts are about."""
    n_facts: int = 50
    """Queried facts; each is planted in 1, 2 or 4 documents (see planting_counts)."""
    planting_counts: tuple[int, ...] = (1, 2, 4)
    """Numbers of documents stating a fact, cycled over the facts for an even mix."""
    paraphrased_fraction: float = 0.3
    """Share of facts whose plantings use other wording than the query."""
    held_out_fraction: float = 0.02
    """Share of each real source's sampled documents held out as style queries."""
    style_prompt_words: int = 8
    """Words of a held-out document used as the style query's prompt."""
    style_completion_words: int = 48
    """Words after the prompt used as its completion (the loss is on prompt and completion)."""
    validation_fraction: float = 0.5
    """Share of queries (per kind and source) in the validation split; the rest is test."""
    seed: int = 0
    """Seeds every random choice; the same config gives byte-identical files."""

    def __post_init__(self) -> None:
        self._check_sources()
        for name in ("max_documents_per_source", "n_entities", "style_prompt_words"):
            _require(getattr(self, name) >= 1, f"{name} must be at least 1")
        _require(self.style_completion_words >= 1, "style_completion_words must be at least 1")
        _require(self.max_chars_per_document >= 100, "max_chars_per_document must be >= 100")
        _require(self.n_facts >= 0, "n_facts must be >= 0")
        _require(
            self.n_facts <= fact_capacity(self.n_entities),
            f"n_facts={self.n_facts} is more than {self.n_entities} entities can hold "
            f"({fact_capacity(self.n_entities)}); raise n_entities",
        )
        _require(
            len(self.planting_counts) > 0 and min(self.planting_counts) >= 1,
            "planting_counts must be non-empty positive integers, e.g. (1, 2, 4)",
        )
        for name in ("paraphrased_fraction", "validation_fraction"):
            _require(0.0 <= getattr(self, name) <= 1.0, f"{name} must be in [0, 1]")
        _require(0.0 <= self.held_out_fraction <= 0.5, "held_out_fraction must be in [0, 0.5]")

    def _check_sources(self) -> None:
        _require(len(self.sources) > 0, "sources must name at least one real text source")
        unknown = sorted(set(self.sources) - set(SOURCE_READERS))
        _require(not unknown, f"unknown sources {unknown}; known: {sorted(SOURCE_READERS)}")
        _require(len(set(self.sources)) == len(self.sources), "sources has duplicates")
        extra = sorted(set(self.source_paths) - set(self.sources))
        _require(not extra, f"source_paths names sources not in sources: {extra}")
        _require(
            "text" not in self.sources or "text" in self.source_paths,
            'the "text" source needs a folder in source_paths["text"]',
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchConfig:
        """Inverse of :meth:`to_dict` (JSON turns tuples into lists)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        _require(not unknown, f"unknown BenchConfig fields {unknown}")
        values: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in data.items()
        }
        return cls(**values)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> BenchConfig:
        """A named preset (default, mid, cpu, or tiny for tests) with overrides."""
        if name not in PRESETS:
            raise ConfigError(f"Unknown benchmark preset {name!r}: use one of {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # Sized so that the base model and every retrain of leave-k-out and LDS fit a
    # 2-core CPU session (a tiny model trains on it in well under a minute).
    "cpu": {
        "max_documents_per_source": 150,
        "max_chars_per_document": 600,
        "n_entities": 16,
        "n_facts": 24,
        "held_out_fraction": 0.06,
        "style_prompt_words": 6,
        "style_completion_words": 18,  # prompt + completion stay within a 128-token context
    },
    # Between the two: 3x the cpu preset's texts, for a model whose retrain takes ~2
    # CPU-minutes (preset "tiny", 2 layers, width 64), so leave-k-out fits a session.
    "mid": {
        "max_documents_per_source": 450,
        "max_chars_per_document": 800,
        "n_entities": 24,
        "n_facts": 36,
        "held_out_fraction": 0.03,
        "style_prompt_words": 6,
        "style_completion_words": 18,  # prompt + completion stay within a 128-token context
    },
    "tiny": {
        "max_documents_per_source": 12,
        "max_chars_per_document": 600,
        "n_entities": 4,
        "n_facts": 6,
        "held_out_fraction": 0.25,
        "style_prompt_words": 4,
        "style_completion_words": 16,
    },
}


def _require(ok: bool, rule: str) -> None:
    if not ok:
        raise ConfigError(f"Invalid benchmark config: {rule}.")


# --------------------------------------------------------------------------- building


def stage_rng(seed: int, stage: str) -> np.random.Generator:
    """One independent stream per stage, so changing n_facts leaves the real-text sample as is."""
    return np.random.default_rng([seed, int(hashlib.sha256(stage.encode()).hexdigest()[:8], 16)])


def truncate_text(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = cut.rfind(" ")
    return cut[:space] if space > max_chars // 2 else cut


def load_source(config: BenchConfig, name: str) -> list[dict]:
    """All documents of a source, exact duplicates removed (the fortune files repeat a few
    quips): a held-out style query must not reappear in the corpus under another id."""
    reader = SOURCE_READERS[name]
    path = config.source_paths.get(name)
    if name == "text":  # books: pack paragraphs into documents of the configured size
        docs = reader(path, max_chars=config.max_chars_per_document)
    else:
        docs = reader(path) if path is not None else reader()
    first: dict[str, int] = {}
    for i, d in enumerate(docs):
        first.setdefault(d["text"], i)
    unique = [d for i, d in enumerate(docs) if first[d["text"]] == i]
    if not unique:
        raise InputError(f"Text source {name!r} has no documents: check its path.")
    return unique


def sample_source(docs: list[dict], config: BenchConfig, name: str) -> list[dict]:
    """A seeded sample of at most max_documents_per_source documents, in file order."""
    rng = stage_rng(config.seed, f"sample/{name}")
    n = min(config.max_documents_per_source, len(docs))
    picked = np.sort(rng.choice(len(docs), size=n, replace=False))
    return [
        {**docs[i], "text": truncate_text(docs[i]["text"], config.max_chars_per_document)}
        for i in picked
    ]


def _split_words(text: str, n_prompt: int, n_completion: int) -> tuple[str, str] | None:
    """Prompt = text through its n_prompt-th word; completion = the next words, whitespace
    (line breaks, indentation) kept, since layout is part of a source's style."""
    ends = [m.end() for m in re.finditer(r"\S+", text)]
    if len(ends) < n_prompt + max(1, n_completion // 4):
        return None
    stop = ends[min(n_prompt + n_completion, len(ends)) - 1]
    return text[: ends[n_prompt - 1]], text[ends[n_prompt - 1] : stop]


def _hold_out(docs: list[dict], config: BenchConfig, name: str) -> tuple[list[dict], list[dict]]:
    """Remove held-out documents from a source and turn them into style queries."""
    if config.held_out_fraction == 0:
        return docs, []
    n_words = (config.style_prompt_words, config.style_completion_words)
    eligible = [i for i, d in enumerate(docs) if _split_words(d["text"], *n_words)]
    n_hold = min(len(eligible), max(1, round(config.held_out_fraction * len(docs))))
    rng = stage_rng(config.seed, f"hold-out/{name}")
    held = {eligible[int(i)] for i in rng.choice(len(eligible), size=n_hold, replace=False)}
    queries = []
    for k, i in enumerate(sorted(held)):
        prompt, completion = _split_words(docs[i]["text"], *n_words) or ("", "")
        queries.append(
            {"id": f"style-{docs[i]['source']}-{k:03d}", "prompt": prompt, "completion": completion,
             "kind": "style", "loss_on": "all", "true_source": docs[i]["source"],
             "held_out_doc_id": docs[i]["id"]}
        )  # fmt: skip
    return [d for i, d in enumerate(docs) if i not in held], queries


def vocabulary_of(docs: list[dict]) -> set[str]:
    """Lower-cased words of the real texts: invented names must avoid all of them."""
    return {w for d in docs for w in re.findall(r"[a-z]+", d["text"].lower())}


def _assign_splits(queries: list[dict], config: BenchConfig) -> None:
    """Put validation_fraction of each group (fact, style per source) in "validation"."""
    groups: dict[str, list[dict]] = {}
    for q in queries:
        groups.setdefault(f"{q['kind']}/{q['true_source']}", []).append(q)
    for key, members in sorted(groups.items()):
        order = stage_rng(config.seed, f"split/{key}").permutation(len(members))
        n_val = round(config.validation_fraction * len(members))
        for rank, i in enumerate(order):
            members[int(i)]["split"] = "validation" if rank < n_val else "test"


def _compose(config: BenchConfig) -> tuple[list[dict], list[dict]]:
    """All documents (shuffled) and queries of the benchmark, in memory."""
    real, style_queries = [], []
    vocabulary: set[str] = set()
    for name in config.sources:
        docs = load_source(config, name)
        vocabulary |= vocabulary_of(docs)
        kept, queries = _hold_out(sample_source(docs, config, name), config, name)
        real += kept
        style_queries += queries
    fact_docs, fact_queries = generate_facts(
        n_entities=config.n_entities, n_facts=config.n_facts, seed=config.seed,
        forbidden_words=vocabulary, planting_counts=config.planting_counts,
        paraphrased_fraction=config.paraphrased_fraction,
    )  # fmt: skip
    documents = real + fact_docs
    order = stage_rng(config.seed, "corpus-order").permutation(len(documents))
    queries = fact_queries + style_queries
    _assign_splits(queries, config)
    return [documents[int(i)] for i in order], queries


def _counts(documents: list[dict], queries: list[dict]) -> dict[str, Any]:
    docs_by_source: dict[str, int] = {}
    chars_by_source: dict[str, int] = {}
    for d in documents:
        docs_by_source[d["source"]] = docs_by_source.get(d["source"], 0) + 1
        chars_by_source[d["source"]] = chars_by_source.get(d["source"], 0) + len(d["text"])
    query_groups: dict[str, int] = {}
    for q in queries:
        key = f"{q['kind']}/{q['split']}"
        query_groups[key] = query_groups.get(key, 0) + 1
    return {
        "documents": len(documents), "characters": sum(chars_by_source.values()),
        "documents_by_source": docs_by_source, "characters_by_source": chars_by_source,
        "queries": len(queries), "queries_by_kind_and_split": dict(sorted(query_groups.items())),
    }  # fmt: skip


def _jsonl(records: list[dict]) -> bytes:
    lines = (json.dumps(r, ensure_ascii=False, sort_keys=True) for r in records)
    return "".join(f"{line}\n" for line in lines).encode("utf-8")


def build_benchmark(
    config: BenchConfig, out_dir: str | Path, *, overwrite: bool = False
) -> dict[str, Any]:
    """Build the benchmark into ``out_dir`` and return its manifest.

    Query fields: ``id``, ``prompt``, ``completion``, ``kind`` ("fact" or "style"),
    ``loss_on`` ("completion" for facts, "all" for style), ``true_source``, ``split``
    ("validation" or "test"); facts add ``relevant_doc_ids``, ``distractor_doc_ids``,
    ``paraphrased``, ``n_plantings``, ``entity``, ``attribute``; style queries add
    ``held_out_doc_id`` (a document that is *not* in the corpus).
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise InputError(f"Benchmark directory {out} exists: pass overwrite=True or another path.")
    documents, queries = _compose(config)
    tmp = out.with_name(f".{out.name}.part-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "corpus.jsonl").write_bytes(_jsonl(documents))
    (tmp / "queries.jsonl").write_bytes(_jsonl(queries))
    manifest = {
        "format": "bgotrace-benchmark", "format_version": FORMAT_VERSION,
        "config": config.to_dict(), "seed": config.seed,
        "counts": _counts(documents, queries), "content_sha256": content_hash(tmp),
    }  # fmt: skip
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    _replace_dir(tmp, out)
    return manifest


def _replace_dir(new: Path, out: Path) -> None:
    """Move a complete directory into place; an old one is moved aside first, then deleted."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    new.rename(out)
    shutil.rmtree(old, ignore_errors=True)
