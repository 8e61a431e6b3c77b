"""Documents with stable ids: the unit of attribution that users see.

Every later stage (cache, scores, reports) refers to a document by its ``doc_id``, so the id
must not change when the same corpus is loaded again. A given id is kept (as a string); a
document without one is named by a hash of its text, so reordering or appending documents
never renames the others.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from bgotrace.corpus.messages import Message, check_has_assistant, messages_json, parse_messages
from bgotrace.errors import InputError

log = logging.getLogger(__name__)

DEFAULT_SOURCE = "default"
"""Source of a document that names none (and of `.txt` files directly in a corpus folder)."""

HASH_ID_CHARS = 16
"""Hex characters of ``sha1(text)`` used as the id of a document without one."""

MESSAGES_FIELD = "messages"
"""Field of an SFT record holding its conversation (a list of ``{role, content}``)."""
PROMPT_FIELD, COMPLETION_FIELD = "prompt", "completion"
"""Fields of an SFT record in prompt/completion form: strings (a user turn and the
assistant's answer) or lists of messages (the conversation before and the answer)."""
CONVERSATION_FIELDS = (MESSAGES_FIELD, PROMPT_FIELD, COMPLETION_FIELD)


@dataclass(frozen=True)
class Document:
    """One training document."""

    doc_id: str
    """Given id (stringified) or the first 16 hex characters of ``sha1(text)``."""
    text: str
    """The full text; chunks keep character spans into it for snippets."""
    source: str
    """Given source, sub-folder name of a `.txt` corpus, or ``"default"``."""
    messages: tuple[Message, ...] | None = None
    """The conversation of an SFT record (None: plain text). ``text`` is then its canonical
    JSON until the chat template renders it (:mod:`bgotrace.chat`), at tokenization."""


@dataclass(frozen=True)
class CorpusFields:
    """Names of the record fields that hold the text, the id and the source."""

    text_field: str = "text"
    """Field with the document text (required, a string)."""
    id_field: str = "id"
    """Field with the document id (optional; a hash of the text is used without it)."""
    source_field: str = "source"
    """Field with the source name (optional; ``"default"`` without it)."""


DEFAULT_FIELDS = CorpusFields()
"""``text``, ``id`` and ``source``: the field names used unless the user names others."""


def documents_from_records(
    records: Iterable[Mapping[str, Any] | str], fields: CorpusFields = DEFAULT_FIELDS
) -> list[Document]:
    """Turn in-memory records (mappings or bare strings) into documents with stable ids."""
    located = ((f"record {i}", record) for i, record in enumerate(records, start=1))
    return build_documents(located, fields, origin="(in memory)")


def build_documents(
    located: Iterable[tuple[str, Mapping[str, Any] | str]], fields: CorpusFields, origin: str
) -> list[Document]:
    """Build documents from ``(location, record)`` pairs; the location appears in errors.

    ``origin`` names the whole input ("file data.jsonl") and each location names one record
    in it ("line 7"), so an error message points at the exact record to fix.
    """
    return list(iter_documents_of(located, fields, origin))


def iter_documents_of(
    located: Iterable[tuple[str, Mapping[str, Any] | str]], fields: CorpusFields, origin: str
) -> Iterator[Document]:
    """:func:`build_documents` as a stream: one document at a time, in record order.

    Only the ids seen so far are held (to refuse duplicates and number repeated texts), not
    the texts. A corpus without any document raises when the stream ends.
    """
    ids = _IdAllocator(origin)
    n_documents = n_empty = 0
    for where, record in located:
        messages = _conversation(record, f"Corpus {origin} {where}")
        text, given_id, source = _read_record(record, fields, origin, where, messages)
        if not text.strip():
            n_empty += 1
            continue
        doc_id = ids.given(given_id, where) if given_id is not None else ids.hashed(text, where)
        n_documents += 1
        yield Document(doc_id=doc_id, text=text, source=source, messages=messages)
    if n_empty:
        log.warning("Skipped %d empty or whitespace-only document(s) in %s.", n_empty, origin)
    if not n_documents:
        raise InputError(
            f"Corpus {origin} has no documents with non-empty text: "
            f"check the path and the text field ({fields.text_field!r})."
        )


def _conversation(record: Mapping[str, Any] | str, where: str) -> tuple[Message, ...] | None:
    """The checked conversation of an SFT record (None: a plain-text record).

    ``messages`` wins over ``prompt``/``completion``, which win over the text field.
    """
    if not isinstance(record, Mapping):
        return None
    if _present(record.get(MESSAGES_FIELD)):
        messages = parse_messages(_listed(record[MESSAGES_FIELD]), where)
    elif _present(record.get(PROMPT_FIELD)) or _present(record.get(COMPLETION_FIELD)):
        messages = _prompt_completion(record, where)
    else:
        return None
    check_has_assistant(messages, where)
    return messages


def _prompt_completion(record: Mapping[str, Any], where: str) -> tuple[Message, ...]:
    """``prompt``/``completion`` as strings (a user turn, the answer) or message lists."""
    parts = []
    for name, role in ((PROMPT_FIELD, "user"), (COMPLETION_FIELD, "assistant")):
        value = _listed(record.get(name))
        if not _present(value):
            raise InputError(
                f"{where} has a {PROMPT_FIELD!r} or {COMPLETION_FIELD!r} field but no {name!r}: "
                "give both (the user's turn and the assistant's answer) or a 'messages' list."
            )
        parts.append(value if isinstance(value, list) else [{"role": role, "content": value}])
    return parse_messages(parts[0] + parts[1], where)


def _present(value: Any) -> bool:
    """Null, NaN and empty-list cells of a table column count as absent."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return not (hasattr(value, "__len__") and not isinstance(value, str) and len(value) == 0)


def _listed(value: Any) -> Any:
    """A list column read through numpy (pandas, datasets) as a list of plain values."""
    if hasattr(value, "tolist") and not isinstance(value, str):
        return value.tolist()
    return value


def _read_record(
    record: Mapping[str, Any] | str,
    fields: CorpusFields,
    origin: str,
    where: str,
    messages: tuple[Message, ...] | None = None,
) -> tuple[str, str | None, str]:
    """Return ``(text, given id or None, source)`` of one record, or raise a pointed error."""
    if isinstance(record, str):
        return record, None, DEFAULT_SOURCE
    if not isinstance(record, Mapping):
        raise InputError(
            f"Corpus {origin} {where} is of type {type(record).__name__}, not a record with a "
            f"{fields.text_field!r} field: store one object per document."
        )
    if messages is not None:
        record = {**record, fields.text_field: messages_json(messages)}
    if fields.text_field not in record:
        have = ", ".join(map(str, record.keys())) or "none"
        raise InputError(
            f"Corpus {origin} {where} has no {fields.text_field!r} field (fields: {have}): "
            "pass --text-field (config corpus.text_field) with the name of the field that holds "
            "the text (or give an SFT record a 'messages' list)."
        )
    text = record[fields.text_field]
    if not isinstance(text, str):
        raise InputError(
            f"Corpus {origin} {where} field {fields.text_field!r} is of type "
            f"{type(text).__name__}, not a string: store the document text as a string."
        )
    given_id = _optional_str(record.get(fields.id_field))
    source = _optional_str(record.get(fields.source_field)) or DEFAULT_SOURCE
    for name, value in (
        (fields.text_field, text),
        (fields.id_field, given_id),
        (fields.source_field, source),
    ):
        if value is not None:
            _check_encodable(value, f"Corpus {origin} {where} field {name!r}")
    return text, given_id, source


def unpaired_surrogate(text: str) -> str | None:
    """Describe an unpaired UTF-16 surrogate in ``text`` (None if there is none).

    JSON may escape one (``"\\ud83d"``, half an emoji cut by a scraper); Python keeps it, but no
    tokenizer or file format can encode it, so it must be caught where the text comes in.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"an unpaired surrogate {text[err.start]!r} at character {err.start}"
    return None


def _check_encodable(value: str, what: str) -> None:
    if (problem := unpaired_surrogate(value)) is not None:
        raise InputError(
            f"{what} holds {problem}, which is not text: fix the escape (often half an emoji) "
            "or remove it."
        )


def _optional_str(value: Any) -> str | None:
    """Stringify a present value; ``None``, NaN and ``""`` count as absent (nullable columns)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value)
    return text if text else None


class _IdAllocator:
    """Hands out unique document ids and remembers where each id was first seen."""

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self.seen: dict[str, str] = {}  # doc_id -> location of the record that took it

    def given(self, doc_id: str, where: str) -> str:
        """Keep a given id; two records with the same id cannot be told apart, so refuse."""
        if doc_id in self.seen:
            raise InputError(
                f"Corpus {self.origin} has duplicate id {doc_id!r} at {self.seen[doc_id]} and "
                f"{where}: give each document a unique id, or drop the id field."
            )
        self.seen[doc_id] = where
        return doc_id

    def hashed(self, text: str, where: str) -> str:
        """Name a document by its text hash; repeats of a text get ``-1``, ``-2``, … in order."""
        base = hashlib.sha1(text.encode("utf-8")).hexdigest()[:HASH_ID_CHARS]
        doc_id, k = base, 0
        while doc_id in self.seen:
            k += 1
            doc_id = f"{base}-{k}"
        self.seen[doc_id] = where
        return doc_id


def corpus_fingerprint(documents: Iterable[Document]) -> str:
    """sha256 over ids, sources and texts, in order.

    Order matters because unit indices in the token cache follow document order. Each field is
    length-prefixed so that no two different corpora serialise to the same bytes.
    """
    hasher = CorpusHasher()
    for doc in documents:
        hasher.add(doc)
    return hasher.hexdigest()


class CorpusHasher:
    """:func:`corpus_fingerprint` fed one document at a time (a corpus read as a stream)."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self.n_documents = 0

    def add(self, doc: Document) -> None:
        text = doc.text if doc.messages is None else messages_json(doc.messages)
        for part in (doc.doc_id, doc.source, text):  # a conversation: its messages' JSON
            data = part.encode("utf-8")
            self._digest.update(len(data).to_bytes(8, "little"))
            self._digest.update(data)
        self.n_documents += 1

    def hexdigest(self) -> str:
        return self._digest.hexdigest()
