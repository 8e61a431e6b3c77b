"""Length-bucketed, right-padded batches of corpus units.

Sorting a block's units by length before batching keeps padding (wasted compute)
small; right padding plus the attention mask leaves every real token's loss
unchanged, which is what makes scores independent of the batch size.

:func:`collate` is where every consumer's labels are made: a unit's loss mask (an SFT
conversation's assistant tokens, :mod:`bgotrace.corpus.conversations`) turns the tokens
outside its loss into IGNORE there, so the sweep, the normaliser and the baselines all take
a unit's loss over the same tokens.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from bgotrace.modeling.losses import IGNORE


class TokenSource(Protocol):
    """What batching needs from a token cache.

    A source may also have ``unit_loss_mask(i)`` (``(length,)`` bool or None: every token)
    and ``loss_counts`` (``(n_units,)`` predicted tokens in each loss); one without them
    holds plain text only (:func:`unit_loss_mask`, :func:`loss_counts`).
    """

    @property
    def lengths(self) -> np.ndarray: ...

    def unit_tokens(self, i: int) -> np.ndarray: ...


class UnitTokens(Protocol):
    """A source of units' tokens (all :func:`unit_labels` needs)."""

    def unit_tokens(self, i: int) -> np.ndarray: ...


def unit_loss_mask(units: UnitTokens, i: int) -> np.ndarray | None:
    """Unit ``i``'s loss mask, ``(length,)`` bool; None where every token is in the loss."""
    method = getattr(units, "unit_loss_mask", None)
    return None if method is None else method(i)


def loss_counts(units: TokenSource) -> np.ndarray:
    """Predicted tokens in each unit's loss, ``(n_units,)`` int64 (plain text: length - 1)."""
    counts = getattr(units, "loss_counts", None)
    if counts is not None:
        return np.asarray(counts, dtype=np.int64)
    return np.maximum(units.lengths.astype(np.int64) - 1, 0)


def unit_labels(units: UnitTokens, i: int) -> np.ndarray:
    """Labels ``(length,)`` int64 of unit ``i`` alone: its tokens, IGNORE outside its loss."""
    labels = units.unit_tokens(i).astype(np.int64)
    mask = unit_loss_mask(units, i)
    if mask is not None:
        labels[~mask] = IGNORE
    return labels


def length_buckets(
    indices: np.ndarray, lengths: np.ndarray, batch_size: int, batch_tokens: int | None = None
) -> list[np.ndarray]:
    """Split ``indices`` into batches of units of similar length: ≤ ``batch_size`` units each,
    or with ``batch_tokens`` (``--batch-tokens``; 0/None: off) ≤ that many padded tokens each
    (units × the longest), whatever the number of units (see :func:`token_batches`)."""
    order = indices[np.argsort(lengths[indices], kind="stable")]
    if batch_tokens:
        return token_batches(order, lengths, batch_tokens)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def token_batches(order: np.ndarray, lengths: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Consecutive runs of ``order`` (sorted by length, shortest first) holding at most
    ``batch_tokens`` padded tokens, B × the run's longest unit: short units go in large
    batches, long ones in small; a unit longer than the budget is a batch alone."""
    batches, start = [], 0
    for end in range(1, len(order) + 1):  # order[end - 1] is the longest of [start, end)
        if end - start > 1 and (end - start) * int(lengths[order[end - 1]]) > batch_tokens:
            batches.append(order[start : end - 1])
            start = end - 1
    return [*batches, order[start:]] if len(order) else []


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
    in_loss = _loss_rows(units, batch, width)  # (B, T) bool, None: every real token
    if in_loss is None:
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE)
    else:
        labels = input_ids.masked_fill(~_to_device(torch.from_numpy(in_loss), device), IGNORE)
    return input_ids, attention_mask, labels


def _loss_rows(units: TokenSource, batch: np.ndarray, width: int) -> np.ndarray | None:
    """``(B, width)`` bool: real tokens in their unit's loss (None: all real tokens are)."""
    masks = [unit_loss_mask(units, int(i)) for i in batch]
    if all(m is None for m in masks):
        return None
    out = np.zeros((len(batch), width), dtype=bool)
    for row, (i, m) in enumerate(zip(batch, masks, strict=True)):
        out[row, : units.lengths[int(i)]] = True if m is None else m
    return out


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host batch to ``device``; to a GPU from pinned memory, without blocking the host
    (the copy overlaps the previous batch's kernels)."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
