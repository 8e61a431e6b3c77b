"""Streaming, sharded token cache: shards change nothing a consumer sees, corpora on disk are
read as streams, their fingerprint is taken once and checked cheaply, and ``cache build``
prepares what ``attribute`` then reuses."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import bgotrace.cache.fingerprint as fingerprint
import bgotrace.cache.shards as shards
import bgotrace.cache.token_cache as token_cache
from bgotrace.cache import TokenCache, get_token_cache
from bgotrace.cache.fingerprint import SAMPLE_BYTES, SAMPLES
from bgotrace.cli.main import app
from bgotrace.corpus import (
    ChunkingConfig,
    CorpusFields,
    CorpusFiles,
    Document,
    corpus_fingerprint,
    iter_documents,
    load_documents,
    tokenize_and_chunk,
)
from bgotrace.errors import CacheMismatchError
from tests.conftest import make_tiny_tokenizer
from tests.models import tiny_gpt2

CHUNKING = ChunkingConfig(max_length=8, stride=2)
runner = CliRunner()


def many_documents(n: int = 40) -> list[Document]:
    words = "fox dog cat river sand Paris France code add mat warm quick brown lazy".split()
    rng = np.random.default_rng(0)
    return [
        Document(f"d{i}", " ".join(rng.choice(words, size=int(rng.integers(1, 30)))), f"s{i % 3}")
        for i in range(n)
    ]


def write_jsonl(path: Path, docs: list[Document]) -> Path:
    rows = [{"id": d.doc_id, "text": d.text, "source": d.source} for d in docs]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def assert_same_units(a: TokenCache, b: TokenCache) -> None:
    pd.testing.assert_frame_equal(a.units, b.units)
    for i in range(len(a)):
        np.testing.assert_array_equal(a.unit_tokens(i), b.unit_tokens(i))
        assert a.unit_text(i) == b.unit_text(i)


# ---------------------------------------------------------------- shards


def test_many_small_shards_hold_the_same_units_as_one(tiny_tokenizer: Any, tmp_path: Path) -> None:
    docs = many_documents()
    one = get_token_cache(docs, tiny_tokenizer, CHUNKING, tmp_path / "one", progress=False)
    many = get_token_cache(
        docs, tiny_tokenizer, CHUNKING, tmp_path / "many", progress=False, shard_tokens=50
    )
    assert len(one.shards) == 1 and len(many.shards) > 5
    assert_same_units(one, many)
    np.testing.assert_array_equal(one.tokens, many.tokens)
    assert many.max_token_id == one.max_token_id == int(one.tokens.max())
    reference = tokenize_and_chunk(docs, tiny_tokenizer, CHUNKING)  # the list path
    assert [many.unit_tokens(i).tolist() for i in range(len(many))] == [
        u.token_ids for u in reference
    ]
    texts = {d.doc_id: d.text for d in docs}
    assert [many.unit_text(i) for i in range(len(many))] == [
        texts[u.doc_id][u.char_start : u.char_end] for u in reference
    ]
    assert many.document_text("d7") == texts["d7"]


def test_a_shard_ends_at_a_document_boundary(tiny_tokenizer: Any, tmp_path: Path) -> None:
    docs = many_documents()
    cache = get_token_cache(
        docs, tiny_tokenizer, CHUNKING, tmp_path / "c", progress=False, shard_tokens=50
    )
    doc_ids = cache.units["doc_id"].to_numpy()
    bounds = np.cumsum([s["n_units"] for s in cache.shards])[:-1]
    assert all(doc_ids[b - 1] != doc_ids[b] for b in bounds)  # no document split over shards
    per_doc = cache.units.groupby("doc_id", sort=False)["length"].sum()
    for shard in cache.shards:  # over the bound only by one document (its last)
        assert shard["n_tokens"] <= 50 + per_doc.max()
        stored = pq.read_table(cache.root / shard["documents"]).num_rows
        assert stored == shard["n_documents"]
    assert sum(s["n_tokens"] for s in cache.shards) == cache.manifest["n_tokens"]


def test_scores_are_identical_with_one_or_many_shards(tmp_path: Path) -> None:
    tokenizer = make_tiny_tokenizer()
    model = tmp_path / "model"
    tiny_gpt2(tokenizer).save_pretrained(model)
    tokenizer.save_pretrained(model)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", many_documents(24))

    def scores(shard_tokens: int) -> pd.DataFrame:
        out = tmp_path / f"run{shard_tokens}"
        args = ["attribute", "--model", model, "--corpus", corpus, "--quiet", "--steps", "2"]
        args += ["--cache-dir", tmp_path / f"cache{shard_tokens}", "--max-length", "12"]
        args += ["--prompt", "The quick brown", "--completion", " fox jumps."]
        args += ["--shard-tokens", shard_tokens, "--out", out]
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return pd.read_parquet(out / "scores.parquet")

    one, many = scores(2**20), scores(30)
    assert len(TokenCache(tmp_path / "cache30").shards) > 3
    pd.testing.assert_frame_equal(one, many)  # exactly: the same tokens in the same batches


def test_unit_columns_read_in_batches_equal_the_table(
    tiny_tokenizer: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    docs = many_documents()
    cache = get_token_cache(docs, tiny_tokenizer, CHUNKING, tmp_path / "c", progress=False)
    monkeypatch.setattr(shards, "READ_BATCH", 3)  # every boundary case, many times over
    path = cache.root / "units.parquet"
    table = pd.read_parquet(path)
    names = ("start", "char_end")
    for got, name in zip(shards.unit_columns(path, names), names, strict=True):
        np.testing.assert_array_equal(got, table[name].to_numpy())
    ids = table["doc_id"].tolist()
    expected = [True] + [a != b for a, b in zip(ids[1:], ids[:-1], strict=True)]
    assert shards.document_starts(path).tolist() == expected
    reopened = TokenCache(cache.root)
    texts = {d.doc_id: d.text for d in docs}
    for i, row in enumerate(table.itertuples()):
        assert reopened.unit_text(i) == texts[row.doc_id][row.char_start : row.char_end]


def test_format_1_cache_is_refused_with_the_rebuild_advice(
    tiny_tokenizer: Any, tiny_documents: list[Document], tmp_path: Path
) -> None:
    root = tmp_path / "old"
    cache = get_token_cache(tiny_documents, tiny_tokenizer, CHUNKING, root, progress=False)
    manifest = {**cache.manifest, "format_version": 1}
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheMismatchError, match="has format 1.*--rebuild-cache"):
        TokenCache(root)
    with pytest.raises(CacheMismatchError, match="format_version: stored 1, requested 2"):
        get_token_cache(tiny_documents, tiny_tokenizer, CHUNKING, root, progress=False)
    rebuilt = get_token_cache(
        tiny_documents, tiny_tokenizer, CHUNKING, root, progress=False, rebuild=True
    )
    assert rebuilt.manifest["format_version"] == 2


# ---------------------------------------------------------------- streaming readers


def corpora(tmp_path: Path, docs: list[Document]) -> dict[str, str]:
    """The same documents as JSONL, a Parquet folder of two files, a saved dataset with
    splits; and a txt folder (whose ids and sources come from the paths)."""
    import datasets

    rows = {
        "id": [d.doc_id for d in docs],
        "text": [d.text for d in docs],
        "source": [d.source for d in docs],
    }
    (tmp_path / "pq").mkdir()
    half = len(docs) // 2
    for name, part in (("a", slice(0, half)), ("b", slice(half, None))):
        table = pa.table({k: v[part] for k, v in rows.items()})
        pq.write_table(table, tmp_path / "pq" / f"{name}.parquet")
    ds = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)})
    ds.save_to_disk(str(tmp_path / "ds"))
    for doc in docs:
        path = tmp_path / "txt" / doc.source / f"{doc.doc_id}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(doc.text, encoding="utf-8")
    return {
        "jsonl": str(write_jsonl(tmp_path / "c.jsonl", docs)),
        "parquet": str(tmp_path / "pq"),
        "dataset": f"{tmp_path / 'ds'}::train",
        "txt": str(tmp_path / "txt"),
    }


def test_streaming_readers_equal_the_list_loaders(tmp_path: Path) -> None:
    docs = many_documents(12)
    for kind, path in corpora(tmp_path, docs).items():
        streamed = iter_documents(path)
        assert not isinstance(streamed, list)
        assert list(streamed) == load_documents(path), kind
        if kind != "txt":
            assert load_documents(path) == docs, kind


def test_a_corpus_on_disk_caches_like_its_documents(tiny_tokenizer: Any, tmp_path: Path) -> None:
    docs = many_documents()
    path = write_jsonl(tmp_path / "corpus.jsonl", docs)
    memory = get_token_cache(docs, tiny_tokenizer, CHUNKING, tmp_path / "m", progress=False)
    disk = get_token_cache(
        CorpusFiles(str(path)), tiny_tokenizer, CHUNKING, tmp_path / "d", progress=False
    )
    assert_same_units(memory, disk)
    for key in ("corpus_fingerprint", "n_documents", "n_units", "n_tokens", "max_token_id"):
        assert disk.manifest[key] == memory.manifest[key], key
    assert disk.manifest["corpus_fingerprint"] == corpus_fingerprint(docs)
    (record,) = disk.manifest["corpus_files"]["files"]
    assert record["name"] == "corpus.jsonl" and record["size"] == path.stat().st_size
    # Either form of the same corpus reuses the other's cache.
    get_token_cache(docs, tiny_tokenizer, CHUNKING, tmp_path / "d", progress=False)
    get_token_cache(CorpusFiles(str(path)), tiny_tokenizer, CHUNKING, tmp_path / "m")
    other_fields = CorpusFiles(str(path), CorpusFields(source_field="id"))
    with pytest.raises(CacheMismatchError, match="corpus_fingerprint: stored"):
        get_token_cache(other_fields, tiny_tokenizer, CHUNKING, tmp_path / "d", progress=False)


def test_the_tokenizing_bar_of_a_corpus_file_ends_at_its_total(
    tiny_tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file's bar counts its bytes but advances by text characters (fewer: JSON keys, ids):
    it is finished when the corpus is, not left at a fraction."""
    from contextlib import contextmanager

    bars: list[list[int]] = []

    @contextmanager
    def recorded(description: str, total: int, **_: Any):
        bars.append([total, 0])
        yield lambda n, status="": bars[-1].__setitem__(1, bars[-1][1] + n)

    monkeypatch.setattr(token_cache, "progress_task", recorded)
    path = write_jsonl(tmp_path / "corpus.jsonl", many_documents())
    get_token_cache(CorpusFiles(str(path)), tiny_tokenizer, CHUNKING, tmp_path / "c")
    assert bars == [[path.stat().st_size, path.stat().st_size]]


