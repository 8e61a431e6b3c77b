"""Who computes the blocks of a sweep: this process, or a pool of workers.

The engine hands an executor the blocks still missing (a resumed run skips the
rest) and the states to evaluate; the executor yields each block's loss sums as soon
as it is done, in any order, and the engine writes it as a resume point.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import torch

from bgotrace.cache.batching import TokenSource
from bgotrace.score.sweep import BoundGroup, Overrides, bind_group, unit_loss_sums

if TYPE_CHECKING:
    from bgotrace.cache.trunk_cache import TrunkRows


@dataclass(frozen=True)
class Block:
    """Units ``start:stop`` of the token cache, the ``index``-th block of the sweep."""

    index: int
    start: int
    stop: int


BlockResult = tuple[Block, np.ndarray, np.ndarray]
"""A block, its loss sums (n_states, n_block) and token counts (n_block,)."""


def compute_block(
    model: torch.nn.Module,
    units: TokenSource,
    block: Block,
    states: Sequence[Overrides] | BoundGroup,
    *,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    batch_tokens: int | None = None,
    trunk_rows: TrunkRows | None = None,
) -> BlockResult:
    """Loss sums of one block under every state (what each executor runs); an executor
    binds a group's states once for all its blocks (:func:`bind_group`)."""
    indices = np.arange(block.start, block.stop)
    sums, counts = unit_loss_sums(
        model, units, indices, states, batch_size=batch_size, pad_id=pad_id, device=device,
        batch_tokens=batch_tokens, trunk_rows=trunk_rows,
    )  # fmt: skip
    return block, sums, counts


class BlockExecutor(Protocol):
    def run(self, blocks: Sequence[Block], states: Sequence[Overrides]) -> Iterator[BlockResult]:
        """Yield every block's sums and counts, in any order."""
        ...


@runtime_checkable
class SharedExecutor(Protocol):
    """An executor whose workers can also sweep a subset view of the same cache (the Ray
    executor): a rerank group's sweep runs on the run's workers, not on new ones."""

    def over(self, units: TokenSource) -> BlockExecutor:
        """The same workers computing blocks of ``units``; closing it stops nothing."""
        ...


@dataclass
class LocalExecutor:
    """Computes blocks one after another in this process."""

    model: torch.nn.Module
    units: TokenSource
    batch_size: int
    pad_id: int
    device: torch.device
    trunk_rows: TrunkRows | None = None
    """Stored trunk outputs of the swept units (None: compute the trunk)."""
    batch_tokens: int | None = None
    """Padded tokens per batch instead of ``batch_size`` units (``--batch-tokens``)."""

    def run(self, blocks: Sequence[Block], states: Sequence[Overrides]) -> Iterator[BlockResult]:
        if not blocks:  # a resumed group with every block stored: nothing to bind
            return
        group = bind_group(self.model, states)
        for block in blocks:
            yield compute_block(
                self.model, self.units, block, group,
                batch_size=self.batch_size, pad_id=self.pad_id, device=self.device,
                batch_tokens=self.batch_tokens, trunk_rows=self.trunk_rows,
            )  # fmt: skip
