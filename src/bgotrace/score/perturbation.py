"""Perturb every query of a group in the directions the score variant needs.

The states come back in the sweep dtype, in a fixed order (query, direction), with θ0
(``None``) appended when the variant compares against the base model. An executor with
a ``perturb_many`` method (Ray workers) runs the perturbations in parallel instead of this
process one after another; it runs the same :func:`perturb`. In this process a query's
descent and ascent run as one :func:`perturb_pair` (bit-identical; their shared first step
is taken once), and with ``--lr auto`` the descent starts from the search's loss and
gradient at θ0 (bit-identical too; the ascent is the search's own).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import torch

from bgotrace.config import PerturbConfig
from bgotrace.perturb.calibrate import Calibration, resolve_query_config
from bgotrace.perturb.steps import (
    ASCENT,
    DESCENT,
    PerturbedState,
    Start,
    perturb,
    perturb_pair,
)
from bgotrace.query import EncodedQuery
from bgotrace.runtime.progress import progress_task
from bgotrace.score.context import SweepContext
from bgotrace.score.sweep import Overrides
from bgotrace.variants import BASE, get_variant


@dataclass
class PerturbedGroup:
    """The states one sweep evaluates, and who owns each."""

    keys: list[tuple[int, str]]
    """(query index in the group, direction) per state; index -1 is θ0, shared by all."""
    states: list[Overrides]
    """Perturbed parameter values in the sweep dtype (None: θ0)."""
    trajectories: list[dict[str, list[float]]]
    """Per query: direction → query loss along the perturbation (nats)."""
    calibrations: list[dict[str, Any] | None] = field(default_factory=list)
    """Per query: the ``--lr auto`` search (:class:`Calibration` as a dict + both
    directions' loss trajectories), None with a fixed lr."""


PerturbJob = tuple[EncodedQuery, PerturbConfig, str]
"""A query, its perturbation config and a direction: one call of :func:`perturb`."""


class ParallelPerturber(Protocol):
    """What an executor offers to perturb many queries at once (optional)."""

    def perturb_many(
        self,
        jobs: Sequence[PerturbJob],
        names: Sequence[str],
        *,
        n_units: int,
        fisher: Mapping[str, torch.Tensor] | None,
        advance: Callable[[int], None],
    ) -> list[PerturbedState]:
        """``perturb(model, *job, ...)`` of every job, in the order of ``jobs``."""
        ...


def _perturb_jobs(
    ctx: SweepContext,
    jobs: Sequence[PerturbJob],
    starts: list[Start | None],
    advance: Callable[[int], None],
) -> list[PerturbedState]:
    """``starts``: per job, the query's θ0 loss and gradient when the lr search has it."""
    executor = ctx.block_executor
    if jobs and hasattr(executor, "perturb_many"):  # the workers take their own first step
        return cast(ParallelPerturber, executor).perturb_many(
            jobs, ctx.names, n_units=ctx.n_units, fisher=ctx.fisher, advance=advance
        )
    return _perturb_locally(ctx, jobs, starts, advance)


def _perturb_locally(
    ctx: SweepContext,
    jobs: Sequence[PerturbJob],
    starts: list[Start | None],
    advance: Callable[[int], None],
) -> list[PerturbedState]:
    """The jobs in this process; a query's descent + ascent share their first step, and a
    job with a start begins there (each start is dropped from ``starts`` once used)."""
    model, names, n_units, fisher = ctx.model, ctx.names, ctx.n_units, ctx.fisher
    out: list[PerturbedState] = []
    while len(out) < len(jobs):
        k = len(out)
        q, cfg, direction = jobs[k]
        kw: dict[str, Any] = {"n_units": n_units, "fisher": fisher, "start": starts[k]}
        if k + 1 < len(jobs) and _is_pair(jobs[k], jobs[k + 1]):
            out.extend(perturb_pair(model, q, names, cfg, **kw))
        else:
            out.append(perturb(model, q, names, cfg, direction, **kw))
        starts[k : len(out)] = [None] * (len(out) - k)  # one gradient less alive
        advance(len(out) - k)
    return out


def _is_pair(first: PerturbJob, second: PerturbJob) -> bool:
    """Descent then ascent of one query at one config: both start with the same step."""
    return (
        first[0] is second[0]
        and first[1] == second[1]
        and (first[2], second[2]) == (DESCENT, ASCENT)
    )


def _query_configs(
    ctx: SweepContext, group: Sequence[EncodedQuery]
) -> list[tuple[PerturbConfig, Calibration | None]]:
    """Each query's perturbation config, ``lr: auto`` resolved by the search on the query."""
    if ctx.perturb_cfg.lr != "auto":
        return [(ctx.perturb_cfg, None)] * len(group)
    out = []
    with progress_task("Calibrating lr", total=len(group)) as advance:
        for q in group:
            resolved = resolve_query_config(
                ctx.model, q, ctx.names, ctx.perturb_cfg, n_units=ctx.n_units, fisher=ctx.fisher
            )
            cal = resolved[1]
            assert cal is not None
            out.append(resolved)
            advance(1, f"{q.query.query_id}: lr {cal.lr:.3g}, {cal.query_steps} query steps")
    return out


def perturb_group(ctx: SweepContext, group: Sequence[EncodedQuery]) -> PerturbedGroup:
    """θ+ and/or θ− of every query in ``group`` (+ θ0 when the variant needs it)."""
    needed = get_variant(ctx.score_cfg.score).states
    directions = [d for d in (DESCENT, ASCENT) if d in needed]
    sweep_dtype = next(ctx.sweep_model.parameters()).dtype
    out = PerturbedGroup(keys=[], states=[], trajectories=[{} for _ in group])
    configs = _query_configs(ctx, group)
    pairs = list(itertools.product(range(len(group)), directions))
    reused = {  # the lr search already ran these K ascent steps at this lr
        k: cal.ascent
        for k, (qi, d) in enumerate(pairs)
        if (cal := configs[qi][1]) is not None and cal.ascent is not None and d == ASCENT
    }
    todo = [k for k in range(len(pairs)) if k not in reused]
    with progress_task("Perturbing", total=len(pairs)) as advance:
        advance(len(reused))
        jobs = [(group[pairs[k][0]], configs[pairs[k][0]][0], pairs[k][1]) for k in todo]
        # The lr search's θ0 loss and gradient is the descent's first step too (whatever η)
        starts = [None if (c := configs[pairs[k][0]][1]) is None else c.start for k in todo]
        for _, cal in configs:  # `starts` holds them now, and drops each once used
            if cal is not None:
                cal.start = None
        computed = dict(zip(todo, _perturb_jobs(ctx, jobs, starts, advance), strict=True))
    for k, (qi, direction) in enumerate(pairs):
        state = reused[k] if k in reused else computed[k]
        out.keys.append((qi, direction))
        out.states.append({n: t.to(sweep_dtype) for n, t in state.params.items()})
        out.trajectories[qi][direction] = state.loss_trajectory
    for qi, (_, cal) in enumerate(configs):
        trajectories = out.trajectories[qi]
        entry = None if cal is None else {**cal.to_dict(), "loss_trajectories": trajectories}
        out.calibrations.append(entry)
    if BASE in needed:
        out.keys.append((-1, BASE))
        out.states.append(None)
    return out