# ---------------------------------------------------------------- fingerprint checks


@pytest.fixture
def big_corpus(tmp_path: Path) -> Path:
    """A JSONL file much larger than the sampled ranges, so some edits fall between them."""
    docs = many_documents(2000)
    path = write_jsonl(tmp_path / "big.jsonl", docs)
    assert path.stat().st_size > 4 * SAMPLES * SAMPLE_BYTES
    return path


def open_cache(path: Path, root: Path, **kwargs: Any) -> TokenCache:
    tokenizer = make_tiny_tokenizer()
    return get_token_cache(
        CorpusFiles(str(path)), tokenizer, CHUNKING, root, progress=False, **kwargs
    )


def edit_in_place(path: Path, offset: int, keep_mtime: bool) -> None:
    """Swap one lower-case letter for another at ``offset``: same size, valid JSON."""
    stat = path.stat()
    data = bytearray(path.read_bytes())
    offset = next(i for i in range(offset, len(data)) if chr(data[i]).isalpha() and data[i] > 96)
    data[offset] = ord("a") if data[offset] != ord("a") else ord("b")
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def unsampled_offset(size: int) -> int:
    """An offset halfway between the first two sampled ranges."""
    step = (size - SAMPLE_BYTES) // (SAMPLES - 1)
    return SAMPLE_BYTES + (step - SAMPLE_BYTES) // 2


