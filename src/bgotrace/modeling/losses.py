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


def mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL over the tokens whose labels are not IGNORE (a scalar, float32)."""
    return mean_token_loss(token_losses(logits, labels), labels)


def mean_token_loss(losses: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean of per-token losses (B, T-1) over the predicted tokens (labels not IGNORE)."""
    n = (labels[:, 1:] != IGNORE).sum().clamp(min=1)
    return losses.sum() / n
