"""Conversations rendered with the tokenizer's own chat template, as in fine-tuning.

A chat query is a list of messages whose last one is the assistant turn to attribute.
It is tokenized the way SFT trainers and ``generate`` see it: the whole conversation
through ``apply_chat_template`` (special tokens from the template, no BOS added on top),
the prompt as the conversation before the last turn with the generation prompt. The
completion is every token after the prompt's, which holds only when the prompt's tokens
are a prefix of the whole conversation's: that is checked, and a template breaking it is
refused (its loss mask would sit on the wrong tokens).

SFT corpus records are rendered the same way (:func:`render_conversation`, for the chunker
through :func:`conversation_renderer`): the whole conversation, its turn boundaries and the
mask of its assistant turns (``--unit-loss``), each prefix checked as below.

Loss masks (``loss_on``): ``completion`` (the last assistant turn, with its end-of-turn
tokens), ``all`` (every predicted token) and ``assistant`` (every assistant turn: from the
template's ``{% generation %}`` markers where it has them, else by rendering prefixes of
the conversation, each checked the same way).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from bgotrace.corpus.bos import would_double_bos
from bgotrace.corpus.conversations import UNIT_LOSSES, RenderedConversation, Renderer
from bgotrace.corpus.documents import Document
from bgotrace.corpus.messages import ROLES as ROLES  # re-exported: checked in corpus
from bgotrace.corpus.messages import Message as Message
from bgotrace.corpus.messages import parse_messages as parse_messages
from bgotrace.errors import ConfigError, InputError

log = logging.getLogger(__name__)

_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


def check_answer_last(messages: Sequence[Message], where: str) -> None:
    """A query's conversation ends in the assistant turn it attributes, after some context."""
    if messages[-1].role != "assistant":
        raise InputError(
            f"{where}: the last message is a {messages[-1].role} turn, not the assistant's "
            "answer to attribute: end the conversation with an assistant turn."
        )
    if len(messages) < 2:
        raise InputError(
            f"{where}: the conversation is only the assistant's answer: put the user's turn "
            "(the prompt) before it."
        )


@dataclass(frozen=True)
class RenderedChat:
    """A conversation's token ids and which of them the loss covers."""

    input_ids: list[int]
    """The whole conversation, as ``apply_chat_template`` tokenizes it."""
    prompt_length: int
    """Tokens before the last turn's (the generation prompt included)."""
    loss_mask: list[bool]
    """Per token: whether its prediction is in the loss."""
    text: str
    """The rendered conversation."""
    prompt_text: str
    """The rendered prompt (generation prompt included); ``text`` starts with it when the
    template renders text the way it renders tokens (else the decoded prompt tokens)."""


def check_template(tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    """A tokenizer without a chat template cannot render a conversation: say the fix."""
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(
            f"{where}: the tokenizer has no chat template, so messages cannot be rendered: set "
            "tokenizer.chat_template = '<jinja template>' and save it (save_pretrained), or "
            "pass --prompt/--completion (plain text)."
        )


def render_ids(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    where: str,
    *,
    generation_prompt: bool,
) -> list[int]:
    """Token ids of ``messages`` through the template (BOS only where the template puts it)."""
    out = _apply(tokenizer, messages, where, tokenize=True, add_generation_prompt=generation_prompt)
    return [int(t) for t in out["input_ids"]]


def _apply(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], where: str, **kwargs: Any
) -> Any:
    check_template(tokenizer, where)
    if kwargs.get("tokenize"):
        kwargs["return_dict"] = True
    try:
        return tokenizer.apply_chat_template([m.to_dict() for m in messages], **kwargs)
    except Exception as err:  # jinja2 errors and the template's own raise_exception
        raise InputError(
            f"{where}: the chat template refused this conversation ({err}): "
            "fix the conversation (e.g. alternate user and assistant turns)."
        ) from err


def render_chat(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], loss_on: str, where: str
) -> RenderedChat:
    """Tokens and loss mask of a conversation ending in the assistant turn to attribute."""
    check_answer_last(messages, where)
    full = render_ids(tokenizer, messages, where, generation_prompt=False)
    prompt = render_ids(tokenizer, messages[:-1], where, generation_prompt=True)
    _check_prefix(prompt, full, where, "the conversation before the answer")
    text = str(_apply(tokenizer, messages, where, tokenize=False, add_generation_prompt=False))
    prompt_text = str(
        _apply(tokenizer, messages[:-1], where, tokenize=False, add_generation_prompt=True)
    )
    if not text.startswith(prompt_text):
        prompt_text = str(tokenizer.decode(prompt, skip_special_tokens=False))
    if would_double_bos(tokenizer, text):
        log.warning(
            "%s: the chat template already starts with the BOS token and the tokenizer adds "
            "one too; bgotrace encodes it once (as apply_chat_template does): if fine-tuning "
            "tokenized the rendered text with special tokens, the model saw two.",
            where,
        )
    if loss_on == "all":
        mask = [True] * len(full)
    elif loss_on == "completion":
        mask = [i >= len(prompt) for i in range(len(full))]
    else:
        mask = assistant_mask(tokenizer, messages, full, where)
    return RenderedChat(full, len(prompt), mask, text, prompt_text)