def test_quick_check_reuses_without_reading_the_corpus(
    big_corpus: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    first = open_cache(big_corpus, tmp_path / "c")
    monkeypatch.setattr(CorpusFiles, "documents", lambda self: pytest.fail("corpus was read"))
    monkeypatch.setattr(fingerprint, "file_sha256", lambda p: pytest.fail("file was hashed"))
    assert open_cache(big_corpus, tmp_path / "c").manifest == first.manifest


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("append", "corpus file big.jsonl: size stored"),
        ("edit sampled byte, same mtime", "corpus file big.jsonl: sampled content differs"),
        ("edit between samples, new mtime", "corpus file big.jsonl: content sha256 stored"),
        ("new file", "corpus file extra.parquet: new"),
    ],
)
def test_quick_check_catches_a_changed_file(
    tmp_path: Path, big_corpus: Path, change: str, expected: str
) -> None:
    target = big_corpus
    if change == "new file":  # a folder corpus: one more file
        folder = tmp_path / "folder"
        folder.mkdir()
        pq.write_table(pa.table({"text": ["one document"]}), folder / "base.parquet")
        target = folder
    open_cache(target, tmp_path / "c")
    if change == "append":
        with big_corpus.open("a") as handle:
            handle.write(json.dumps({"text": "one more"}) + "\n")
    elif change == "edit sampled byte, same mtime":
        edit_in_place(big_corpus, 10, keep_mtime=True)
    elif change == "edit between samples, new mtime":
        edit_in_place(big_corpus, unsampled_offset(big_corpus.stat().st_size), keep_mtime=False)
    else:
        pq.write_table(pa.table({"text": ["another"]}), folder / "extra.parquet")
    with pytest.raises(CacheMismatchError, match=expected) as info:
        open_cache(target, tmp_path / "c")
    assert "--rebuild-cache" in str(info.value) and "\n" not in str(info.value)


