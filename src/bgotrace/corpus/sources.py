"""Read a corpus from disk, whatever form it comes in, into :class:`Document` objects.

Supported inputs (detected from the path):

* JSON lines: ``.jsonl`` or ``.json``, one object per line (a ``.json`` file holding one JSON
  array of objects is accepted too);
* Parquet: a ``.parquet`` file or a folder of them (read in sorted path order);
* a folder of ``.txt`` files, searched recursively: the id is the relative path and the source
  is the first sub-folder (``"default"`` for files directly in the folder);
* a Hugging Face ``datasets`` dataset saved with ``save_to_disk``; for a ``DatasetDict`` the
  ``train`` split is used, or the one named by a ``path::split`` suffix.

A record (row) of any of them may be an SFT conversation instead of a text: a ``messages``
list of ``{role, content}``, or ``prompt``/``completion`` (:mod:`bgotrace.corpus.documents`).

Every error names the file and the record (line or row) and says how to fix it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bgotrace.corpus.documents import (
    CONVERSATION_FIELDS,
    DEFAULT_FIELDS,
    DEFAULT_SOURCE,
    CorpusFields,
    Document,
    iter_documents_of,
)
from bgotrace.errors import InputError, first_line

JSON_SUFFIXES = (".jsonl", ".json")
HF_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")
SPLIT_SEPARATOR = "::"
DEFAULT_SPLIT = "train"
SUPPORTED = (
    "a .jsonl/.json file, a .parquet file or folder, a folder of .txt files, "
    "or a datasets folder saved with save_to_disk"
)

Located = Iterator[tuple[str, Mapping[str, Any]]]  # (location like "line 7", record)


def load_documents(path: str | Path, fields: CorpusFields = DEFAULT_FIELDS) -> list[Document]:
    """Load the corpus at ``path`` (optionally ``path::split``) as documents with stable ids.

    The whole corpus is held in memory; :func:`iter_documents` reads it one document at a time.
    """
    return list(iter_documents(path, fields))


def iter_documents(path: str | Path, fields: CorpusFields = DEFAULT_FIELDS) -> Iterator[Document]:
    """The documents of :func:`load_documents`, in the same order, read as a stream.

    The path and its format are checked at once; record errors surface as they are reached.
    """
    located, origin, record_fields = _open_corpus(path, fields)
    return iter_documents_of(located, record_fields, origin)


@dataclass(frozen=True)
class CorpusFiles:
    """A corpus on disk, not yet read: the token cache streams its documents and hashes its
    files instead of holding a list of documents."""

    path: str
    """Corpus path as the user gave it, optionally with a ``::split`` suffix."""
    fields: CorpusFields = DEFAULT_FIELDS
    """Record fields holding the text, id and source."""

    def __post_init__(self) -> None:
        self.files()  # a missing or unknown corpus is reported before anything else

    def documents(self) -> Iterator[Document]:
        return iter_documents(self.path, self.fields)

    def files(self) -> tuple[Path, list[Path]]:
        return corpus_files(self.path)

    @property
    def label(self) -> str:
        """The corpus file or folder name (prefix of its default cache directory)."""
        return _split_suffix(self.path)[0].name

    def identity(self) -> dict[str, Any]:
        """What besides the file bytes decides the documents: the fields and the split."""
        return {"fields": dataclasses.asdict(self.fields), "split": _split_suffix(self.path)[1]}


def corpus_files(path: str | Path) -> tuple[Path, list[Path]]:
    """``(root, files)``: the files whose bytes make up the corpus, under ``root``, sorted."""
    root, split = _split_suffix(str(path))
    _check_path(root, split)
    if _is_hf_dataset(root):
        return root, _files_with_suffix(root, "")
    if root.is_file() and root.suffix.lower() in (*JSON_SUFFIXES, ".parquet"):
        return root.parent, [root]
    for suffix in (".parquet", ".txt"):
        if root.is_dir() and (files := _files_with_suffix(root, suffix)):
            return root, files
    raise InputError(f"Corpus path {root} has an unknown format: use {SUPPORTED}.")


def _check_path(root: Path, split: str | None) -> None:
    if not root.exists():
        raise InputError(f"Corpus path {root} does not exist: check the path.")
    if split is not None and not _is_hf_dataset(root):
        raise InputError(
            f"Corpus path {root} is not a saved datasets folder, so it has no split "
            f"{split!r}: drop the '{SPLIT_SEPARATOR}{split}' suffix."
        )


def _open_corpus(path: str | Path, fields: CorpusFields) -> tuple[Located, str, CorpusFields]:
    """``(records with their locations, origin for messages, fields to read them with)``."""
    root, split = _split_suffix(str(path))
    _check_path(root, split)
    if _is_hf_dataset(root):
        return _hf_rows(root, split, fields), f"dataset {root}", fields
    if root.is_file() and root.suffix.lower() in JSON_SUFFIXES:
        return _json_records(root), f"file {root}", fields
    if root.is_file() and root.suffix.lower() == ".parquet":
        return _parquet_records([root], root.parent, fields), f"file {root}", fields
    if root.is_dir() and (parquet_files := _files_with_suffix(root, ".parquet")):
        return _parquet_records(parquet_files, root, fields), f"folder {root}", fields
    if root.is_dir() and (txt_files := _files_with_suffix(root, ".txt")):
        return _txt_records(root, txt_files), f"folder {root}", DEFAULT_FIELDS
    raise InputError(f"Corpus path {root} has an unknown format: use {SUPPORTED}.")


def _split_suffix(spec: str) -> tuple[Path, str | None]:
    """``"data/ds::validation"`` -> ``(Path("data/ds"), "validation")``."""
    if SPLIT_SEPARATOR not in spec:
        return Path(spec), None
    head, split = spec.rsplit(SPLIT_SEPARATOR, 1)
    if not split:
        raise InputError(f"Corpus path {spec!r} ends with an empty split name: use path::split.")
    return Path(head), split


def _files_with_suffix(root: Path, suffix: str) -> list[Path]:
    """Files under ``root`` (recursive, hidden parts skipped) in a stable, sorted order."""
    found = []
    for path in root.rglob(f"*{suffix}"):
        relative = path.relative_to(root)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            found.append(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _json_records(path: Path) -> Located:
    """Yield the records of a JSON-lines file; a ``.json`` file may hold one array instead."""
    with path.open(encoding="utf-8-sig") as handle:  # -sig: tolerate a byte-order mark
        try:
            if path.suffix.lower() == ".json" and _starts_with_array(handle):
                yield from _json_array_records(path, handle.read())
                return
            for line_no, line in enumerate(handle, start=1):
                if line.strip():
                    yield f"line {line_no}", _parse_json_line(path, line_no, line)
        except UnicodeDecodeError:
            raise InputError(
                f"Corpus file {path} is not UTF-8 text: convert it to UTF-8."
            ) from None


def _starts_with_array(handle: Any) -> bool:
    """Peek at the first non-space character without consuming the stream."""
    head = handle.read(4096).lstrip()
    handle.seek(0)
    return head.startswith("[")


def _parse_json_line(path: Path, line_no: int, line: str) -> Any:
    """Parse one line; the error carries the 1-based line number the user can jump to."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(
            f"Corpus file {path} line {line_no} is not valid JSON ({err.msg}): "
            "fix or remove that line."
        ) from None


