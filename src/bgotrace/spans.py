"""Spans of a completion as queries of their own: which part of the text came from where.

``--spans sentence|tokens:N|auto`` cuts each query's completion into spans that
partition it (span k covers characters ``[char_start, char_end)`` of the completion).
Each span becomes one more :class:`EncodedQuery`: the same prompt and completion
tokens, with the loss on that span's tokens only. To the engine it is just another
perturbed state, so a query and its spans share one corpus sweep (causal span
attribution for the price of extra states, not extra corpus passes).

Modes:

- ``sentence``: a span ends after ``.``, ``!``, ``?`` or a newline; the whitespace that
  follows belongs to the next span (a token like `` It`` starts the next sentence).
- ``tokens:N``: consecutive groups of N completion tokens.
- ``auto``: sentences when there are at least two, else ``tokens:N`` with N chosen
  for about four spans (none when the completion has fewer than 4 predicted tokens).

Spans cut the completion only: with ``--loss-on all`` the whole query's loss also covers
the prompt, and no span does.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from transformers import PreTrainedTokenizerBase

from bgotrace.query import EncodedQuery, Span
from bgotrace.ranking.result import AttributionResult

_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s)|\n+")
AUTO_SPANS = 4
"""Spans ``auto`` aims for when the completion is a single sentence."""


def span_query_id(parent_id: str, span_id: int) -> str:
    """The query id a span's rows carry in every output table."""
    return f"{parent_id}#s{span_id}"


@dataclass(frozen=True)
class _Cut:
    """Completion tokens ``[first, last)`` of one span."""

    first: int
    last: int


def token_offsets(
    tokenizer: PreTrainedTokenizerBase, completion: str
) -> tuple[list[int], list[int]]:
    """Character offsets in ``completion`` where each of its tokens starts and ends."""
    if tokenizer.is_fast:
        enc = tokenizer(completion, add_special_tokens=False, return_offsets_mapping=True)
        return [int(a) for a, _ in enc["offset_mapping"]], [
            int(b) for _, b in enc["offset_mapping"]
        ]
    # Slow tokenizers have no offsets: the length of each decoded prefix stands in.
    ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    ends = [len(tokenizer.decode(ids[: t + 1])) for t in range(len(ids))]
    return [0, *ends[:-1]], ends


def sentence_boundaries(text: str) -> list[int]:
    """Character offsets where a new sentence starts (excluding 0 and ``len(text)``).

    A boundary only whitespace away from the previous one is dropped (``".\n"`` ends one
    sentence, not two), so no span is whitespace alone.
    """
    kept: list[int] = []
    for c in sorted({m.end() for m in _SENTENCE_END.finditer(text)}):
        if 0 < c < len(text) and text[c:].strip() and text[kept[-1] if kept else 0 : c].strip():
            kept.append(c)
    return kept


def _cuts_at_chars(starts: Sequence[int], boundaries: Sequence[int]) -> list[_Cut]:
    """Group tokens: a token opens a new span once it starts at or past the next boundary."""
    cuts: list[_Cut] = []
    pending = list(boundaries)
    first = 0
    for t, start in enumerate(starts):
        passed = [b for b in pending if start >= b]
        if passed and t > first:
            cuts.append(_Cut(first, t))
            first = t
        pending = [b for b in pending if start < b]
    cuts.append(_Cut(first, len(starts)))
    return cuts


def _cuts_every(n_tokens: int, size: int) -> list[_Cut]:
    return [_Cut(a, min(a + size, n_tokens)) for a in range(0, n_tokens, size)]


def _cuts_for(mode: str, completion: str, starts: Sequence[int]) -> list[_Cut]:
    if mode == "sentence":
        return _cuts_at_chars(starts, sentence_boundaries(completion))
    if mode.startswith("tokens:"):
        return _cuts_every(len(starts), int(mode.split(":")[1]))
    if mode != "auto":
        raise ValueError(f"unknown span mode {mode!r}")  # QuerySpec validates user input
    sentences = _cuts_at_chars(starts, sentence_boundaries(completion))
    if len(sentences) > 1 or len(starts) < AUTO_SPANS:
        return sentences
    return _cuts_every(len(starts), math.ceil(len(starts) / AUTO_SPANS))


def _merge_empty(cuts: list[_Cut], predicted: Sequence[bool], text: Sequence[str]) -> list[_Cut]:
    """Join to the next span a span without a predicted token (it has no loss) or with
    only whitespace (nothing to show); ``text[t]`` is completion token t's text."""
    merged: list[_Cut] = []
    carry: int | None = None
    for cut in cuts:
        first = cut.first if carry is None else carry
        if any(predicted[cut.first : cut.last]) and "".join(text[cut.first : cut.last]).strip():
            merged.append(_Cut(first, cut.last))
            carry = None
        else:
            carry = first
    if carry is not None and merged:
        merged[-1] = _Cut(merged[-1].first, len(predicted))
    return merged


