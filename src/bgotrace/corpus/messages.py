"""Conversations as data: checked ``{role, content}`` messages, before any template.

A chat query (:mod:`bgotrace.chat`) and an SFT corpus record (:mod:`bgotrace.corpus.sources`)
hold the same list of messages; both are checked here, so a malformed one gives the same
one-line error naming the record and the message. Rendering them needs the tokenizer's
chat template and happens above the corpus (:mod:`bgotrace.chat`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bgotrace.errors import InputError

ROLES = ("system", "user", "assistant", "tool")
"""Roles a message may have (the ones common chat templates know)."""


@dataclass(frozen=True)
class Message:
    """One turn of a conversation."""

    role: str
    """system | user | assistant | tool."""
    content: str
    """The turn's text (not empty)."""

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


def parse_messages(raw: Any, where: str) -> tuple[Message, ...]:
    """Checked messages from JSON data; ``where`` names the record in errors.

    Which turn must come last is the caller's rule (a query ends in the answer it
    attributes; an SFT record needs an assistant turn somewhere).
    """
    if not isinstance(raw, list) or not raw:
        raise InputError(f"{where}: messages must be a non-empty list of {{role, content}}.")
    return tuple(_message(item, f"{where} message {i + 1}") for i, item in enumerate(raw))


def _message(item: Any, where: str) -> Message:
    if not isinstance(item, dict):
        raise InputError(f"{where} is not an object: give each message a role and a content.")
    role, content = item.get("role"), item.get("content")
    if not isinstance(role, str):
        raise InputError(f"{where} has no string 'role': use one of {', '.join(ROLES)}.")
    if role not in ROLES:
        raise InputError(f"{where} has the unknown role {role!r}: use one of {', '.join(ROLES)}.")
    if not isinstance(content, str):
        raise InputError(f"{where} has no string 'content': give the turn's text as a string.")
    if not content.strip():
        raise InputError(f"{where} ({role}) has an empty content: give the turn's text.")
    return Message(role, content)


def check_has_assistant(messages: Sequence[Message], where: str) -> None:
    """An SFT conversation trains the assistant's turns: one without any trains nothing."""
    if not any(m.role == "assistant" for m in messages):
        raise InputError(
            f"{where}: the conversation has no assistant turn, so fine-tuning had nothing to "
            "learn from it: add the assistant's answer or remove the record."
        )


def messages_json(messages: Sequence[Message]) -> str:
    """Canonical JSON of a conversation: its stable text for ids and fingerprints."""
    return json.dumps([m.to_dict() for m in messages], ensure_ascii=False)
