"""Per-query step-size calibration (``--lr auto``).

One η does not fit every model: Fisher steps at η = 1e-4 are the best setting on the
benchmark model and diverge on a model that has memorised its data (F̂ → 0), and one decade
of η moves fact MRR from 0.78 to 0.44 (benchmarks/RESULTS.md). ``--lr auto`` makes η a
property of the query instead: a short deterministic search, on the query alone (its forward
and backward passes, never the corpus), picks η so that K **ascent** steps reach a target
effect, and both directions then use that η.

Criteria (``--lr-criterion``), each with its target (``--lr-target``):

- ``loss`` (default): the ascent raises the query's mean loss by ``target`` nats after K
  steps. Ascent, not descent, because descent saturates on a query the model already knows
  (the loss cannot fall below 0), while ascent can always move; and a loss target bounds
  the perturbation by its effect, so it cannot diverge whatever the preconditioner does.
- ``radius``: the ascent's update has norm ``target`` × the norm of the perturbed
  parameters, ‖θ_K − θ0‖ / ‖θ0‖ (dimensionless).

The search works on log η: a first trial at a fixed start, proportional jumps until the
target is bracketed, then log-log interpolation inside the bracket (the effect is close to
a power of η), stopping once a trial is within ``TOLERANCE`` of the target or after
``MAX_TRIALS`` trials. A trial whose loss becomes NaN/inf counts as an overshoot. The
chosen η is the trial closest to the target (in log ratio), so the recorded ascent
trajectory is the one the perturbation reproduces. Every step is deterministic, so resume
fingerprints of the perturbed states still hold.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from bgotrace.config import PerturbConfig
from bgotrace.errors import NonFiniteLossError
from bgotrace.perturb.steps import ASCENT, PerturbedState, perturb
from bgotrace.query import EncodedQuery

log = logging.getLogger(__name__)

START_LR = {"adam": 1e-4, "fisher": 1e-4, "sgd": 1e-2}
"""First trial of the search per optimizer (the previous fixed defaults)."""
SPAN = (1e-6, 1e4)
"""The search stays within [start × SPAN[0], start × SPAN[1]]."""
TOLERANCE = 0.1
"""A trial within ±10% of the target ends the search."""
MAX_TRIALS = 10
"""At most this many trials of K ascent steps each."""
_MAX_JUMP = 100.0
"""Largest factor between consecutive trials before the target is bracketed."""


@dataclass
class Trial:
    """One candidate step size and the effect its K ascent steps had."""

    lr: float
    effect: float
    """Loss rise (nats) or relative radius; +inf when the loss became non-finite."""
    trajectory: list[float] = field(default_factory=list)
    """Query loss along the ascent (K+1 values, nats); empty when it diverged."""
    state: PerturbedState | None = field(default=None, repr=False)
    """The ascent's parameters, kept for the best trial so far only (memory)."""


@dataclass
class Calibration:
    """Outcome of the search for one query (``summary.json``: ``queries[i].calibration``)."""

    lr: float
    """The chosen step size η, shared by both directions."""
    criterion: str
    target: float
    achieved: float
    """The chosen trial's effect (same unit as ``target``)."""
    reached: bool
    """Whether ``achieved`` is within ``TOLERANCE`` of ``target``."""
    trials: list[Trial]
    seconds: float
    """Wall time of the search."""
    query_steps: int
    """Forward + backward passes on the query that the search cost."""
    ascent: PerturbedState | None = field(default=None, repr=False)
    """The chosen trial's ascent: exactly what ``perturb`` gives at ``lr``, so the caller
    reuses it instead of running the K ascent steps again."""

    def chosen(self) -> Trial:
        return next(t for t in self.trials if t.lr == self.lr)

    def to_dict(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "criterion": self.criterion,
            "target": self.target,
            "achieved": self.achieved,
            "reached": self.reached,
            "trials": [{"lr": t.lr, "effect": t.effect} for t in self.trials],
            "seconds": round(self.seconds, 4),
            "query_steps": self.query_steps,
        }


def _effect(state: PerturbedState, base: Mapping[str, torch.Tensor], criterion: str) -> float:
    if criterion == "loss":
        return state.final_loss - state.loss_trajectory[0]
    moved = sum(float((state.params[n].float() - base[n].float()).pow(2).sum()) for n in base)
    norm = sum(float(base[n].float().pow(2).sum()) for n in base)
    return math.sqrt(moved / max(norm, 1e-30))


def _trial(
    model: torch.nn.Module,
    query: EncodedQuery,
    names: Sequence[str],
    cfg: PerturbConfig,
    lr: float,
    *,
    n_units: int,
    fisher: Mapping[str, torch.Tensor] | None,
) -> Trial:
    trial_cfg = dataclasses.replace(cfg, lr=lr)
    try:
        state = perturb(model, query, names, trial_cfg, ASCENT, n_units=n_units, fisher=fisher)
    except NonFiniteLossError:  # a diverging trial is an overshoot, not an error
        return Trial(lr, math.inf)
    params = dict(model.named_parameters())
    base = {n: params[n].detach() for n in names}
    effect = _effect(state, base, cfg.lr_criterion)
    if not math.isfinite(effect):
        effect = math.inf
    return Trial(lr, effect, state.loss_trajectory, state)


