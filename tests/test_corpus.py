"""Corpus stage: every source format, stable ids, pointed errors, and chunking invariants."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bgotrace.corpus import (
    ChunkingConfig,
    CorpusFields,
    Document,
    corpus_fingerprint,
    documents_from_records,
    load_documents,
    tokenize_and_chunk,
)
from bgotrace.corpus.chunking import Unit, iter_unit_batches, window_bounds
from bgotrace.errors import ConfigError, InputError


def sha_id(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_parquet(path: Path, columns: dict[str, list[Any]]) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


# ---------------------------------------------------------------- ids and records


def test_records_keep_given_ids_as_strings_and_default_source() -> None:
    docs = documents_from_records([{"text": "a b", "id": 7, "source": "web"}, {"text": "c d"}])
    assert docs[0] == Document(doc_id="7", text="a b", source="web")
    assert docs[1] == Document(doc_id=sha_id("c d"), text="c d", source="default")


def test_identical_texts_without_ids_get_numbered_suffixes_in_order() -> None:
    docs = documents_from_records(["same", "other", "same", {"text": "same"}])
    base = sha_id("same")
    assert [d.doc_id for d in docs] == [base, sha_id("other"), f"{base}-1", f"{base}-2"]


def test_missing_or_null_id_falls_back_to_hash() -> None:
    docs = documents_from_records([{"text": "x y", "id": None, "source": None}])
    assert docs[0].doc_id == sha_id("x y") and docs[0].source == "default"


def test_duplicate_given_ids_name_both_records() -> None:
    records = [{"text": "a", "id": "d1"}, {"text": "b", "id": "d2"}, {"text": "c", "id": "d1"}]
    with pytest.raises(InputError, match=r"duplicate id 'd1' at record 1 and record 3"):
        documents_from_records(records)


def test_empty_texts_are_skipped_with_a_counted_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        docs = documents_from_records(["keep", "", "   \n", {"text": "\t"}])
    assert [d.text for d in docs] == ["keep"]
    assert "Skipped 3 empty" in caplog.text


def test_corpus_fingerprint_is_stable_and_sensitive() -> None:
    docs = documents_from_records([{"text": "a", "id": 1}, {"text": "b", "id": 2}])
    assert corpus_fingerprint(docs) == corpus_fingerprint(list(docs))
    assert corpus_fingerprint(docs) != corpus_fingerprint(docs[::-1])
    edited = [docs[0], Document(docs[1].doc_id, "b!", docs[1].source)]
    assert corpus_fingerprint(docs) != corpus_fingerprint(edited)
    moved = [docs[0], Document(docs[1].doc_id, docs[1].text, "other")]
    assert corpus_fingerprint(docs) != corpus_fingerprint(moved)


# ---------------------------------------------------------------- formats


def test_jsonl_with_ids_sources_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "one", "id": "a", "source": "s"}\n\n{"text": "two"}\n')
    docs = load_documents(path)
    assert [(d.doc_id, d.source) for d in docs] == [("a", "s"), (sha_id("two"), "default")]


def test_json_lines_and_json_array(tmp_path: Path) -> None:
    lines = write_jsonl(tmp_path / "lines.json", [{"text": "one"}, {"text": "two"}])
    array = tmp_path / "array.json"
    array.write_text(json.dumps([{"text": "one"}, {"text": "two"}], indent=2))
    assert load_documents(lines) == load_documents(array)


def test_custom_field_names(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [{"body": "hello", "key": 3, "origin": "x"}])
    fields = CorpusFields(text_field="body", id_field="key", source_field="origin")
    assert load_documents(str(path), fields) == [Document("3", "hello", "x")]


def test_parquet_file_and_folder(tmp_path: Path) -> None:
    single = write_parquet(tmp_path / "c.parquet", {"text": ["a b", "c d"], "id": [1, 2]})
    assert [d.doc_id for d in load_documents(single)] == ["1", "2"]
    folder = tmp_path / "shards"
    folder.mkdir()
    write_parquet(folder / "part-1.parquet", {"text": ["late"], "wide": [b"x" * 10]})
    write_parquet(folder / "part-0.parquet", {"text": ["early"], "wide": [b"y"]})
    assert [d.text for d in load_documents(folder)] == ["early", "late"]


def test_parquet_duplicate_ids_across_files_name_file_and_row(tmp_path: Path) -> None:
    write_parquet(tmp_path / "a.parquet", {"text": ["x", "y"], "id": ["k", "m"]})
    write_parquet(tmp_path / "b.parquet", {"text": ["z"], "id": ["m"]})
    with pytest.raises(InputError, match=r"'m' at a\.parquet row 2 and b\.parquet row 1"):
        load_documents(tmp_path)


def test_txt_folder_ids_and_sources(tmp_path: Path) -> None:
    (tmp_path / "wiki" / "deep").mkdir(parents=True)
    (tmp_path / "books").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "top.txt").write_text("root file")
    (tmp_path / "wiki" / "deep" / "a.txt").write_text("nested file")
    (tmp_path / "books" / "b.txt").write_text("book file")
    (tmp_path / ".hidden" / "c.txt").write_text("skipped")
    (tmp_path / "notes.md").write_text("not a txt")
    docs = load_documents(tmp_path)
    assert [(d.doc_id, d.source, d.text) for d in docs] == [
        ("books/b.txt", "books", "book file"),
        ("top.txt", "default", "root file"),
        ("wiki/deep/a.txt", "wiki", "nested file"),
    ]


def test_saved_dataset_and_dataset_dict(tmp_path: Path) -> None:
    import datasets

    rows = {"text": ["one", "two"], "id": [10, 11], "source": ["s", "t"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    assert [d.doc_id for d in load_documents(tmp_path / "ds")] == ["10", "11"]

    splits = {"train": rows, "validation": {"text": ["val"]}}
    dd = datasets.DatasetDict({k: datasets.Dataset.from_dict(v) for k, v in splits.items()})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert [d.text for d in load_documents(tmp_path / "dd")] == ["one", "two"]
    assert [d.text for d in load_documents(f"{tmp_path / 'dd'}::validation")] == ["val"]
    with pytest.raises(InputError, match=r"no split 'test' \(splits: train, validation\)"):
        load_documents(f"{tmp_path / 'dd'}::test")
    with pytest.raises(InputError, match="single dataset without splits"):
        load_documents(f"{tmp_path / 'ds'}::train")


def test_dataset_dict_without_train_lists_splits(tmp_path: Path) -> None:
    import datasets

    dd = datasets.DatasetDict({"a": datasets.Dataset.from_dict({"text": ["x"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(InputError, match=r"no 'train' split \(splits: a\).*::<split>"):
        load_documents(tmp_path / "dd")


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("c.jsonl", '{"text": "ok"}\n{"text": oops}\n', r"c\.jsonl line 2 is not valid JSON"),
        ("c.jsonl", '{"text": "ok"}\n\n{"body": "x", "id": 1}\n', r"line 3 has no 'text' field"),
        ("c.jsonl", '{"text": 5}\n', r"line 1 field 'text' is of type int, not a string"),
        ("c.jsonl", '{"text": null}\n', r"line 1 field 'text' is of type NoneType"),
        ("c.jsonl", '["not", "an", "object"]\n', r"line 1 is of type list, not a record"),
        ("c.jsonl", "\n  \n", r"c\.jsonl has no documents with non-empty text"),
        ("c.jsonl", '{"text": "  "}\n', r"no documents with non-empty text"),
        ("c.csv", "text\nhello\n", r"c\.csv has an unknown format: use a \.jsonl"),
    ],
)
def test_file_errors_point_at_the_record(
    tmp_path: Path, name: str, content: str, pattern: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InputError, match=pattern):
        load_documents(path)


def test_missing_text_field_lists_fields_and_suggests_flag(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [{"body": "x", "id": 1}])
    with pytest.raises(InputError) as info:
        load_documents(path)
    message = str(info.value)
    assert "line 1" in message and "fields: body, id" in message and "--text-field" in message
    assert "\n" not in message


def test_encoding_bom_and_non_utf8(tmp_path: Path) -> None:
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"text": "caf\xc3\xa9"}\n')
    assert [d.text for d in load_documents(bom)] == ["café"]
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(InputError, match=r"latin\.jsonl is not UTF-8 text"):
        load_documents(latin)


def test_parquet_without_text_column(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "c.parquet", {"content": ["x"], "id": [1]})
    with pytest.raises(InputError, match=r"row 1 has no 'text' field \(fields: content, id\)"):
        load_documents(path)


def test_path_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"does not exist"):
        load_documents(tmp_path / "nope.jsonl")
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(InputError, match=r"unknown format"):
        load_documents(tmp_path / "empty_folder")
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "x"}])
    with pytest.raises(InputError, match=r"not a saved datasets folder.*drop the '::train'"):
        load_documents(f"{path}::train")


# ---------------------------------------------------------------- chunking


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"max_length": 1}, "at least 2"),
        ({"max_length": 8, "stride": 8}, "stride must satisfy"),
        ({"max_length": 8, "stride": -1}, "stride must satisfy"),
        ({"max_length": 8.0}, "must be an integer"),
    ],
)
def test_chunking_config_validates(kwargs: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        ChunkingConfig(**kwargs)


@pytest.mark.parametrize(
    ("n", "max_length", "stride", "expected"),
    [
        (5, 8, 0, [(0, 5)]),
        (8, 8, 3, [(0, 8)]),
        (10, 4, 0, [(0, 4), (4, 8), (8, 10)]),
        (10, 4, 2, [(0, 4), (2, 6), (4, 8), (6, 10)]),
        (9, 4, 1, [(0, 4), (3, 7), (6, 9)]),
        (7, 4, 3, [(0, 4), (1, 5), (2, 6), (3, 7)]),
    ],
)
def test_window_bounds_hand_computed(
    n: int, max_length: int, stride: int, expected: list[tuple[int, int]]
) -> None:
    assert window_bounds(n, max_length, stride) == expected


def doc_tokens(tokenizer: Any, text: str, eos: bool = True) -> list[int]:
    """The slow, obvious reference: one document tokenized on its own."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [*ids, tokenizer.eos_token_id] if eos else ids


