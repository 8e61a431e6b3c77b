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
mask of its assistant turns (``--unit-loss``). There the template renders each prefix to
text only and the whole conversation is tokenized once: a boundary is where a prefix's text
ends, which must start the whole text and fall between two of its tokens (the prefix
property again, checked on text; the chat template runs once per turn and assistant turn).

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

import numpy as np
from transformers import PreTrainedTokenizerBase

from bgotrace.corpus.bos import would_double_bos
from bgotrace.corpus.chunking import fast_backend
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
        raise _refused(where, err) from err


def _refused(where: str, err: Exception) -> InputError:
    return InputError(
        f"{where}: the chat template refused this conversation ({err}): "
        "fix the conversation (e.g. alternate user and assistant turns)."
    )


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
        raise _not_a_prefix(where, what)


def _not_a_prefix(where: str, what: str) -> InputError:
    return InputError(
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
    """Per token of ``full``: whether it belongs to an assistant turn (header excluded).

    Each assistant turn runs from the end of the conversation before it with the generation
    prompt to the end of the conversation up to it, both rendered and tokenized on their own
    (a query: one conversation; SFT corpora locate the same ends by text,
    :func:`render_conversation`)."""
    marked = _generation_mask(tokenizer, messages, full, where)
    if marked is not None:
        return marked
    mask = [False] * len(full)
    for i in _assistant_turns(messages, where):
        start = render_ids(tokenizer, messages[:i], where, generation_prompt=True)
        end = render_ids(tokenizer, messages[: i + 1], where, generation_prompt=False)
        _check_prefix(start, end, where, f"the turns before message {i + 1}")
        _check_prefix(end, full, where, f"the turns up to message {i + 1}", strict=False)
        mask[len(start) : len(end)] = [True] * (len(end) - len(start))
    return mask


def _generation_mask(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], full: Sequence[int], where: str
) -> list[bool] | None:
    """The mask of the template's ``{% generation %}`` markers, where it has them (None: it
    has none, or the tokenizer is slow, or the marked render tokenizes differently)."""
    if not (_GENERATION_TAG.search(str(tokenizer.chat_template)) and tokenizer.is_fast):
        return None
    out = _apply(tokenizer, messages, where, tokenize=True, return_assistant_tokens_mask=True)
    if [int(t) for t in out["input_ids"]] != list(full):
        return None
    return [bool(m) for m in out["assistant_masks"]]


def _assistant_turns(messages: Sequence[Message], where: str) -> list[int]:
    """Indices of the assistant turns; one that opens the conversation is refused."""
    turns = [i for i, m in enumerate(messages) if m.role == "assistant"]
    if turns and turns[0] == 0:
        raise InputError(
            f"{where}: the first message is an assistant turn, which has no generation "
            "prompt to tell its tokens apart: start with a system or user turn."
        )
    return turns


def _corpus_assistant_mask(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    whole: _Tokenized,
    ends: Sequence[int],
    where: str,
) -> list[bool]:
    """:func:`assistant_mask` of an SFT record, from text: each assistant turn starts where
    the conversation before it with the generation prompt ends (``ends``: each turn's end)."""
    marked = _generation_mask(tokenizer, messages, whole.ids, where)
    if marked is not None:
        return marked
    turns = _assistant_turns(messages, where)
    heads = render_texts(tokenizer, [messages[:i] for i in turns], where, generation_prompt=True)
    mask = np.zeros(len(whole.ids), dtype=bool)  # (n,)
    for i, head in zip(turns, heads, strict=True):
        what = f"the turns before message {i + 1}"
        start = whole.boundary(head, where, what)
        if start >= ends[i]:  # the generation prompt leaves no token of the turn
            raise _not_a_prefix(where, what)
        mask[start : ends[i]] = True
    return mask.tolist()


