"""Perturb each query and sweep the corpus under all perturbed states.

Queries are processed in groups of ``queries_per_sweep``: every query of a group is
perturbed first (:mod:`bgotrace.score.perturbation`), then one resumable sweep over the
units (:mod:`bgotrace.score.blocks`) evaluates all of the group's states together; a
resumed run first proves it recomputed the same states (:mod:`bgotrace.score.resume`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bgotrace.modeling.split import split_block
from bgotrace.query import EncodedQuery
from bgotrace.score.blocks import sweep_blocks
from bgotrace.score.context import SweepContext
from bgotrace.score.perturbation import PerturbedGroup, perturb_group
from bgotrace.score.resume import check_group_states, check_split
from bgotrace.score.sweep import Overrides, sweep_autocast
from bgotrace.score.variants import reduce_sums

__all__ = ["QueryLosses", "SweepContext", "check_split_once", "score_group", "score_queries"]


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
    calibration: dict[str, Any] | None = None
    """The ``--lr auto`` search for this query (None with a fixed lr)."""


def score_queries(ctx: SweepContext, queries: Sequence[EncodedQuery]) -> list[QueryLosses]:
    """Per-unit losses under the needed states, for every query (states kept: a test helper;
    runs go through :func:`bgotrace.bgo.run_bgo`, which drops each group's states)."""
    size = ctx.score_cfg.queries_per_sweep
    check_split_once(ctx)
    results: list[QueryLosses] = []
    for g, start in enumerate(range(0, len(queries), size)):
        results.extend(score_group(ctx, g, queries[start : start + size]))
    return results


def check_split_once(ctx: SweepContext) -> None:
    """A resumed run's shards must come from the same forward path (full, or split at a block)."""
    if ctx.store is not None:
        check_split(ctx.store, split_block(ctx.sweep_model, ctx.names))


def perturb_checked(ctx: SweepContext, g: int, group: Sequence[EncodedQuery]) -> PerturbedGroup:
    """The states of group ``g``; a resumed run proves they are the ones its shards came from."""
    perturbed = perturb_group(ctx, group)
    if ctx.store is not None:
        check_group_states(ctx.store, g, group, perturbed.keys, perturbed.states)
    return perturbed


def score_group(ctx: SweepContext, g: int, group: Sequence[EncodedQuery]) -> list[QueryLosses]:
    """BGO's group step: perturb every query of ``group``, sweep ``ctx.units`` under the states."""
    return sweep_group(ctx, g, group, perturb_checked(ctx, g, group))


def sweep_group(
    ctx: SweepContext, g: int, group: Sequence[EncodedQuery], perturbed: PerturbedGroup
) -> list[QueryLosses]:
    """Per-unit losses of each query's states (resumable blocks of group ``g``)."""
    keys, states = perturbed.keys, perturbed.states
    # --autocast: this process's blocks; Ray workers enter the same context around each block.
    with sweep_autocast(ctx.score_cfg.autocast, ctx.device):
        sums, counts = sweep_blocks(ctx, g, states)
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
                trajectories=perturbed.trajectories[qi],
                calibration=perturbed.calibrations[qi],
            )
        )
    return out