@pytest.mark.parametrize(("max_length", "stride"), [(8, 0), (8, 3), (5, 4), (2, 1), (512, 0)])
def test_windows_reassemble_each_document(
    tiny_tokenizer: Any, tiny_documents: list[Document], max_length: int, stride: int
) -> None:
    chunking = ChunkingConfig(max_length=max_length, stride=stride)
    units = tokenize_and_chunk(tiny_documents, tiny_tokenizer, chunking)
    for doc in tiny_documents:
        mine = [u for u in units if u.doc_id == doc.doc_id]
        assert [u.unit_id for u in mine] == [f"{doc.doc_id}#{k}" for k in range(len(mine))]
        assert all(2 <= len(u.token_ids) <= max_length and u.source == doc.source for u in mine)
        for before, after in zip(mine, mine[1:], strict=False):
            assert before.token_ids[len(before.token_ids) - stride :] == after.token_ids[:stride]
        rebuilt = mine[0].token_ids + [t for u in mine[1:] for t in u.token_ids[stride:]]
        assert rebuilt == doc_tokens(tiny_tokenizer, doc.text)
        assert len(mine) == len(window_bounds(len(rebuilt), max_length, stride))


def test_char_spans_map_back_to_the_text(
    tiny_tokenizer: Any, tiny_documents: list[Document]
) -> None:
    units = tokenize_and_chunk(tiny_documents, tiny_tokenizer, ChunkingConfig(max_length=6))
    texts = {d.doc_id: d.text for d in tiny_documents}
    eos = tiny_tokenizer.eos_token_id
    for unit in units:
        text = texts[unit.doc_id]
        assert 0 <= unit.char_start < unit.char_end <= len(text)
        if unit.doc_id != "cafe":  # byte pieces of one character decode to U+FFFD alone
            decoded = tiny_tokenizer.decode([t for t in unit.token_ids if t != eos])
            assert decoded.strip() == text[unit.char_start : unit.char_end].strip()
    for doc in tiny_documents:
        mine = [u for u in units if u.doc_id == doc.doc_id]
        assert mine[0].char_start == 0 and mine[-1].char_end == len(doc.text)
        assert all(a.char_end <= b.char_start + 1 for a, b in zip(mine, mine[1:], strict=False))


