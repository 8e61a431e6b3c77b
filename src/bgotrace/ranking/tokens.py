"""Per-token loss changes of the top units, so spans that carry the score can be shown."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedTokenizerBase

from bgotrace.cache.batching import TokenSource
from bgotrace.score.engine import QueryLosses
from bgotrace.score.sweep import unit_token_losses
from bgotrace.variants import score_losses


def top_token_changes(
    model: torch.nn.Module,
    units: TokenSource,
    tokenizer: PreTrainedTokenizerBase,
    result: QueryLosses,
    ranked: pd.DataFrame,
    *,
    k: int,
    variant: str,
    device: torch.device,
    divisors: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """For each of the top-k units: its tokens and each predicted token's score (nats).

    ``token_scores[t]`` belongs to ``tokens[t + 1]`` (the first token is not predicted);
    for ``reduce=sum`` the unit's score is the sum of its token scores divided by
    ``normalizer`` (the unit's entry of ``divisors`` under ``--normalize sensitivity``, else 1).
    """
    names = sorted(result.states)
    rows = []
    for row in ranked.head(k).itertuples():
        index = int(row.unit_index)
        per_state = unit_token_losses(
            model, units, index, [result.states[n] for n in names], device=device
        )
        token_scores = score_losses(variant, dict(zip(names, per_state, strict=True)))
        ids = units.unit_tokens(index).tolist()
        rows.append(
            {
                "query_id": result.query.query.query_id,
                "unit_id": row.unit_id,
                "rank": int(row.rank),
                "score": float(row.score),
                "normalizer": 1.0 if divisors is None else float(divisors[index]),
                "tokens": [tokenizer.decode([t]) for t in ids],
                "token_scores": [round(float(s), 6) for s in token_scores],
            }
        )
    return rows
