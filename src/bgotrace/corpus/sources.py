"""Read a corpus from disk, whatever form it comes in, into :class:`Document` objects.

Supported inputs (detected from the path):

* JSON lines: ``.jsonl`` or ``.json``, one object per line (a ``.json`` file holding one JSON
  array of objects is accepted too);
* Parquet: a ``.parquet`` file or a folder of them (read in sorted path order);
* a folder of ``.txt`` files, searched recursively: the id is the relative path and the source
  is the first sub-folder (``"default"`` for files directly in the folder);
* a Hugging Face ``datasets`` dataset saved with ``save_to_disk``; for a ``DatasetDict`` the
  ``train`` split is used, or the one named by a ``path::split`` suffix.

Every error names the file and the record (line or row) and says how to fix it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from bgotrace.corpus.documents import (
    DEFAULT_FIELDS,
    DEFAULT_SOURCE,
    CorpusFields,
    Document,
    build_documents,
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
    """Load the corpus at ``path`` (optionally ``path::split``) as documents with stable ids."""
    root, split = _split_suffix(str(path))
    if not root.exists():
        raise InputError(f"Corpus path {root} does not exist: check the path.")
    if split is not None and not _is_hf_dataset(root):
        raise InputError(
            f"Corpus path {root} is not a saved datasets folder, so it has no split "
            f"{split!r}: drop the '{SPLIT_SEPARATOR}{split}' suffix."
        )
    if _is_hf_dataset(root):
        return _load_hf_dataset(root, split, fields)
    if root.is_file() and root.suffix.lower() in JSON_SUFFIXES:
        return build_documents(_json_records(root), fields, origin=f"file {root}")
    if root.is_file() and root.suffix.lower() == ".parquet":
        return _load_parquet([root], root.parent, fields, origin=f"file {root}")
    if root.is_dir() and (parquet_files := _files_with_suffix(root, ".parquet")):
        return _load_parquet(parquet_files, root, fields, origin=f"folder {root}")
    if root.is_dir() and (txt_files := _files_with_suffix(root, ".txt")):
        return build_documents(_txt_records(root, txt_files), DEFAULT_FIELDS, f"folder {root}")
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


def _load_parquet(
    files: list[Path], root: Path, fields: CorpusFields, origin: str
) -> list[Document]:
    """Rows are located as "row 7", or "part-1.parquet row 7" when a folder has several files."""
    several = len(files) > 1
    located = (
        (f"{path.relative_to(root).as_posix() + ' ' if several else ''}row {i}", record)
        for path in files
        for i, record in enumerate(_parquet_rows(path, fields), start=1)
    )
    return build_documents(located, fields, origin)


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
    return [fields.text_field, fields.id_field, fields.source_field]


def _require_text_column(path: Path, names: list[str], fields: CorpusFields) -> None:
    """A table without the text column fails at its first row; say so before reading it."""
    if fields.text_field not in names:
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


def _load_hf_dataset(root: Path, split: str | None, fields: CorpusFields) -> list[Document]:
    import datasets  # imported here: it takes a second and most corpora do not need it

    try:
        loaded = datasets.load_from_disk(str(root))
    except Exception as err:  # datasets raises KeyError, OSError, JSON errors for a damaged folder
        raise InputError(
            f"Corpus {root} looks like a saved datasets folder but cannot be read "
            f"({first_line(err)}): re-save it with save_to_disk."
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        dataset = _pick_split(root, loaded, split)
    elif split is not None:
        raise InputError(
            f"Corpus {root} is a single dataset without splits: drop the "
            f"'{SPLIT_SEPARATOR}{split}' suffix."
        )
    else:
        dataset = loaded
    _require_text_column(root, list(dataset.column_names), fields)
    columns = [c for c in _field_names(fields) if c in dataset.column_names]
    rows = dataset.select_columns(columns)
    located = ((f"row {i}", row) for i, row in enumerate(rows, start=1))
    return build_documents(located, fields, origin=f"dataset {root}")


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