def test_eos_is_appended_once_per_document(
    tiny_tokenizer: Any, tiny_documents: list[Document]
) -> None:
    eos = tiny_tokenizer.eos_token_id
    # stride >= 1 keeps every last window >= 2 tokens; with stride 0 a lone EOS tail is dropped
    chunking = ChunkingConfig(max_length=7, stride=1)
    with_eos = tokenize_and_chunk(tiny_documents, tiny_tokenizer, chunking)
    assert sum(u.token_ids.count(eos) for u in with_eos) == len(tiny_documents)
    last = {u.doc_id: u for u in with_eos}
    assert all(u.token_ids[-1] == eos for u in last.values())
    plain = ChunkingConfig(max_length=7, append_eos=False)
    assert all(
        eos not in u.token_ids for u in tokenize_and_chunk(tiny_documents, tiny_tokenizer, plain)
    )


class NoEosTokenizer:
    """A fast tokenizer that has no EOS token, as some base tokenizers do."""

    is_fast = True
    eos_token_id = None

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.backend_tokenizer = inner.backend_tokenizer

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)


def test_tokenizer_without_eos_appends_nothing(tiny_tokenizer: Any) -> None:
    docs = [Document("d", "The quick brown fox.", "s")]
    units = tokenize_and_chunk(docs, NoEosTokenizer(tiny_tokenizer), ChunkingConfig())
    assert units[0].token_ids == doc_tokens(tiny_tokenizer, docs[0].text, eos=False)


