"""Perturb every query of a group in the directions the score variant needs.

The states come back in the sweep dtype, in a fixed order (query, direction), with θ0
(``None``) appended when the variant compares against the base model.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bgotrace.config import PerturbConfig
from bgotrace.perturb.calibrate import Calibration, resolve_query_config
from bgotrace.perturb.steps import ASCENT, DESCENT, perturb
from bgotrace.query import EncodedQuery
from bgotrace.report.progress import progress_task
from bgotrace.score.context import SweepContext
from bgotrace.score.sweep import Overrides
from bgotrace.score.variants import BASE, STATES_NEEDED


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
    needed = STATES_NEEDED[ctx.score_cfg.score]
    directions = [d for d in (DESCENT, ASCENT) if d in needed]
    sweep_dtype = next(ctx.sweep_model.parameters()).dtype
    out = PerturbedGroup(keys=[], states=[], trajectories=[{} for _ in group])
    configs = _query_configs(ctx, group)
    with progress_task("Perturbing", total=len(group) * len(directions)) as advance:
        for (qi, q), direction in itertools.product(enumerate(group), directions):
            cfg, cal = configs[qi]
            if cal is not None and cal.ascent is not None and direction == ASCENT:
                state = cal.ascent  # the search already ran these K steps at this lr
            else:
                state = perturb(
                    ctx.model, q, ctx.names, cfg, direction, n_units=ctx.n_units, fisher=ctx.fisher
                )
            out.keys.append((qi, direction))
            out.states.append({n: t.to(sweep_dtype) for n, t in state.params.items()})
            out.trajectories[qi][direction] = state.loss_trajectory
            advance(1)
    for qi, (_, cal) in enumerate(configs):
        trajectories = out.trajectories[qi]
        entry = None if cal is None else {**cal.to_dict(), "loss_trajectories": trajectories}
        out.calibrations.append(entry)
    if BASE in needed:
        out.keys.append((-1, BASE))
        out.states.append(None)
    return out
