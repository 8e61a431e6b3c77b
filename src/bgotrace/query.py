"""Queries: the text whose training data we trace.

A query is a prompt and the completion the model produced. By default the loss
covers the completion tokens only (factual attribution: "why did it say this?");
``loss_on="all"`` covers every predicted token (stylistic attribution of a whole text).
Prompt and completion are tokenized separately and concatenated, which is how
``generate`` produced the completion: the model saw the prompt's tokens, then its own.

A chat query holds ``messages`` instead (``bgotrace.chat``): rendered with the tokenizer's
chat template, its last assistant turn is the completion, and ``loss_on="assistant"``
covers every assistant turn. Once encoded, its prompt and completion are the rendered text.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from bgotrace.chat import (
    Message,
    check_answer_last,
    load_messages_file,
    parse_messages,
    render_chat,
)
from bgotrace.corpus.documents import unpaired_surrogate
from bgotrace.errors import InputError

LOSS_ON = ("completion", "all", "assistant")


@dataclass(frozen=True)
class Query:
    """One text to attribute."""

    query_id: str
    """Name of the query in outputs."""
    prompt: str
    """Text the model was conditioned on."""
    completion: str
    """Text the model produced; the default loss covers these tokens only."""
    loss_on: str = "completion"
    """``completion`` (prompt tokens masked), ``all`` (every predicted token) or
    ``assistant`` (every assistant turn of ``messages``)."""
    messages: tuple[Message, ...] | None = None
    """The conversation of a chat query (last turn: the assistant's answer); None for text."""

    @classmethod
    def chat(
        cls,
        query_id: str,
        messages: Sequence[Message | dict[str, str]],
        loss_on: str = "completion",
    ) -> Query:
        """A chat query from :class:`Message` s or ``{role, content}`` dicts; prompt and
        completion are plain stand-ins until it is encoded (then the rendered text)."""
        where = f"Query {query_id!r}"
        turns = parse_messages([_as_dict(m) for m in messages], where)
        check_answer_last(turns, where)
        prompt = "\n".join(f"{m.role}: {m.content}" for m in turns[:-1])
        return cls(query_id, prompt, turns[-1].content, loss_on, turns)

    def messages_record(self) -> dict[str, list[dict[str, str]]]:
        """``{"messages": [...]}`` for a chat query's summary entry; empty for text."""
        return {} if self.messages is None else {"messages": [m.to_dict() for m in self.messages]}

    def __post_init__(self) -> None:
        for name in ("query_id", "prompt", "completion"):
            if (problem := unpaired_surrogate(getattr(self, name))) is not None:
                raise InputError(
                    f"Query {self.query_id!r}: the {name} holds {problem}, which is not text: "
                    "fix the escape (often half an emoji) or remove it."
                )
        if self.loss_on not in LOSS_ON:
            raise InputError(
                f"Query {self.query_id!r}: loss_on={self.loss_on!r} is unknown; "
                f"use one of {', '.join(LOSS_ON)}."
            )
        if self.loss_on == "assistant" and self.messages is None:
            raise InputError(
                f"Query {self.query_id!r}: loss_on=assistant needs a conversation (messages); "
                "use completion for a prompt/completion query."
            )
        if not self.completion.strip():
            raise InputError(
                f"Query {self.query_id!r} has an empty completion: give the text to attribute."
            )
        if not self.prompt.strip() and self.loss_on == "completion":
            raise InputError(
                f"Query {self.query_id!r} has an empty prompt: give the prompt the model saw, "
                "or use --loss-on all to attribute the completion as a whole text."
            )


@dataclass(frozen=True)
class Span:
    """A part of a query's completion attributed on its own (``bgotrace.spans``)."""

    parent_id: str
    """Id of the whole-completion query the span belongs to."""
    span_id: int
    """Position of the span in the completion (0, 1, ...)."""
    char_start: int
    """First character of the span in the completion."""
    char_end: int
    """One past its last character; the spans of a query partition its completion."""
    text: str
    """``completion[char_start:char_end]``."""


@dataclass(frozen=True)
class EncodedQuery:
    """Token ids of a query and the labels its loss covers."""

    query: Query
    input_ids: torch.Tensor
    """(1, T) token ids of prompt + completion."""
    labels: torch.Tensor
    """(1, T) copy of input_ids with -100 where the loss is not taken."""
    span: Span | None = None
    """Set when the loss covers one span of the completion only; None for the whole query."""

    @property
    def n_loss_tokens(self) -> int:
        # The first position is never predicted (the model shifts labels by one).
        return int((self.labels[0, 1:] != -100).sum())


def encode_query(
    query: Query,
    tokenizer: PreTrainedTokenizerBase,
    max_context: int | None,
    bos_id: int | None = None,
) -> EncodedQuery:
    """Tokenize a query; refuse queries the model cannot read in one window.

    ``bos_id`` (``--bos``, :mod:`bgotrace.corpus.bos`) goes in front of the prompt, as the
    model saw a text start in training; it is never a loss token. A chat query takes its
    special tokens from the chat template instead, ``bos_id`` aside.
    """
    if query.messages is not None:
        return _encode_chat(query, tokenizer, max_context)
    bos = [] if bos_id is None else [bos_id]
    # verbose=False: transformers' "longer than the maximum" warning; _check_context below
    # refuses such a query with the rule and the fix instead
    prompt_ids = bos + tokenizer(query.prompt, add_special_tokens=False, verbose=False)["input_ids"]
    completion_ids = tokenizer(query.completion, add_special_tokens=False, verbose=False)[
        "input_ids"
    ]
    ids = list(prompt_ids) + list(completion_ids)
    _check_context(query, len(ids), max_context)
    input_ids = torch.tensor([ids], dtype=torch.long)
    labels = input_ids.clone()
    if query.loss_on == "completion":
        labels[0, : len(prompt_ids)] = -100
    return _checked(EncodedQuery(query=query, input_ids=input_ids, labels=labels))


def _encode_chat(
    query: Query, tokenizer: PreTrainedTokenizerBase, max_context: int | None
) -> EncodedQuery:
    """Tokens of the rendered conversation; prompt and completion become its text."""
    assert query.messages is not None  # dispatched on by encode_query
    chat = render_chat(tokenizer, query.messages, query.loss_on, f"Query {query.query_id!r}")
    _check_context(query, len(chat.input_ids), max_context)
    input_ids = torch.tensor([chat.input_ids], dtype=torch.long)  # (1, T)
    labels = input_ids.clone()
    labels[0, ~torch.tensor(chat.loss_mask)] = -100
    completion = (
        chat.text[len(chat.prompt_text) :] if chat.text.startswith(chat.prompt_text) else ""
    )
    if not completion.strip():  # a template whose text and tokens disagree
        completion = str(tokenizer.decode(chat.input_ids[chat.prompt_length :]))
    rendered = dataclasses.replace(query, prompt=chat.prompt_text, completion=completion)
    return _checked(EncodedQuery(query=rendered, input_ids=input_ids, labels=labels))


def _check_context(query: Query, n_tokens: int, max_context: int | None) -> None:
    if max_context is not None and n_tokens > max_context:
        raise InputError(
            f"Query {query.query_id!r} has {n_tokens} tokens but the model reads at most "
            f"{max_context}: shorten the prompt or completion."
        )


def _checked(encoded: EncodedQuery) -> EncodedQuery:
    query = encoded.query
    if encoded.n_loss_tokens == 0:
        raise InputError(
            f"Query {query.query_id!r} has no token to take the loss on: "
            "give a longer completion or use --loss-on all."
        )
    return encoded


def load_queries(path: str | Path, loss_on: str = "completion") -> list[Query]:
    """Read queries from JSONL: fields ``id``, ``prompt`` and ``completion`` (or ``messages``,
    a conversation ending in the assistant turn to attribute), optional ``loss_on``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Query file {path} does not exist: pass a JSONL file of queries.")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate a byte-order mark
    except UnicodeDecodeError:
        raise InputError(f"Query file {path} is not UTF-8 text: convert it to UTF-8.") from None
    queries: list[Query] = []
    # Split on newlines only: str.splitlines would also cut at U+2028, U+0085 and other
    # separators that JSON allows unescaped inside a string.
    for line_no, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            queries.append(_query_from_line(path, line_no, line, loss_on))
    if not queries:
        raise InputError(f"Query file {path} is empty: add one JSON object per line.")
    _check_unique_ids(path, queries)
    return queries


def _query_from_line(path: Path, line_no: int, line: str, loss_on: str) -> Query:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(
            f"Query file {path} line {line_no} is not valid JSON ({err.msg}): fix that line."
        ) from err
    if not isinstance(record, dict):
        raise InputError(f"Query file {path} line {line_no} is not a JSON object: fix that line.")
    query_id = str(record["id"]) if record.get("id") is not None else f"q{line_no}"
    loss_on = record.get("loss_on", loss_on)
    if "messages" in record:
        return _chat_from_line(path, line_no, record, query_id, loss_on)
    for key in ("prompt", "completion"):
        if not isinstance(record.get(key), str):
            raise InputError(
                f"Query file {path} line {line_no} has no string field {key!r}: "
                "give each line an id, a prompt and a completion, as strings."
            )
    return Query(query_id, record["prompt"], record["completion"], loss_on)


def _chat_from_line(path: Path, line_no: int, record: dict, query_id: str, loss_on: str) -> Query:
    where = f"Query file {path} line {line_no}"
    if "prompt" in record or "completion" in record:
        raise InputError(f"{where} has both messages and prompt/completion: give one or the other.")
    messages = parse_messages(record["messages"], where)
    check_answer_last(messages, where)
    return Query.chat(query_id, messages, loss_on)


def single_query(
    prompt: str | None,
    completion: str | None,
    loss_on: str,
    *,
    chat: str | None = None,
    messages_file: str | None = None,
) -> Query:
    """The one query of ``--prompt/--completion``, ``--chat/--completion`` or ``--messages``."""
    if messages_file is not None:
        return Query.chat("query", load_messages_file(messages_file), loss_on)
    if chat is not None:
        turns = (Message("user", chat), Message("assistant", completion or ""))
        if not chat.strip() or not (completion or "").strip():
            raise InputError("--chat and --completion must both be non-empty text.")
        return Query.chat("query", turns, loss_on)
    return Query("query", prompt or "", completion or "", loss_on=loss_on)


def _as_dict(message: Message | dict[str, str]) -> Any:
    return message.to_dict() if isinstance(message, Message) else message


def _check_unique_ids(path: Path, queries: Sequence[Query]) -> None:
    seen: set[str] = set()
    for q in queries:
        if q.query_id in seen:
            raise InputError(f"Query file {path} repeats the id {q.query_id!r}: make ids unique.")
        seen.add(q.query_id)