def test_units_shorter_than_two_tokens_are_dropped(tiny_tokenizer: Any) -> None:
    one_token = tiny_tokenizer.convert_ids_to_tokens(300)  # a merged token: one id alone
    text = tiny_tokenizer.convert_tokens_to_string([one_token])
    assert len(doc_tokens(tiny_tokenizer, text, eos=False)) == 1
    docs = [Document("one", text, "s")]
    assert tokenize_and_chunk(docs, tiny_tokenizer, ChunkingConfig(append_eos=False)) == []
    assert len(tokenize_and_chunk(docs, tiny_tokenizer, ChunkingConfig())) == 1
    n = len(doc_tokens(tiny_tokenizer, "The quick brown fox jumps."))  # tail of 1 token:
    units = tokenize_and_chunk(
        [Document("d", "The quick brown fox jumps.", "s")], tiny_tokenizer, ChunkingConfig(n - 1)
    )
    assert [len(u.token_ids) for u in units] == [n - 1]


def test_batching_does_not_change_units(
    tiny_tokenizer: Any, tiny_documents: list[Document]
) -> None:
    chunking = ChunkingConfig(max_length=9, stride=2)
    batches = list(iter_unit_batches(iter(tiny_documents), tiny_tokenizer, chunking, 4))
    assert [n for n, _ in batches] == [4, 2]
    batched = [u for _, us in batches for u in us]
    assert batched == tokenize_and_chunk(tiny_documents, tiny_tokenizer, chunking)


