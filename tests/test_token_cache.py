"""Token cache: contents match the chunker, reuse is cheap, stale reuse is refused, builds are
atomic."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import bgotrace.cache.token_cache as token_cache
from bgotrace.cache import TokenCache, get_token_cache, tokenizer_fingerprint
from bgotrace.cache.locking import lock_path
from bgotrace.corpus import ChunkingConfig, Document, tokenize_and_chunk
from bgotrace.errors import CacheMismatchError, InputError

CHUNKING = ChunkingConfig(max_length=8, stride=2)
FIX = "use --rebuild-cache to rebuild it, or choose another --cache-dir"


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def build(docs: list[Document], tokenizer: Any, root: Path, **kwargs: Any) -> TokenCache:
    chunking = kwargs.pop("chunking", CHUNKING)
    return get_token_cache(docs, tokenizer, chunking, root, progress=False, **kwargs)


def siblings(root: Path) -> list[str]:
    """Everything next to the cache dir: temporary build dirs must not linger there.

    The lock file stays by design (bgotrace.cache.locking), so it is not listed."""
    return sorted(p.name for p in root.parent.iterdir() if p.name != lock_path(root).name)


# ---------------------------------------------------------------- contents


def test_cache_holds_exactly_the_chunker_units(
    tiny_tokenizer: Any, tiny_documents: list[Document], cache_dir: Path
) -> None:
    cache = build(tiny_documents, tiny_tokenizer, cache_dir)
    units = tokenize_and_chunk(tiny_documents, tiny_tokenizer, CHUNKING)
    assert len(cache) == len(units)
    assert isinstance(cache.tokens, np.memmap) and cache.tokens.dtype == np.uint32
    assert not cache.tokens.flags.writeable
    assert cache.lengths.tolist() == [len(u.token_ids) for u in units]
    texts = {d.doc_id: d.text for d in tiny_documents}
    for i, unit in enumerate(units):
        assert cache.unit_tokens(i).tolist() == unit.token_ids
        assert cache.unit_text(i) == texts[unit.doc_id][unit.char_start : unit.char_end]
    row = cache.units.iloc[0]
    assert (row["unit_id"], row["doc_id"], row["source"]) == ("fox#0", "fox", "animals")
    assert list(cache.units.columns) == [
        "unit_id", "doc_id", "source", "start", "length", "char_start", "char_end"
    ]  # fmt: skip


def test_manifest_records_what_the_cache_was_made_from(
    tiny_tokenizer: Any, tiny_documents: list[Document], cache_dir: Path
) -> None:
    cache = build(tiny_documents, tiny_tokenizer, cache_dir)
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest == cache.manifest
    assert manifest["chunking"] == {"max_length": 8, "stride": 2, "append_eos": True}
    assert manifest["tokenizer_fingerprint"] == tokenizer_fingerprint(tiny_tokenizer)
    assert manifest["n_documents"] == len(tiny_documents)
    assert manifest["n_units"] == len(cache) and manifest["n_tokens"] == len(cache.tokens)
    assert {"format_version", "corpus_fingerprint", "created_at", "tokenizer_name_or_path"} <= (
        manifest.keys()
    )
    assert sorted(p.name for p in cache_dir.iterdir()) == [
        "manifest.json",
        "shards",
        "units.parquet",
    ]
    assert sorted(p.name for p in (cache_dir / "shards").iterdir()) == [
        "documents-00000.parquet", "tokens-00000.bin"
    ]  # fmt: skip


def test_progress_bar_goes_to_stderr(
    tiny_tokenizer: Any, tiny_documents: list[Document], cache_dir: Path, capsys: Any
) -> None:
    get_token_cache(tiny_documents, tiny_tokenizer, CHUNKING, cache_dir, progress=True)
    assert capsys.readouterr().out == ""


def test_corpus_without_any_unit_is_refused(tiny_tokenizer: Any, cache_dir: Path) -> None:
    docs = [Document("d", "The", "s")]
    with pytest.raises(InputError, match="No unit of at least 2 tokens"):
        build(docs, tiny_tokenizer, cache_dir, chunking=ChunkingConfig(append_eos=False))
    assert siblings(cache_dir) == []


# ---------------------------------------------------------------- reuse and refusal


def test_second_call_reuses_without_tokenizing(
    tiny_tokenizer: Any, tiny_documents: list[Document], cache_dir: Path, monkeypatch: Any
) -> None:
    first = build(tiny_documents, tiny_tokenizer, cache_dir)
    mtime = (cache_dir / "manifest.json").stat().st_mtime_ns

    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(token_cache, "iter_chunked_batches", fail)
    second = build(tiny_documents, tiny_tokenizer, cache_dir)
    assert (cache_dir / "manifest.json").stat().st_mtime_ns == mtime
    assert second.manifest == first.manifest


def test_reloaded_tokenizer_matches_and_call_state_is_ignored(
    tiny_tokenizer: Any, tiny_documents: list[Document], cache_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    build(tiny_documents, tiny_tokenizer, cache_dir)
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    reloaded(["a b"], padding="max_length", max_length=9, truncation=True)  # sets backend state
    assert tokenizer_fingerprint(reloaded) == tokenizer_fingerprint(tiny_tokenizer)
    assert len(build(tiny_documents, reloaded, cache_dir)) > 0


def test_different_chunking_is_refused_with_both_values(
    tiny_tokenizer: Any, tiny_documents: list[Document], cache_dir: Path
) -> None:
    build(tiny_documents, tiny_tokenizer, cache_dir)
    other = ChunkingConfig(max_length=16, stride=2, append_eos=False)
    with pytest.raises(CacheMismatchError) as info:
        build(tiny_documents, tiny_tokenizer, cache_dir, chunking=other)
    message = str(info.value)
    assert "chunking.max_length: stored 8, requested 16" in message
    assert "chunking.append_eos: stored True, requested False" in message
    assert "stride" not in message and FIX in message and "\n" not in message


def test_different_tokenizer_is_refused(
    tiny_tokenizer: Any, other_tiny_tokenizer: Any, tiny_documents: list[Document], cache_dir: Path
) -> None:
    build(tiny_documents, tiny_tokenizer, cache_dir)
    with pytest.raises(CacheMismatchError, match=r"tokenizer_fingerprint: stored [0-9a-f]{12}"):
        build(tiny_documents, other_tiny_tokenizer, cache_dir)


def test_changed_corpus_is_refused(
    tiny_tokenizer: Any, tiny_documents: list[Document], cache_dir: Path
) -> None:
    build(tiny_documents, tiny_tokenizer, cache_dir)
    edited = [*tiny_documents[:-1], Document("cafe", "Changed text.", "code")]
    with pytest.raises(CacheMismatchError, match="corpus_fingerprint: stored") as info:
        build(edited, tiny_tokenizer, cache_dir)
    assert "n_documents" not in str(info.value)
    with pytest.raises(CacheMismatchError, match="n_documents: stored 6, requested 5"):
        build(tiny_documents[:5], tiny_tokenizer, cache_dir)


def test_rebuild_replaces_a_stale_cache(
    tiny_tokenizer: Any, tiny_documents: list[Document], cache_dir: Path
) -> None:
    build(tiny_documents, tiny_tokenizer, cache_dir)
    (cache_dir / "fisher").mkdir()  # derived from the old units: replaced with them
    (cache_dir / "fisher" / "old.safetensors").write_text("stale")
    other = ChunkingConfig(max_length=16)
    cache = build(tiny_documents, tiny_tokenizer, cache_dir, chunking=other, rebuild=True)
    assert not (cache_dir / "fisher").exists()
    assert cache.manifest["chunking"]["max_length"] == 16
    assert len(cache) == len(tokenize_and_chunk(tiny_documents, tiny_tokenizer, other))
    assert siblings(cache_dir) == ["cache"]


def test_directory_without_manifest(
    tiny_tokenizer: Any, tiny_documents: list[Document], cache_dir: Path
) -> None:
    cache_dir.mkdir()
    assert len(build(tiny_documents, tiny_tokenizer, cache_dir)) > 0  # empty dir: just built
    (cache_dir / "manifest.json").unlink()
    with pytest.raises(CacheMismatchError, match="has no manifest.json.*delete it, or pass"):
        build(tiny_documents, tiny_tokenizer, cache_dir)
    assert len(build(tiny_documents, tiny_tokenizer, cache_dir, rebuild=True)) > 0


def test_rebuild_never_deletes_foreign_files(
    tiny_tokenizer: Any, tiny_documents: list[Document], cache_dir: Path
) -> None:
    cache_dir.mkdir()
    (cache_dir / "thesis.tex").write_text("precious")
    with pytest.raises(CacheMismatchError, match=r"not part of a token cache \(thesis\.tex\)"):
        build(tiny_documents, tiny_tokenizer, cache_dir, rebuild=True)
    assert (cache_dir / "thesis.tex").read_text() == "precious"


def test_damaged_cache_is_detected(
    tiny_tokenizer: Any, tiny_documents: list[Document], cache_dir: Path
) -> None:
    build(tiny_documents, tiny_tokenizer, cache_dir)
    tokens = cache_dir / "shards" / "tokens-00000.bin"
    tokens.write_bytes(tokens.read_bytes()[:-8])
    with pytest.raises(CacheMismatchError, match="is damaged"):
        build(tiny_documents, tiny_tokenizer, cache_dir)


# ---------------------------------------------------------------- atomicity


def crash_after_first_batch(monkeypatch: Any, error: BaseException) -> None:
    """Make the build die after some tokens were written, as a killed job would."""
    real = token_cache.iter_chunked_batches

    def dying(*args: Any, **kwargs: Any) -> Any:
        batches = real(*args, **kwargs)
        yield next(batches)
        raise error

    monkeypatch.setattr(token_cache, "iter_chunked_batches", dying)


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_crash_mid_build_leaves_nothing(
    tiny_tokenizer: Any,
    tiny_documents: list[Document],
    cache_dir: Path,
    monkeypatch: Any,
    error: BaseException,
) -> None:
    crash_after_first_batch(monkeypatch, error)
    with pytest.raises(type(error)):
        build(tiny_documents, tiny_tokenizer, cache_dir)
    assert not (cache_dir / "manifest.json").exists()
    assert siblings(cache_dir) == []


def test_crash_during_rebuild_keeps_the_old_cache(
    tiny_tokenizer: Any, tiny_documents: list[Document], cache_dir: Path, monkeypatch: Any
) -> None:
    old = build(tiny_documents, tiny_tokenizer, cache_dir)
    crash_after_first_batch(monkeypatch, RuntimeError("boom"))
    with pytest.raises(RuntimeError):
        build(tiny_documents, tiny_tokenizer, cache_dir, rebuild=True)
    assert TokenCache(cache_dir).manifest == old.manifest
    assert siblings(cache_dir) == ["cache"]


# ---------------------------------------------------------------- default location


def test_default_location_is_keyed_by_content(
    tiny_documents: list[Document], tiny_tokenizer: Any, other_tiny_tokenizer: Any
) -> None:
    def where(docs: list[Document], tok: Any = tiny_tokenizer, chunking=CHUNKING) -> Path:
        requested = token_cache.requested_manifest(docs, tok, chunking)
        return token_cache.default_cache_dir(requested, "corpus.jsonl")

    first = where(tiny_documents)
    assert first.parent == token_cache.DEFAULT_PARENT
    assert first.name.startswith("corpus.jsonl-")
    assert where(list(tiny_documents)) == first  # same content, same place
    assert where(tiny_documents[:-1]) != first
    assert where(tiny_documents, other_tiny_tokenizer) != first
    assert where(tiny_documents, chunking=ChunkingConfig(max_length=8, stride=3)) != first
    in_memory = token_cache.default_cache_dir(
        token_cache.requested_manifest(tiny_documents, tiny_tokenizer, CHUNKING)
    )
    assert in_memory.parent.name == "bgotrace-cache" and in_memory.name == first.name[13:]


def test_cache_path_that_is_a_file_is_refused(
    tiny_documents: list[Document], tiny_tokenizer: Any, tmp_path: Path
) -> None:
    path = tmp_path / "afile"
    path.write_text("x")
    with pytest.raises(CacheMismatchError, match="is a file, not a directory"):
        build(tiny_documents, tiny_tokenizer, path)


def test_max_token_id_is_recorded(
    tiny_documents: list[Document], tiny_tokenizer: Any, cache_dir: Path
) -> None:
    cache = build(tiny_documents, tiny_tokenizer, cache_dir)
    assert cache.max_token_id == int(np.max(cache.tokens)) == cache.manifest["max_token_id"]