def _json_array_records(path: Path, content: str) -> Located:
    try:
        records = json.loads(content)
    except json.JSONDecodeError as err:
        raise InputError(
            f"Corpus file {path} is not valid JSON ({err.msg} at line {err.lineno}): "
            "fix the file or write one JSON object per line."
        ) from None
    for i, record in enumerate(records, start=1):
        yield f"record {i}", record


def _parquet_records(files: list[Path], root: Path, fields: CorpusFields) -> Located:
    """Rows are located as "row 7", or "part-1.parquet row 7" when a folder has several files."""
    several = len(files) > 1
    for path in files:
        prefix = path.relative_to(root).as_posix() + " " if several else ""
        for i, record in enumerate(_parquet_rows(path, fields), start=1):
            yield f"{prefix}row {i}", record


def _parquet_rows(path: Path, fields: CorpusFields) -> Iterator[dict[str, Any]]:
    """Read only the columns we need, so wide tables with large extra columns stay cheap."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for unreadable files
        reason = str(err).split(". ")[0]  # pyarrow's first sentence says what is wrong
        raise InputError(
            f"Corpus file {path} is not a readable Parquet file ({reason}): check that it is "
            "complete, or convert the corpus to JSONL."
        ) from None
    names = parquet.schema_arrow.names
    _require_text_column(path, names, fields)
    columns = [c for c in _field_names(fields) if c in names]
    for batch in parquet.iter_batches(batch_size=4096, columns=columns):
        yield from batch.to_pylist()


def _field_names(fields: CorpusFields) -> list[str]:
    names = [fields.text_field, fields.id_field, fields.source_field, *CONVERSATION_FIELDS]
    return list(dict.fromkeys(names))


def _require_text_column(path: Path, names: list[str], fields: CorpusFields) -> None:
    """A table without the text column (nor an SFT conversation's) fails at its first row;
    say so before reading it."""
    if fields.text_field not in names and not set(CONVERSATION_FIELDS) & set(names):
        raise InputError(
            f"Corpus {path} row 1 has no {fields.text_field!r} field (fields: "
            f"{', '.join(names) or 'none'}): pass --text-field with the name of the field "
            "that holds the text."
        )


def _txt_records(root: Path, files: list[Path]) -> Located:
    """One document per file: id = relative path, source = first sub-folder or "default"."""
    for path in files:
        relative = path.relative_to(root)
        source = relative.parts[0] if len(relative.parts) > 1 else DEFAULT_SOURCE
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise InputError(
                f"Corpus file {path} is not UTF-8 text: convert it to UTF-8 or remove it."
            ) from None
        yield relative.as_posix(), {"text": text, "id": relative.as_posix(), "source": source}


def _is_hf_dataset(root: Path) -> bool:
    return root.is_dir() and any((root / marker).is_file() for marker in HF_MARKERS)


def _hf_rows(root: Path, split: str | None, fields: CorpusFields) -> Located:
    """Rows of a saved dataset (memory-mapped Arrow, so iterating holds one batch at a time)."""
    dataset = _open_hf_dataset(root, split)
    _require_text_column(root, list(dataset.column_names), fields)
    columns = [c for c in _field_names(fields) if c in dataset.column_names]
    rows = dataset.select_columns(columns)
    return ((f"row {i}", row) for i, row in enumerate(rows, start=1))


def _open_hf_dataset(root: Path, split: str | None) -> Any:
    import datasets  # imported here: it takes a second and most corpora do not need it

    try:
        loaded = datasets.load_from_disk(str(root))
    except Exception as err:  # datasets raises KeyError, OSError, JSON errors for a damaged folder
        raise InputError(
            f"Corpus {root} looks like a saved datasets folder but cannot be read "
            f"({first_line(err)}): re-save it with save_to_disk."
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        return _pick_split(root, loaded, split)
    if split is not None:
        raise InputError(
            f"Corpus {root} is a single dataset without splits: drop the "
            f"'{SPLIT_SEPARATOR}{split}' suffix."
        )
    return loaded


def _pick_split(root: Path, splits: Mapping[str, Any], split: str | None) -> Any:
    """Use the asked split, else ``train``; otherwise list the choices."""
    names = ", ".join(splits)
    if split is not None and split not in splits:
        raise InputError(
            f"Corpus {root} has no split {split!r} (splits: {names}): "
            f"pass {root}{SPLIT_SEPARATOR}<split> with one of them."
        )
    if split is None and DEFAULT_SPLIT not in splits:
        raise InputError(
            f"Corpus {root} has no {DEFAULT_SPLIT!r} split (splits: {names}): "
            f"pass {root}{SPLIT_SEPARATOR}<split> to choose one."
        )
    return splits[split or DEFAULT_SPLIT]
