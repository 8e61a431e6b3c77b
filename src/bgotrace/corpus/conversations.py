"""SFT conversations as units: turn-aligned windows with a per-token loss mask.

A conversation record is rendered by the tokenizer's chat template above this layer
(:func:`bgotrace.chat.render_conversation` gives a :class:`RenderedConversation`); here it
is cut into units. A unit covers whole turns where they fit: each window ends at the last
turn end that fits in ``size`` tokens from its start, and the next window starts there
(whole turns need no overlap). Only a turn longer than a unit is windowed by tokens as
plain text is (``size`` tokens, overlapping by ``stride``). A window that holds no token
the loss covers (say a long user turn alone) trains nothing under SFT and is dropped; the
units kept are numbered 0, 1, ... (unit id ``doc#k``: the k-th unit of the document, as for
plain text) and their turn ranges (:class:`UnitTurns`) locate them in the conversation.

The loss mask says, per token, whether its prediction is in the unit's loss: the assistant
turns' tokens (as SFT trained them) or every token (``--unit-loss all``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from bgotrace.corpus.documents import Document

UNIT_LOSSES = ("assistant", "all")
"""What a conversation unit's loss covers: its assistant tokens (as SFT trained them) or all
of its tokens. Plain-text units always take every token."""


@dataclass(frozen=True)
class RenderedConversation:
    """A conversation through its chat template: what the chunker cuts into units."""

    text: str
    """The rendered conversation (special tokens written out): the document's stored text."""
    ids: list[int]
    """Its token ids, as ``apply_chat_template`` tokenizes it (BOS only where it puts one)."""
    loss_mask: list[bool]
    """Per token: whether its prediction is in the loss."""
    turn_ends: list[int]
    """Token end (exclusive) of each turn, increasing; the last is ``len(ids)``."""
    roles: tuple[str, ...]
    """Role of each turn."""


Renderer = Callable[[Document], RenderedConversation]
"""Renders a document that holds ``messages`` (the caller owns the tokenizer)."""


@dataclass(frozen=True)
class UnitTurns:
    """The turns a conversation unit covers."""

    first: int
    """Index of the first turn (0-based) in its conversation."""
    starts: tuple[int, ...]
    """Token position in the unit where each covered turn starts (a turn that began in an
    earlier unit: the unit's first token of it)."""
    roles: tuple[str, ...]
    """Role of each covered turn."""

    @property
    def last(self) -> int:
        return self.first + len(self.starts) - 1

    def turn_at(self, position: int) -> int:
        """Index (in the conversation) of the turn holding the unit's token ``position``."""
        inside = int(np.searchsorted(self.starts, position, side="right")) - 1
        return self.first + max(inside, 0)  # a continuation's BOS: its first turn

    def role_at(self, position: int) -> str:
        return self.roles[self.turn_at(position) - self.first]


def turn_windows(turn_ends: Sequence[int], size: int, stride: int) -> list[tuple[int, int]]:
    """Token ``[start, end)`` of each window: whole turns where they fit in ``size``, a turn
    longer than that in token windows overlapping by ``stride``."""
    ends = np.asarray(turn_ends, dtype=np.int64)
    n, start, out = int(ends[-1]), 0, []
    while True:
        fits = ends[(ends > start) & (ends <= start + size)]
        end = int(fits[-1]) if len(fits) else min(start + size, n)
        out.append((start, end))
        if end >= n:
            return out
        start = end if len(fits) else start + size - stride


def unit_turns(rendered: RenderedConversation, start: int, end: int, n_bos: int) -> UnitTurns:
    """The turns window ``[start, end)`` covers; positions count ``n_bos`` tokens in front."""
    ends = np.asarray(rendered.turn_ends, dtype=np.int64)
    begins = np.concatenate([[0], ends[:-1]])  # (m,) token start of each turn
    covered = np.flatnonzero((begins < end) & (ends > start))
    starts = np.maximum(begins[covered] - start, 0) + n_bos
    roles = tuple(rendered.roles[i] for i in covered.tolist())
    return UnitTurns(int(covered[0]), tuple(starts.tolist()), roles)
