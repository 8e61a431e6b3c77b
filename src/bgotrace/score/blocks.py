"""The resumable sweep of one query group: blocks of units, each saved as it completes.

Blocks already on disk (from an interrupted run) are loaded; the executor computes the
rest, in any order, and each is written as a resume point. Only the per-unit sums and
counts are O(n_units) in memory.
"""

from __future__ import annotations

import numpy as np

from bgotrace.runtime.progress import progress_task
from bgotrace.score.context import SweepContext
from bgotrace.score.executor import Block
from bgotrace.score.sweep import Overrides


def sweep_blocks(
    ctx: SweepContext, g: int, states: list[Overrides]
) -> tuple[np.ndarray, np.ndarray]:
    """Loss sums (n_states, n_swept) float64 and token counts (n_swept,) of group ``g``."""
    n, size = ctx.n_swept, ctx.score_cfg.block_units
    sums = np.zeros((len(states), n), dtype=np.float64)
    counts = np.zeros(n, dtype=np.int64)
    todo = []
    for b, start in enumerate(range(0, n, size)):
        block = Block(b, start, min(start + size, n))
        shard = ctx.store.load_shard(g, b) if ctx.store is not None else None
        if shard is None:
            todo.append(block)
        else:  # done before an interruption
            sums[:, block.start : block.stop], counts[block.start : block.stop] = shard
    with progress_task(f"Scoring (group {g})", total=n) as advance:
        advance(n - sum(b.stop - b.start for b in todo))
        for block, block_sums, block_counts in ctx.executor().run(todo, states):
            if ctx.store is not None:
                ctx.store.save_shard(g, block.index, block_sums, block_counts)
            sums[:, block.start : block.stop] = block_sums
            counts[block.start : block.stop] = block_counts
            advance(block.stop - block.start)
    return sums, counts