def _rank(trial: Trial, target: float) -> tuple[float, float]:
    """Order of preference: closest to the target, then the smaller step."""
    return _log_ratio(trial.effect, target), trial.lr


def _keep_best_state(trials: Sequence[Trial], target: float) -> None:
    """Drop the parameters of every trial but the best so far (one copy in memory)."""
    kept = [t for t in trials if t.state is not None]
    if kept:
        best = min(kept, key=lambda t: _rank(t, target))
        for t in kept:
            if t is not best:
                t.state = None


def _log_ratio(effect: float, target: float) -> float:
    """Distance of an effect from the target on a log scale (inf when it cannot compare)."""
    if effect <= 0 or not math.isfinite(effect):
        return math.inf
    return abs(math.log(effect / target))


def _next_lr(trials: Sequence[Trial], target: float, lo_lr: float, hi_lr: float) -> float:
    """Next η: interpolate inside a bracket, else jump towards the target."""
    under = [t for t in trials if t.effect < target]
    over = [t for t in trials if t.effect >= target]
    lo = max(under, key=lambda t: t.lr) if under else None
    hi = min(over, key=lambda t: t.lr) if over else None
    if lo is not None and hi is not None and lo.lr < hi.lr:
        a, b = math.log(lo.lr), math.log(hi.lr)
        frac = 0.5
        if lo.effect > 0 and math.isfinite(hi.effect):  # log-log secant
            la, lb = math.log(lo.effect), math.log(hi.effect)
            frac = (math.log(target) - la) / (lb - la) if lb > la else 0.5
        frac = min(max(frac, 0.1), 0.9)  # always shrink the bracket
        return math.exp(a + frac * (b - a))
    if lo is not None and hi is None:  # every trial fell short: larger η
        factor = target / lo.effect if lo.effect > 0 else _MAX_JUMP
        return min(lo.lr * min(max(factor, 2.0), _MAX_JUMP), hi_lr)
    assert hi is not None
    factor = hi.effect / target if math.isfinite(hi.effect) else _MAX_JUMP
    return max(hi.lr / min(max(factor, 2.0), _MAX_JUMP), lo_lr)


def calibrate_lr(
    model: torch.nn.Module,
    query: EncodedQuery,
    names: Sequence[str],
    cfg: PerturbConfig,
    *,
    n_units: int,
    fisher: Mapping[str, torch.Tensor] | None = None,
) -> Calibration:
    """Search η for one query so K ascent steps reach ``cfg.lr_target``."""
    started = time.perf_counter()
    target, start = cfg.lr_target, START_LR[cfg.optimizer]
    lo_lr, hi_lr = start * SPAN[0], start * SPAN[1]
    trials: list[Trial] = []
    lr = start
    for _ in range(MAX_TRIALS):
        trials.append(_trial(model, query, names, cfg, lr, n_units=n_units, fisher=fisher))
        _keep_best_state(trials, target)
        if _log_ratio(trials[-1].effect, target) <= math.log1p(TOLERANCE):
            break
        lr = _next_lr(trials, target, lo_lr, hi_lr)
        if any(math.isclose(lr, t.lr, rel_tol=1e-9) for t in trials):
            break  # pinned at an end of the span, or the bracket cannot shrink further
    finite = [t for t in trials if t.trajectory]
    if not finite:
        raise NonFiniteLossError(
            f"Query {query.query.query_id!r}: the ascent diverged for every step size down to "
            f"{lo_lr:g} (optimizer {cfg.optimizer}): use --lr with a fixed value, or set "
            "--max-grad-norm."
        )
    best = min(finite, key=lambda t: _rank(t, target))
    if best.effect <= 0:  # nothing moved the loss up: take the largest finite trial
        best = max(finite, key=lambda t: t.lr)
    reached = _log_ratio(best.effect, target) <= math.log1p(TOLERANCE)
    result = Calibration(
        lr=best.lr,
        criterion=cfg.lr_criterion,
        target=target,
        achieved=best.effect,
        reached=reached,
        trials=trials,
        seconds=time.perf_counter() - started,
        query_steps=len(trials) * cfg.steps,
        ascent=best.state,
    )
    for t in trials:
        t.state = None
    _log_result(query, result)
    return result


def _log_result(query: EncodedQuery, result: Calibration) -> None:
    level = logging.INFO if result.reached else logging.WARNING
    log.log(
        level,
        "query %s: lr auto chose %.3g (%s %.3g for target %.3g%s) in %d trials, "
        "%d query steps, %.2f s",
        query.query.query_id,
        result.lr,
        result.criterion,
        result.achieved,
        result.target,
        "" if result.reached else ", target not reached",
        len(result.trials),
        result.query_steps,
        result.seconds,
    )


def resolve_query_config(
    model: torch.nn.Module,
    query: EncodedQuery,
    names: Sequence[str],
    cfg: PerturbConfig,
    *,
    n_units: int,
    fisher: Mapping[str, torch.Tensor] | None = None,
) -> tuple[PerturbConfig, Calibration | None]:
    """The perturbation config of one query: ``lr: auto`` replaced by its calibrated η."""
    if cfg.lr != "auto":
        return cfg, None
    calibration = calibrate_lr(model, query, names, cfg, n_units=n_units, fisher=fisher)
    return dataclasses.replace(cfg, lr=calibration.lr), calibration