def _check_prefix(
    prefix: Sequence[int], full: Sequence[int], where: str, what: str, *, strict: bool = True
) -> None:
    """``prefix`` starts ``full`` (and, ``strict``, leaves at least one token after it)."""
    if len(prefix) + strict > len(full) or list(full[: len(prefix)]) != list(prefix):
        raise InputError(
            f"{where}: the chat template renders {what} as tokens that do not start the "
            "whole conversation's, so the assistant's tokens cannot be told apart: use "
            "--loss-on all, or a template that renders earlier turns (and the generation "
            "prompt) the same whatever follows."
        )


def assistant_mask(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    full: Sequence[int],
    where: str,
) -> list[bool]:
    """Per token of ``full``: whether it belongs to an assistant turn (header excluded)."""
    if _GENERATION_TAG.search(str(tokenizer.chat_template)) and tokenizer.is_fast:
        out = _apply(tokenizer, messages, where, tokenize=True, return_assistant_tokens_mask=True)
        if [int(t) for t in out["input_ids"]] == list(full):
            return [bool(m) for m in out["assistant_masks"]]
    mask = [False] * len(full)
    for i, message in enumerate(messages):
        if message.role != "assistant":
            continue
        if i == 0:
            raise InputError(
                f"{where}: the first message is an assistant turn, which has no generation "
                "prompt to tell its tokens apart: start with a system or user turn."
            )
        start = render_ids(tokenizer, messages[:i], where, generation_prompt=True)
        end = render_ids(tokenizer, messages[: i + 1], where, generation_prompt=False)
        _check_prefix(start, end, where, f"the turns before message {i + 1}")
        _check_prefix(end, full, where, f"the turns up to message {i + 1}", strict=False)
        mask[len(start) : len(end)] = [True] * (len(end) - len(start))
    return mask


def render_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], unit_loss: str, where: str
) -> RenderedConversation:
    """An SFT record's conversation as its template renders it, with its turns and the loss
    mask of ``unit_loss`` (``assistant``: every assistant turn, as SFT trains; ``all``)."""
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(
            f"{where} is a conversation, but the tokenizer has no chat template to render it: "
            "set tokenizer.chat_template = '<jinja template>' and save it (save_pretrained), "
            "or store the corpus as plain text."
        )
    full = render_ids(tokenizer, messages, where, generation_prompt=False)
    ends = []
    for i in range(1, len(messages)):  # turn i ends where the conversation up to it ends
        prefix = render_ids(tokenizer, messages[:i], where, generation_prompt=False)
        _check_prefix(prefix, full, where, f"the turns up to message {i}", strict=False)
        ends.append(len(prefix))
    text = str(_apply(tokenizer, messages, where, tokenize=False, add_generation_prompt=False))
    if unit_loss == "all":
        mask = [True] * len(full)
    else:
        mask = assistant_mask(tokenizer, messages, full, where)
    roles = tuple(m.role for m in messages)
    return RenderedConversation(text, full, mask, [*ends, len(full)], roles)


def conversation_renderer(tokenizer: PreTrainedTokenizerBase, unit_loss: str) -> Renderer:
    """What the chunker calls on each SFT record (:mod:`bgotrace.corpus.chunking`); the
    first conversation is checked for a doubled BOS (one warning per corpus)."""
    if unit_loss not in UNIT_LOSSES:
        raise ConfigError(f"--unit-loss={unit_loss!r} is unknown: use one of {UNIT_LOSSES}.")
    checked = False

    def render(doc: Document) -> RenderedConversation:
        nonlocal checked
        assert doc.messages is not None
        where = f"Corpus record {doc.doc_id!r}"
        rendered = render_conversation(tokenizer, doc.messages, unit_loss, where)
        if not checked and would_double_bos(tokenizer, rendered.text):
            log.warning(
                "%s: the chat template already starts with the BOS token and the tokenizer "
                "adds one too; units hold it once (as apply_chat_template does): if SFT "
                "tokenized the rendered text with special tokens, the model saw two.",
                where,
            )
        checked = True
        return rendered

    return render


def load_messages_file(path: str | Path) -> tuple[Message, ...]:
    """One conversation from a file: a JSON list of messages, a JSON object with a
    ``messages`` list, or JSONL with one message (or one such object) per line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Messages file {path} does not exist: pass a JSON or JSONL file.")
    text = path.read_text(encoding="utf-8-sig")
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError:
        data = [_json_line(path, n, line) for n, line in enumerate(text.split("\n"), 1)]
        data = [d for d in data if d is not None]
    if isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict):
        data = data[0].get("messages", data)
    if isinstance(data, dict):
        data = data.get("messages")
    return parse_messages(data, f"Messages file {path}")


def _json_line(path: Path, line_no: int, line: str) -> Any:
    if not line.strip():
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(
            f"Messages file {path} line {line_no} is not valid JSON ({err.msg}): fix that line."
        ) from err
