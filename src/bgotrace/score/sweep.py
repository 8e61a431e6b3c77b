"""One streaming pass over the token cache under several model states.

Each batch of units is read once and evaluated under every state in the sweep
(θ0 and the perturbed θ+/θ− of several queries), so the corpus I/O and batching are
shared by all of them. When every state moves only blocks ``>= b`` the batch's trunk
(embeddings + blocks ``< b``, base weights) is computed once and shared too
(:mod:`bgotrace.modeling.split`). Only per-unit loss sums leave this module; per-token
losses are recomputed later for the few top units that a report shows.

Order: the batches are taken a window at a time (:data:`WINDOW_TOKENS`), and each state runs
over the whole window before the next state starts. Batch by batch, a group of many states
reads every state's weights once per batch: once they no longer fit the CPU's cache together
(16 queries per sweep = 32 states of a 12-block width-128 GPT-2, 320 MB, against a 32 MB L3);
state by state over a window, a state's weights stay hot across the window's batches. Measured
side by side on CPU, 16 queries per sweep: 0.925 of the old order at 128-token units, 0.964 at
36 (benchmarks/RESULTS.md, "Issue 18, fourth session"; noisy, see there). The scores are the
same either way: every (state, batch) forward is the same computation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from bgotrace.cache.batching import TokenSource, collate, length_buckets, unit_loss_mask
from bgotrace.modeling.split import (
    BoundState,
    Overrides,
    TrunkState,
    bind_state,
    bound_token_losses,
    log_once,
    resume_trunk,
    split_block,
    state_token_losses,
    trunk,
)

if TYPE_CHECKING:
    from bgotrace.cache.trunk_cache import TrunkRows

__all__ = [
    "WINDOW_TOKENS",
    "BoundGroup",
    "Overrides",
    "bind_group",
    "states_split",
    "sweep_autocast",
    "unit_loss_sums",
    "unit_token_losses",
]

WINDOW_TOKENS = 16_384
"""Padded tokens of the batches one window holds (at least one batch): each state sweeps the
window's batches before the next state starts. What a window keeps alive beyond one batch is
its batches' inputs and, with a shared trunk, their trunk outputs (tokens × hidden width), at
most this many tokens' worth; :mod:`bgotrace.plan.memory` counts it."""


@contextmanager
def sweep_autocast(enabled: bool, device: torch.device) -> Iterator[None]:
    """The sweep's forwards under ``torch.autocast(device.type, bfloat16)`` when ``enabled``
    (``--autocast``): matmuls read the float32 weights and states as they are and compute in
    bfloat16, normalisations and the losses stay float32 (the LM head's logits are upcast
    before the cross-entropy). ``cache_enabled=False``: autocast would otherwise keep a
    bfloat16 cast of every weight until the block ends, the second copy this avoids."""
    if not enabled:
        yield
        return
    log_once("sweep under torch.autocast(%s, bfloat16): no weight copy", device.type)
    with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False):
        yield


def states_split(model: torch.nn.Module, states: Sequence[Overrides]) -> int | None:
    """The block every state's top starts at (None: full forward for each state)."""
    names = sorted({n for s in states if s for n in s})
    if not names:
        return None  # θ0 alone: nothing to share
    start = split_block(model, names)
    if start is not None:
        log_once("sweep split at block %d: trunk shared by %d states", start, len(states))
    return start


@dataclass(frozen=True)
class BoundGroup:
    """A sweep group's states bound once for all of its blocks (:func:`bind_group`)."""

    start: int | None
    """The block every state's top starts at (None: a full forward per state)."""
    states: list[BoundState]
    """Per state, module copies that share the base model's tensors."""

    def __len__(self) -> int:
        return len(self.states)


def bind_group(model: torch.nn.Module, states: Sequence[Overrides]) -> BoundGroup:
    """``states`` bound for many blocks: an executor binds a group once, not per block.
    Binding is a structural copy of the bound modules: 8.7 ms per state on a 12-block GPT-2
    (measured on CPU), by estimate ~1% of a 1B model's GPU sweep of a default 1,024-unit block
    and far more with small ``--block-units`` (benchmarks/bench_group_binding.py)."""
    start = states_split(model, states)
    return BoundGroup(start, [bind_state(model, start, s) for s in states])


