"""Per-token and mean causal-LM losses, always accumulated in float32.

Shared by the perturbation (query loss) and the corpus sweep (unit losses) so both
take the loss exactly the same way.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch.func import functional_call

IGNORE = -100


def forward_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    overrides: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Logits (B, T, V) of ``model``, with some parameters replaced by ``overrides``.

    ``functional_call`` never writes into the model, so the base parameters stay
    bit-identical however many perturbed states are evaluated.
    """
    if attention_mask is None:  # unpadded: say so, or HF warns whenever a pad id occurs
        attention_mask = torch.ones_like(input_ids)
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if overrides:
        out = functional_call(model, dict(overrides), args=(), kwargs=kwargs, strict=False)
    else:
        out = model(**kwargs)
    return out.logits


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """NLL (B, T-1) of each predicted token in float32; 0 where labels are IGNORE."""
    shift_logits = logits[:, :-1, :].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    losses = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    )
    return losses.view(shift_labels.shape)


HEAD_CHUNK_ROWS = 256
"""Tokens per LM-head chunk: a (256, V) float32 block of logits stays small and warm in cache,
where the whole batch's (B, T, V) logits (plus a float32 copy) would not."""


def head_token_losses(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    labels: torch.Tensor,
    chunk_rows: int = HEAD_CHUNK_ROWS,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """NLL (B, T-1) float32 of each predicted token from final hidden states (B, T, D).

    The head runs only on positions that predict a token (no padding, not the last
    position), ``chunk_rows`` tokens at a time, in the hidden states' dtype; each chunk's
    logits are cast to float32 before the logsumexp, so the result equals
    :func:`token_losses` of the full logits up to float32 rounding. 0 where IGNORE.
    ``keep``: those positions b·T + t (int64, (N,)) when the caller knows them already (the
    sweep reads them from the host's lengths): selecting by a boolean mask instead makes the
    host wait for the device to count it, once per call.
    """
    if keep is not None:
        return _kept_token_losses(hidden, head, labels, chunk_rows, keep)
    targets = labels[:, 1:]  # (B, T-1)
    in_loss = targets != IGNORE
    rows, wanted = hidden[:, :-1][in_loss], targets[in_loss]  # (N, D), (N,)
    out = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    parts = _chunk_losses(rows, wanted, head, chunk_rows)
    return out.masked_scatter(in_loss, torch.cat(parts)) if parts else out


def _chunk_losses(
    rows: torch.Tensor, wanted: torch.Tensor, head: torch.nn.Module, chunk_rows: int
) -> list[torch.Tensor]:
    """NLL (≤ chunk_rows,) float32 of each chunk of rows (N, D) predicting ``wanted`` (N,)."""
    return [
        F.cross_entropy(head(rows[i : i + chunk_rows]).float(), wanted[i : i + chunk_rows],
                        reduction="none")
        for i in range(0, len(rows), chunk_rows)
    ]  # fmt: skip


def _kept_token_losses(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    labels: torch.Tensor,
    chunk_rows: int,
    keep: torch.Tensor,
) -> torch.Tensor:
    """:func:`head_token_losses` at the positions ``keep`` (b·T + t, predicting t + 1)."""
    batch, tokens = labels.shape
    rows = hidden.reshape(batch * tokens, -1).index_select(0, keep)  # (N, D)
    wanted = labels.reshape(-1).index_select(0, keep + 1)  # (N,)
    out = torch.zeros(batch * tokens, dtype=torch.float32, device=hidden.device)
    parts = _chunk_losses(rows, wanted, head, chunk_rows)
    if parts:
        out = out.index_copy(0, keep, torch.cat(parts))
    return out.view(batch, tokens)[:, :-1]


def mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL over the tokens whose labels are not IGNORE (a scalar, float32)."""
    return mean_token_loss(token_losses(logits, labels), labels)


def mean_token_loss(losses: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean of per-token losses (B, T-1) over the predicted tokens (labels not IGNORE)."""
    n = (labels[:, 1:] != IGNORE).sum().clamp(min=1)
    return losses.sum() / n