def expand_spans(
    encoded: EncodedQuery, tokenizer: PreTrainedTokenizerBase, mode: str
) -> list[EncodedQuery]:
    """The query followed by one query per span of its completion (none for ``none``).

    A completion that yields a single span gets no span queries: that span would
    repeat the whole-completion query.
    """
    if mode == "none":
        return [encoded]
    query = encoded.query
    starts, ends = token_offsets(tokenizer, query.completion)
    offset = encoded.input_ids.shape[1] - len(starts)  # completion tokens come last
    ids = tokenizer(query.completion, add_special_tokens=False)["input_ids"]
    if encoded.input_ids[0, offset:].tolist() != list(ids):
        raise ValueError("spans need the completion's tokens at the end of the query's ids")
    predicted = [offset + t >= 1 for t in range(len(starts))]  # position 0 is never predicted
    pieces = [query.completion[a:b] for a, b in zip(starts, ends, strict=True)]
    cuts = _merge_empty(_cuts_for(mode, query.completion, starts), predicted, pieces)
    if len(cuts) < 2:
        return [encoded]
    # A span's text ends where its last token ends: offsets may leave out a token's leading
    # space (trim_offsets), and that space belongs to the span that holds the token.
    bounds = [0] + [ends[c.last - 1] for c in cuts[:-1]] + [len(query.completion)]
    out = [encoded]
    for k, cut in enumerate(cuts):
        labels = encoded.input_ids.clone()
        labels[0, : offset + cut.first] = -100
        labels[0, offset + cut.last :] = -100
        text = query.completion[bounds[k] : bounds[k + 1]]
        span = Span(query.query_id, k, bounds[k], bounds[k + 1], text)
        # As text, a span query is "the prompt and the completion before the span, then the
        # span": what its loss measures (later tokens cannot change it in a causal LM), and
        # what a text-based method such as bm25 should search for.
        sub = dataclasses.replace(
            query,
            query_id=span_query_id(query.query_id, k),
            prompt=query.prompt + query.completion[: bounds[k]],
            completion=text,
        )
        out.append(EncodedQuery(query=sub, input_ids=encoded.input_ids, labels=labels, span=span))
    return out


def expand_all(
    encoded: Sequence[EncodedQuery], tokenizer: PreTrainedTokenizerBase, mode: str
) -> list[EncodedQuery]:
    """Every query followed by its spans, in input order."""
    return [q for e in encoded for q in expand_spans(e, tokenizer, mode)]


def group_size_for(queries: Sequence[EncodedQuery], queries_per_sweep: int) -> int:
    """Queries per sweep group, raised so that no query's spans need a sweep of their own.

    A query with S spans is 1 + S queries to the engine; with fewer per group its
    spans would spill into another corpus pass.
    """
    family: dict[str, int] = {}
    for q in queries:
        parent = q.span.parent_id if q.span is not None else q.query.query_id
        family[parent] = family.get(parent, 0) + 1
    return max(queries_per_sweep, max(family.values(), default=1))


def span_columns(frame: pd.DataFrame, query: EncodedQuery) -> pd.DataFrame:
    """Columns saying which span of which query a row scores (span_id -1: the whole completion)."""
    span, completion = query.span, query.query.completion
    frame["parent_query_id"] = span.parent_id if span else query.query.query_id
    frame["span_id"] = span.span_id if span else -1
    frame["span_start"] = span.char_start if span else 0
    frame["span_end"] = span.char_end if span else len(completion)
    frame["span_text"] = span.text if span else completion
    return frame


_PARENT_ONLY = ("prompt", "completion", "loss_on", "messages")


def nest_spans(
    entries: Sequence[dict[str, Any]], queries: Sequence[EncodedQuery], result: AttributionResult
) -> list[dict[str, Any]]:
    """Summary entries of whole queries, each holding its spans' entries under ``spans``.

    A query with spans also gets ``top_unit_spans``: for each of its top units, the
    span it supports most and its score for every span.
    """
    parents: dict[str, dict[str, Any]] = {}
    for entry, q in zip(entries, queries, strict=True):
        if q.span is None:
            parents[q.query.query_id] = dict(entry)
            continue
        fields = {k: v for k, v in entry.items() if k not in _PARENT_ONLY}
        span = dataclasses.asdict(q.span)
        span.pop("parent_id")
        parents[q.span.parent_id].setdefault("spans", []).append({**span, **fields})
    for qid, parent in parents.items():
        if "spans" in parent:
            parent["top_unit_spans"] = result.span_support(qid, k=10).to_dict("records")
    return list(parents.values())
