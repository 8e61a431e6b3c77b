"""Perturb each query and sweep the corpus under all perturbed states.

Queries are processed in groups of ``queries_per_sweep``: every query of a group is
perturbed first (θ+ and/or θ−, as the score variant needs), then one resumable
sweep over the token cache evaluates all of the group's states together.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from bgotrace.config import PerturbConfig, ScoreConfig
from bgotrace.modeling.fingerprint import tensors_fingerprint
from bgotrace.perturb.steps import ASCENT, DESCENT, perturb
from bgotrace.query import EncodedQuery
from bgotrace.report.progress import progress_task
from bgotrace.score.batching import TokenSource
from bgotrace.score.executor import Block, BlockExecutor, LocalExecutor
from bgotrace.score.store import RunStore
from bgotrace.score.sweep import Overrides
from bgotrace.score.variants import BASE, STATES_NEEDED, reduce_sums


@dataclass
class QueryLosses:
    """Per-unit losses of one query's states, ready to be turned into scores."""

    query: EncodedQuery
    losses: dict[str, np.ndarray]
    """State name (``ascent``, ``descent``, ``base``) → per-unit reduced loss (n_units,)."""
    counts: np.ndarray
    """Predicted tokens per unit (n_units,)."""
    states: dict[str, Overrides] = field(default_factory=dict)
    """The states themselves (sweep dtype), to recompute per-token losses of top units."""
    trajectories: dict[str, list[float]] = field(default_factory=dict)
    """Query loss along each perturbation (nats)."""


@dataclass
class SweepContext:
    """Everything the engine needs besides the queries."""

    model: torch.nn.Module
    """Base model in the perturbation dtype (float32 recommended)."""
    sweep_model: torch.nn.Module
    """Base model in the sweep dtype (may be ``model`` itself)."""
    units: TokenSource
    names: Sequence[str]
    perturb_cfg: PerturbConfig
    score_cfg: ScoreConfig
    device: torch.device
    pad_id: int
    n_units: int
    fisher: Mapping[str, torch.Tensor] | None = None
    store: RunStore | None = None
    block_executor: BlockExecutor | None = None
    """Where blocks are computed; this process when None."""

    def executor(self) -> BlockExecutor:
        if self.block_executor is None:
            self.block_executor = LocalExecutor(
                self.sweep_model, self.units, self.score_cfg.batch_size, self.pad_id, self.device
            )
        return self.block_executor


def score_queries(ctx: SweepContext, queries: Sequence[EncodedQuery]) -> list[QueryLosses]:
    """Per-unit losses under the needed states, for every query."""
    size = ctx.score_cfg.queries_per_sweep
    results: list[QueryLosses] = []
    for g, start in enumerate(range(0, len(queries), size)):
        results.extend(_score_group(ctx, g, queries[start : start + size]))
    return results


def _perturb_group(
    ctx: SweepContext, group: Sequence[EncodedQuery]
) -> tuple[list[tuple[int, str]], list[Overrides], list[dict[str, list[float]]]]:
    needed = STATES_NEEDED[ctx.score_cfg.score]
    directions = [d for d in (DESCENT, ASCENT) if d in needed]
    sweep_dtype = next(ctx.sweep_model.parameters()).dtype
    keys: list[tuple[int, str]] = []
    states: list[Overrides] = []
    trajectories: list[dict[str, list[float]]] = [{} for _ in group]
    with progress_task("Perturbing", total=len(group) * len(directions)) as advance:
        for (qi, q), direction in itertools.product(enumerate(group), directions):
            state = perturb(
                ctx.model,
                q,
                ctx.names,
                ctx.perturb_cfg,
                direction,
                n_units=ctx.n_units,
                fisher=ctx.fisher,
            )
            keys.append((qi, direction))
            states.append({n: t.to(sweep_dtype) for n, t in state.params.items()})
            trajectories[qi][direction] = state.loss_trajectory
            advance(1)
    if BASE in needed:
        keys.append((-1, BASE))
        states.append(None)
    return keys, states, trajectories


def _score_group(ctx: SweepContext, g: int, group: Sequence[EncodedQuery]) -> list[QueryLosses]:
    keys, states, trajectories = _perturb_group(ctx, group)
    if ctx.store is not None:
        fingerprints = {
            f"{group[q].query.query_id if q >= 0 else ''}:{d}": (
                tensors_fingerprint(s) if s is not None else BASE
            )
            for (q, d), s in zip(keys, states, strict=True)
        }
        ctx.store.check_state(f"group{g:03d}", fingerprints)
    sums, counts = _sweep(ctx, g, states)
    losses = reduce_sums(sums, counts[None, :], ctx.score_cfg.reduce)
    out = []
    for qi, q in enumerate(group):
        mine = [(k, d) for k, (owner, d) in enumerate(keys) if owner in (qi, -1)]
        out.append(
            QueryLosses(
                query=q,
                losses={d: losses[k] for k, d in mine},
                counts=counts,
                states={d: states[k] for k, d in mine},
                trajectories=trajectories[qi],
            )
        )
    return out


def _sweep(ctx: SweepContext, g: int, states: list[Overrides]) -> tuple[np.ndarray, np.ndarray]:
    n, size = ctx.n_units, ctx.score_cfg.block_units
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