def test_only_the_full_check_catches_a_same_size_same_mtime_edit(
    tmp_path: Path, big_corpus: Path
) -> None:
    open_cache(big_corpus, tmp_path / "c")
    edit_in_place(big_corpus, unsampled_offset(big_corpus.stat().st_size), keep_mtime=True)
    assert len(open_cache(big_corpus, tmp_path / "c")) > 0  # the documented blind spot
    with pytest.raises(CacheMismatchError, match="content sha256 stored"):
        open_cache(big_corpus, tmp_path / "c", verify="full")


def test_a_touched_but_unchanged_file_is_reused(tmp_path: Path, big_corpus: Path) -> None:
    first = open_cache(big_corpus, tmp_path / "c")
    os.utime(big_corpus, ns=(0, big_corpus.stat().st_mtime_ns + 10**9))
    assert open_cache(big_corpus, tmp_path / "c").manifest == first.manifest


def test_default_directory_follows_the_corpus(
    tmp_path: Path, big_corpus: Path, monkeypatch: Any
) -> None:
    monkeypatch.chdir(tmp_path)
    first = open_cache(big_corpus, None)
    assert first.root.parent == token_cache.DEFAULT_PARENT
    assert first.root.name.startswith("big.jsonl-")
    with big_corpus.open("a") as handle:  # new size: a new key, a new directory
        handle.write(json.dumps({"text": "one more document"}) + "\n")
    second = open_cache(big_corpus, None)
    assert second.root != first.root and second.manifest["n_documents"] == 2001
    # Same size and samples but new content: same key; bgotrace's own directory is rebuilt.
    edit_in_place(big_corpus, unsampled_offset(big_corpus.stat().st_size), keep_mtime=False)
    third = open_cache(big_corpus, None)
    assert third.root == second.root
    assert third.manifest["corpus_fingerprint"] != second.manifest["corpus_fingerprint"]


# ---------------------------------------------------------------- cache build


def test_cache_build_prepares_what_attribute_reuses(tmp_path: Path, monkeypatch: Any) -> None:
    tokenizer = make_tiny_tokenizer()
    model = tmp_path / "model"
    tiny_gpt2(tokenizer).save_pretrained(model)
    tokenizer.save_pretrained(model)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", many_documents(16))
    monkeypatch.chdir(tmp_path)  # the default cache directory is relative to the cwd
    args = ["cache", "build", "--model", model, "--corpus", corpus, "--max-length", "12"]
    result = runner.invoke(app, [str(a) for a in [*args, "--quiet", "--normalizer"]])
    assert result.exit_code == 0, result.output
    root = Path(result.stdout.strip().splitlines()[-1].split("\t")[0])
    assert root.parent == token_cache.DEFAULT_PARENT and "shard(s)" in result.output
    built = TokenCache(root)
    assert len(list((root / "sensitivity").glob("*.npz"))) == 1
    monkeypatch.setattr(
        token_cache, "_write_contents", lambda *a, **k: pytest.fail("the cache was rebuilt")
    )
    run = ["attribute", "--model", model, "--corpus", corpus, "--max-length", "12", "--quiet"]
    run += ["--steps", "1", "--prompt", "The quick", "--completion", " fox."]
    run += ["--out", tmp_path / "run"]
    result = runner.invoke(app, [str(a) for a in run])
    assert result.exit_code == 0, result.output
    assert TokenCache(root).manifest == built.manifest
    assert len(list((root / "sensitivity").glob("*.npz"))) == 1  # reused, not recomputed


def test_cache_build_errors_are_one_line(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["cache", "build", "--model", str(tmp_path), "--corpus", str(tmp_path / "no.jsonl")]
    )
    assert result.exit_code != 0
    assert "does not exist" in result.output
