"""One streaming pass over the token cache under several model states.

Each batch of units is read once and evaluated under every state in the sweep
(θ0 and the perturbed θ+/θ− of several queries), so the corpus I/O and batching are
shared by all of them. Only per-unit loss sums leave this module; per-token losses
are recomputed later for the few top units that a report shows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from bgotrace.modeling.losses import forward_logits, token_losses
from bgotrace.score.batching import TokenSource, collate, length_buckets

Overrides = Mapping[str, torch.Tensor] | None
"""Replacement values of some parameters; None is the base model θ0."""


@torch.inference_mode()
def unit_loss_sums(
    model: torch.nn.Module,
    units: TokenSource,
    indices: np.ndarray,
    states: Sequence[Overrides],
    *,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    advance: Callable[[int], None] = lambda n: None,
) -> tuple[np.ndarray, np.ndarray]:
    """Summed token NLL of each unit under each state, and each unit's token count.

    Returns ``sums`` (n_states, len(indices)) float64 and ``counts`` (len(indices),),
    both in the order of ``indices``.
    """
    position = {int(u): k for k, u in enumerate(indices)}
    sums = np.zeros((len(states), len(indices)), dtype=np.float64)
    counts = np.zeros(len(indices), dtype=np.int64)
    for batch in length_buckets(indices, units.lengths, batch_size):
        input_ids, attention_mask, labels = collate(units, batch, pad_id, device)
        cols = [position[int(u)] for u in batch]
        counts[cols] = (labels[:, 1:] != -100).sum(dim=1).cpu().numpy()
        for s, overrides in enumerate(states):
            logits = forward_logits(model, input_ids, attention_mask, overrides)  # (B, T, V)
            sums[s, cols] = token_losses(logits, labels).sum(dim=1).double().cpu().numpy()
        advance(len(batch))
    return sums, counts


@torch.inference_mode()
def unit_token_losses(
    model: torch.nn.Module,
    units: TokenSource,
    index: int,
    states: Sequence[Overrides],
    *,
    device: torch.device,
) -> np.ndarray:
    """Per-token NLL (n_states, L-1) of one unit under each state (token t predicted from < t)."""
    input_ids, attention_mask, labels = collate(units, np.array([index]), 0, device)
    rows = [
        token_losses(forward_logits(model, input_ids, attention_mask, o), labels)[0] for o in states
    ]
    return torch.stack(rows).double().cpu().numpy()
