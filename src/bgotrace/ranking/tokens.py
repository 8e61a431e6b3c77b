"""Per-token loss changes of the top units, so spans that carry the score can be shown."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from bgotrace.cache.batching import TokenSource, unit_loss_mask
from bgotrace.score.engine import QueryLosses
from bgotrace.score.sweep import unit_token_losses
from bgotrace.variants import score_losses


class TopUnit(NamedTuple):
    """A unit among a query's best, as the ranked outputs show it."""

    unit_index: int
    unit_id: str
    rank: int
    """1 = best, in the ranked table's order (``ranking.aggregate.unit_scores``)."""
    score: float


def top_units(
    scores: np.ndarray, k: int, candidate: np.ndarray | None, unit_ids: np.ndarray
) -> list[TopUnit]:
    """The ``k`` best units of ``scores`` (n_units,), candidates only when ``candidate`` is
    given, in the ranked table's order: score descending, ties by unit index, NaN last."""
    nan = np.isnan(scores)
    ranked = np.lexsort((-np.where(nan, 0.0, scores), nan))  # NaN last, then best first; stable
    rank = np.empty(len(scores), dtype=np.int64)
    rank[ranked] = np.arange(1, len(scores) + 1)
    order = ranked if candidate is None else ranked[candidate[ranked]]
    return [TopUnit(int(i), str(unit_ids[i]), int(rank[i]), float(scores[i])) for i in order[:k]]


def top_token_changes(
    model: torch.nn.Module,
    units: TokenSource,
    tokenizer: PreTrainedTokenizerBase,
    result: QueryLosses,
    top: Sequence[TopUnit],
    *,
    variant: str,
    device: torch.device,
    divisors: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """For each unit of ``top``: its tokens and each predicted token's score (nats).

    ``token_scores[t]`` belongs to ``tokens[t + 1]`` (the first token is not predicted);
    for ``reduce=sum`` the unit's score is the sum of its token scores divided by
    ``normalizer`` (the unit's entry of ``divisors`` under ``--normalize sensitivity``, else 1).
    A unit of an SFT conversation also has its turns (:func:`_turn_fields`); its tokens
    outside the loss score 0.
    """
    names = sorted(result.states)
    rows = []
    for row in top:
        index = row.unit_index
        per_state = unit_token_losses(
            model, units, index, [result.states[n] for n in names], device=device
        )
        token_scores = score_losses(variant, dict(zip(names, per_state, strict=True)))
        mask = unit_loss_mask(units, index)
        if mask is not None:
            token_scores = np.where(mask[1:], token_scores, 0.0)
        ids = units.unit_tokens(index).tolist()
        rows.append(
            {
                "query_id": result.query.query.query_id,
                "unit_id": row.unit_id,
                "rank": row.rank,
                "score": float(row.score),
                "normalizer": 1.0 if divisors is None else float(divisors[index]),
                "tokens": [tokenizer.decode([t]) for t in ids],
                "token_scores": [round(float(s), 6) for s in token_scores],
                **_turn_fields(units, index, mask),
            }
        )
    return rows


def _turn_fields(units: TokenSource, index: int, mask: np.ndarray | None) -> dict[str, Any]:
    """A conversation unit's ``turns`` ([first, last], 0-based), and per token its turn,
    role and whether its prediction is in the loss (``token_in_loss``); {} for plain text."""
    turns_of = getattr(units, "unit_turns", None)
    turns = turns_of(index) if turns_of is not None else None
    if turns is None or mask is None:
        return {}
    positions = range(len(mask))
    return {
        "turns": [turns.first, turns.last],
        "token_turns": [turns.turn_at(p) for p in positions],
        "token_roles": [turns.role_at(p) for p in positions],
        "token_in_loss": [bool(m) for m in mask],
    }