@torch.inference_mode()
def unit_loss_sums(
    model: torch.nn.Module,
    units: TokenSource,
    indices: np.ndarray,
    states: Sequence[Overrides] | BoundGroup,
    *,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    batch_tokens: int | None = None,
    trunk_rows: TrunkRows | None = None,
    advance: Callable[[int], None] = lambda n: None,
    window_tokens: int = WINDOW_TOKENS,
) -> tuple[np.ndarray, np.ndarray]:
    """Summed token NLL of each unit under each state, and each unit's token count.

    Returns ``sums`` (n_states, len(indices)) float64 and ``counts`` (len(indices),),
    both in the order of ``indices``. Batches hold ``batch_size`` units, or with
    ``batch_tokens`` at most that many padded tokens (:func:`length_buckets`). With
    ``trunk_rows`` (a trunk cache of the same split) the trunk is read from disk instead of
    computed. ``window_tokens``: see :data:`WINDOW_TOKENS` (0: one batch per window).
    ``states`` already bound (:func:`bind_group`) are used as they are.
    """
    group = states if isinstance(states, BoundGroup) else bind_group(model, states)
    start, bound = group.start, group.states
    if trunk_rows is not None and trunk_rows.split != start:
        log_once("trunk cache (block %d) unused: this sweep splits at %s", trunk_rows.split, start)
        trunk_rows = None
    position = {int(u): k for k, u in enumerate(indices)}
    # The host does not wait for the device inside the loop: what it needs (token counts,
    # predicted positions) it reads from the lengths, and the sums stay on the device until
    # the block is done (one copy per block, not per state and batch). No padding mask: the
    # padding is on the right, so under the causal mask no real token attends to it, and
    # transformers would read a padding mask back to inspect it (a host sync per batch).
    parts, columns = [], []  # (n_states, B) float64 on the device; their units' positions
    counts = np.zeros(len(indices), dtype=np.int64)
    window: list[_Batch] = []

    def sweep_window() -> None:
        # state by state over the window's batches (module docstring: why this order)
        losses = [[bound_token_losses(model, b.shared, state, b.labels, b.kept).sum(dim=1)
                   for b in window] for state in bound]  # fmt: skip
        for k, b in enumerate(window):
            parts.append(torch.stack([row[k] for row in losses]).double())  # float32 sums
            columns.append(b.cols)
            advance(len(b.cols))
        window.clear()

    held = 0  # padded tokens in the window
    for batch in length_buckets(indices, units.lengths, batch_size, batch_tokens):
        input_ids, _, labels = collate(units, batch, pad_id, device)  # no mask: see above
        keep = predicted_positions(units, batch, input_ids.shape[1])
        cols = np.array([position[int(u)] for u in batch])
        counts[cols] = np.bincount(keep // input_ids.shape[1], minlength=len(batch))
        if window and held + input_ids.numel() > window_tokens:
            sweep_window()
            held = 0
        if trunk_rows is not None and start is not None:
            hidden = trunk_rows.batch(batch, input_ids.shape[1], device).to(_dtype(model))
            shared = resume_trunk(model, input_ids, None, start, hidden)
        else:
            shared = trunk(model, input_ids, None, start)
        window.append(_Batch(shared, labels, _to_device(keep, device), cols))
        held += input_ids.numel()
    if window:
        sweep_window()
    sums = np.zeros((len(bound), len(indices)), dtype=np.float64)
    if parts:
        sums[:, np.concatenate(columns)] = torch.cat(parts, dim=1).cpu().numpy()
    return sums, counts


@dataclass
class _Batch:
    """One batch of a window: its trunk (or inputs), labels, predicted positions, columns."""

    shared: TrunkState
    labels: torch.Tensor
    kept: torch.Tensor
    cols: np.ndarray


def predicted_positions(units: TokenSource, batch: np.ndarray, width: int) -> np.ndarray:
    """Positions b·width + t (int64) of a right-padded batch's tokens whose successor t + 1 is
    in its unit's loss (where ``collate``'s labels are not IGNORE), from the host's lengths
    and loss masks: nothing is read back from the device."""
    rows = [np.zeros(0, dtype=np.int64)]
    for b, i in enumerate(batch):
        n = int(units.lengths[int(i)])
        t = np.arange(max(n - 1, 0), dtype=np.int64)
        mask = unit_loss_mask(units, int(i))
        rows.append(b * width + (t if mask is None else t[np.asarray(mask[1:n], dtype=bool)]))
    return np.concatenate(rows)


def _to_device(host: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device``; to a GPU from pinned memory, without blocking the host."""
    tensor = torch.from_numpy(host)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


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
    shared = trunk(model, input_ids, attention_mask, states_split(model, states))
    rows = [state_token_losses(model, shared, o, labels)[0] for o in states]
    return torch.stack(rows).double().cpu().numpy()
