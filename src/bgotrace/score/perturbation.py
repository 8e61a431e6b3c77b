"""Perturb every query of a group in the directions the score variant needs.

The states come back in the sweep dtype, in a fixed order (query, direction), with θ0
(``None``) appended when the variant compares against the base model.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

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


def perturb_group(ctx: SweepContext, group: Sequence[EncodedQuery]) -> PerturbedGroup:
    """θ+ and/or θ− of every query in ``group`` (+ θ0 when the variant needs it)."""
    needed = STATES_NEEDED[ctx.score_cfg.score]
    directions = [d for d in (DESCENT, ASCENT) if d in needed]
    sweep_dtype = next(ctx.sweep_model.parameters()).dtype
    out = PerturbedGroup(keys=[], states=[], trajectories=[{} for _ in group])
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
            out.keys.append((qi, direction))
            out.states.append({n: t.to(sweep_dtype) for n, t in state.params.items()})
            out.trajectories[qi][direction] = state.loss_trajectory
            advance(1)
    if BASE in needed:
        out.keys.append((-1, BASE))
        out.states.append(None)
    return out