def reference_units(docs: list[Document], tokenizer: Any, chunking: ChunkingConfig) -> list[Unit]:
    """The slow, obvious path (bgotrace before 2026-12): ``tokenizer(texts)`` and a Python loop
    over each document's windows."""
    encoded = tokenizer(
        [d.text for d in docs], add_special_tokens=False, return_offsets_mapping=True
    )
    eos = tokenizer.eos_token_id if chunking.append_eos else None
    bos = [] if chunking.bos_id is None else [chunking.bos_id]
    units = []
    for doc, ids, offsets in zip(
        docs, encoded["input_ids"], encoded["offset_mapping"], strict=True
    ):
        all_ids = [*ids, eos] if eos is not None else list(ids)
        bounds = window_bounds(len(all_ids), chunking.text_length, chunking.stride)
        for k, (start, end) in enumerate(bounds):
            if len(bos) + end - start < 2:
                continue
            window = offsets[start : min(end, len(ids))]
            span = (
                (min(a for a, _ in window), max(b for _, b in window))
                if window
                else (len(doc.text), len(doc.text))
            )
            tokens = bos + all_ids[start:end]
            units.append(Unit(f"{doc.doc_id}#{k}", doc.doc_id, doc.source, tokens, *span))
    return units


MIXED_TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 7,
    "a",
    "  leading and trailing spaces  ",
    "naïve café – “quotes” and emoji 🦊🦊 and CJK 日本語の文章",
    "def add(a, b): return a + b\n\n\tindented",
    "x" * 300,
    "<|endoftext|> inside a text",
]


@pytest.mark.parametrize(
    "chunking",
    [
        ChunkingConfig(max_length=8),
        ChunkingConfig(max_length=9, stride=3),
        ChunkingConfig(max_length=2, stride=1),
        ChunkingConfig(max_length=16, append_eos=False),
        ChunkingConfig(max_length=8, stride=2, bos_id=7),
        ChunkingConfig(max_length=3, bos_id=7, append_eos=False),
    ],
    ids=lambda c: str(c.to_dict()),
)
def test_array_chunking_equals_the_per_document_reference(
    tiny_tokenizer: Any, tiny_documents: list[Document], chunking: ChunkingConfig
) -> None:
    docs = [*tiny_documents, *(Document(f"m{i}", t, "m") for i, t in enumerate(MIXED_TEXTS))]
    expected = reference_units(docs, tiny_tokenizer, chunking)
    for batch_docs in (1, 3, 256):
        got = [
            u for _, us in iter_unit_batches(docs, tiny_tokenizer, chunking, batch_docs) for u in us
        ]
        assert got == expected


def test_caller_tokenizer_state_is_left_alone(
    tiny_tokenizer: Any, tiny_documents: list[Document]
) -> None:
    tiny_tokenizer(["a b c d"], truncation=True, max_length=2)  # leaves truncation on the backend
    before = tiny_tokenizer.backend_tokenizer.truncation
    units = tokenize_and_chunk(tiny_documents, tiny_tokenizer, ChunkingConfig(max_length=64))
    assert tiny_tokenizer.backend_tokenizer.truncation == before  # (the reference resets it)
    assert units == reference_units(tiny_documents, tiny_tokenizer, ChunkingConfig(max_length=64))


def test_slow_tokenizer_is_refused(tiny_documents: list[Document]) -> None:
    class Slow:
        is_fast = False
        name_or_path = "slow-tok"

    with pytest.raises(InputError, match="slow-tok is not a fast tokenizer"):
        tokenize_and_chunk(tiny_documents, Slow(), ChunkingConfig())


def test_unpaired_surrogate_is_refused_where_it_comes_in(tmp_path: Path) -> None:
    """JSON can escape half an emoji; no tokenizer or Parquet file can encode it."""
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "half an emoji \\ud83d"}\n')
    with pytest.raises(InputError, match=r"line 2 field 'text' holds an unpaired surrogate"):
        load_documents(path)
    with pytest.raises(InputError, match="field 'source' holds an unpaired surrogate"):
        documents_from_records([{"text": "ok", "source": "s\udcff"}])


@pytest.mark.parametrize(
    "files",
    [
        {"state.json": "junk"},
        {"state.json": '{"x": 1}', "dataset_info.json": "{"},
        {"state.json": '{"x": 1}', "dataset_info.json": "{}"},
    ],
)
def test_damaged_saved_dataset_is_refused(tmp_path: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(InputError, match="cannot be read .*: re-save it with save_to_disk"):
        load_documents(tmp_path)
