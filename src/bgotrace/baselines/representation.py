"""``repsim``: representation similarity, a stand-in for embedding retrieval.

Each text is embedded by the model itself: the mean of its last hidden states (the last
entry of ``hidden_states``, i.e. after the final layer norm in HF GPT-2 and Llama) over its
real tokens (padding masked out). A unit is embedded from all its tokens; a query by
default from all tokens of prompt + completion (the hidden states of the completion
depend on the prompt anyway), or from its completion tokens only
(``query_pool="completion"``). Score: cosine similarity in [-1, 1]; high = the model
represents unit and query alike, taken as support.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bgotrace.baselines.base import Attributor, MethodContext, register
from bgotrace.cache.batching import collate, length_buckets
from bgotrace.errors import ConfigError
from bgotrace.query import EncodedQuery

POOLS = ("all", "completion")


@dataclass
class RepSimOptions:
    """Options of ``repsim``."""

    query_pool: str = "all"
    """Query tokens averaged: ``all`` (prompt + completion) or ``completion`` (loss tokens)."""

    def __post_init__(self) -> None:
        if self.query_pool not in POOLS:
            raise ConfigError(
                f"repsim query_pool={self.query_pool!r} is unknown: use one of {', '.join(POOLS)}."
            )


def last_hidden(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """Last hidden states (B, T, H) in float32."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        output_hidden_states=True,
        use_cache=False,
    )
    return out.hidden_states[-1].float()


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean (B, H) of hidden (B, T, H) over the positions where mask (B, T) is nonzero."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def unit_norm(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` scaled to unit length (zero rows stay zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)


@register("repsim")
class RepSimAttributor(Attributor):
    """Cosine (n_queries, n_units) of mean-pooled last hidden states, in [-1, 1]."""

    Options = RepSimOptions

    @torch.inference_mode()
    def _prepare(self, ctx: MethodContext) -> None:
        batches = length_buckets(np.arange(ctx.n_units), ctx.cache.lengths, ctx.batch_size)
        pooled = []
        for batch in batches:
            ids, mask, _ = collate(ctx.cache, batch, ctx.pad_id, ctx.torch_device)  # (B, T) each
            pooled.append(masked_mean(last_hidden(ctx.model, ids, mask), mask).double().cpu())
        order = torch.from_numpy(np.concatenate(batches))  # unit index of each pooled row
        embeddings = torch.empty(ctx.n_units, pooled[0].shape[-1], dtype=torch.float64)
        embeddings[order] = unit_norm(torch.cat(pooled))  # (N, H), cache order
        self.embeddings = embeddings

    @torch.inference_mode()
    def _score(self, queries: list[EncodedQuery]) -> np.ndarray:
        ctx = self._prepared()
        rows = []
        for q in queries:
            ids = q.input_ids.to(ctx.torch_device)  # (1, T)
            mask = torch.ones_like(ids) if self.opts.query_pool == "all" else _loss_positions(q)
            pooled = masked_mean(last_hidden(ctx.model, ids, None), mask.to(ids.device))
            rows.append(unit_norm(pooled)[0].double().cpu())
        return (torch.stack(rows) @ self.embeddings.T).numpy()  # (Q, N) cosines


def _loss_positions(q: EncodedQuery) -> torch.Tensor:
    """(1, T) mask of the tokens the query's loss covers (the completion by default)."""
    return (q.labels != -100).long()