def render_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    unit_loss: str,
    where: str,
    *,
    backend: Any = None,
) -> RenderedConversation:
    """An SFT record's conversation as its template renders it, with its turns and the loss
    mask of ``unit_loss`` (``assistant``: every assistant turn, as SFT trains; ``all``).

    The template renders text only (each prefix once); the whole conversation is tokenized
    once, and each turn boundary is where its prefix's text ends, which must start the
    whole text and fall between two of its tokens. ``backend``: the tokenizer's
    :func:`offsets_backend` (made here if not given; a corpus makes it once).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(
            f"{where} is a conversation, but the tokenizer has no chat template to render it: "
            "set tokenizer.chat_template = '<jinja template>' and save it (save_pretrained), "
            "or store the corpus as plain text."
        )
    prefixes = [messages[:k] for k in range(1, len(messages) + 1)]
    texts = render_texts(tokenizer, prefixes, where, generation_prompt=False)
    if backend is None:
        backend = offsets_backend(tokenizer)
    whole = _Tokenized.of(texts[-1], backend)
    ends = [
        whole.boundary(prefix, where, f"the turns up to message {k}")
        for k, prefix in enumerate(texts[:-1], 1)
    ]  # turn k - 1 ends where the conversation up to it ends
    ends.append(len(whole.ids))
    if unit_loss == "all":
        mask = [True] * len(whole.ids)
    else:
        mask = _corpus_assistant_mask(tokenizer, messages, whole, ends, where)
    roles = tuple(m.role for m in messages)
    return RenderedConversation(whole.text, whole.ids, mask, ends, roles)


def render_texts(
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Sequence[Message]],
    where: str,
    *,
    generation_prompt: bool,
) -> list[str]:
    """Each conversation rendered by the template to text (no tokenizing), in one call."""
    if not conversations:
        return []
    batch = [[m.to_dict() for m in c] for c in conversations]
    check_template(tokenizer, where)
    try:
        out = tokenizer.apply_chat_template(
            batch, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as err:  # jinja2 errors and the template's own raise_exception
        raise _refused(where, err) from err
    return [str(t) for t in out]


def offsets_backend(tokenizer: PreTrainedTokenizerBase) -> Any:
    """The Rust tokenizer encoding as ``apply_chat_template`` does (``add_special_tokens=
    False``) with untrimmed character offsets: without the post-processor, which then only
    trims offsets (byte-level BPE drops a token's spaces from them)."""
    backend = fast_backend(tokenizer)
    backend.post_processor = None
    return backend


@dataclass(frozen=True)
class _Tokenized:
    """A rendered text, its token ids and each token's character span."""

    text: str
    ids: list[int]
    starts: np.ndarray
    """``(n,)`` int64: character start of each token."""
    ends: np.ndarray
    """``(n,)`` int64: character end (exclusive) of each token."""

    @staticmethod
    def of(text: str, backend: Any) -> _Tokenized:
        encoding = backend.encode(text, add_special_tokens=False)
        spans = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)  # (n, 2)
        return _Tokenized(text, list(encoding.ids), spans[:, 0], spans[:, 1])

    def boundary(self, prefix: str, where: str, what: str) -> int:
        """Tokens of the text before ``prefix`` ends: ``prefix`` must start the text and end
        between two tokens (else the template renders earlier turns differently, or a token
        straddles the turns, and the mask would sit on the wrong tokens)."""
        cut = len(prefix)
        before = self.starts < cut  # (n,)
        n = int(before.sum())
        if not self.text.startswith(prefix) or not before[:n].all() or (self.ends[:n] > cut).any():
            raise _not_a_prefix(where, what)
        return n


def conversation_renderer(tokenizer: PreTrainedTokenizerBase, unit_loss: str) -> Renderer:
    """What the chunker calls on each SFT record (:mod:`bgotrace.corpus.chunking`); the
    first conversation is checked for a doubled BOS (one warning per corpus)."""
    if unit_loss not in UNIT_LOSSES:
        raise ConfigError(f"--unit-loss={unit_loss!r} is unknown: use one of {UNIT_LOSSES}.")
    checked, backend = False, None

    def render(doc: Document) -> RenderedConversation:
        nonlocal checked, backend
        assert doc.messages is not None
        where = f"Corpus record {doc.doc_id!r}"
        if backend is None:  # made once, by the first record
            backend = offsets_backend(tokenizer)
        rendered = render_conversation(tokenizer, doc.messages, unit_loss, where, backend=backend)
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
