"""Length-bucketed, right-padded batches of corpus units.

Sorting a block's units by length before batching keeps padding (wasted compute)
small; right padding plus the attention mask leaves every real token's loss
unchanged, which is what makes scores independent of the batch size.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from bgotrace.modeling.losses import IGNORE


class TokenSource(Protocol):
    """What batching needs from a token cache."""

    @property
    def lengths(self) -> np.ndarray: ...

    def unit_tokens(self, i: int) -> np.ndarray: ...


def length_buckets(indices: np.ndarray, lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Split ``indices`` into batches of ≤ batch_size units of similar length."""
    order = indices[np.argsort(lengths[indices], kind="stable")]
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def collate(
    units: TokenSource, batch: np.ndarray, pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids (B, T), attention_mask (B, T) and labels (B, T) for a batch of units."""
    seqs = [units.unit_tokens(int(i)).astype(np.int64) for i in batch]
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    input_ids = _to_device(torch.from_numpy(ids), device)
    attention_mask = _to_device(torch.from_numpy(mask), device)
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE)
    return input_ids, attention_mask, labels


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host batch to ``device``; to a GPU from pinned memory, without blocking the host
    (the copy overlaps the previous batch's kernels)."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
