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

The search works on log η. Its first trial is a first-order guess from the query's gradient
at θ0 (:func:`~bgotrace.perturb.lr_trials.first_order_lr`; ``START_LR`` when the gradient
gives none). Each next η comes from what the trials so far show (:func:`_next_lr`): before
the target is bracketed, the trajectory of the nearest trial read as a curve of η
(:func:`~bgotrace.perturb.lr_trials.predict_lr`), at most ``_MAX_JUMP`` away; inside a
bracket, a log-log secant or that prediction, kept strictly inside it and bisecting it when
two trials in a row fall on the same side. The search stops once an *eligible* trial is
within ``TOLERANCE`` of the target, or when its budget (the query passes of ``MAX_TRIALS``
full trials) cannot fit another full trial.

A trial is eligible when its K steps kept the loss finite and its effect never passed the
top of the tolerance window, target × (1 + ``TOLERANCE``), before step K; otherwise it is an
overshoot whatever its effect at K (a perturbation that shot past the target and came back
is not the controlled one the target asks for). So the search only needs the first steps of
an overshoot, up to where it passed the window, and ``early_abort`` stops it there: the
chosen η is then the same, bit for bit, as with every trial run to K steps (only the cost
differs). The chosen η is the eligible trial closest to the target (in log ratio), so the
recorded ascent trajectory is the one the perturbation reproduces. Every step is
deterministic and uses the query alone, so the same query gets the same η, bit for bit,
whatever else the run holds or in what order, and resume fingerprints of the perturbed
states still hold.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from bgotrace.config import PerturbConfig
from bgotrace.errors import NonFiniteLossError
from bgotrace.perturb.lr_trials import (
    Trial,
    crossing,
    eligible,
    first_order_lr,
    predict_lr,
    run_trial,
    start_point,
)
from bgotrace.perturb.steps import PerturbedState, Start
from bgotrace.query import EncodedQuery

log = logging.getLogger(__name__)

START_LR = {"adam": 1e-4, "fisher": 1e-4, "sgd": 1e-2}
"""The previous fixed defaults: the first trial when the gradient gives no first-order
guess, and the centre of the span the search stays in."""
SPAN = (1e-6, 1e4)
"""The search stays within [start × SPAN[0], start × SPAN[1]]."""
TOLERANCE = 0.1
"""A trial within ±10% of the target ends the search."""
MAX_TRIALS = 10
"""The search's budget: the query forward passes of this many full trials of K steps (the
previous search's worst case). Trials stopped early cost less, so more of them can fit."""
_MAX_JUMP = 100.0
"""Largest factor between consecutive trials before the target is bracketed."""
_AIM = (1 + TOLERANCE) ** -0.75
"""What a trajectory's prediction aims at, as a fraction of the target: low in the window,
because the prediction errs high (k steps at η·K/k fall short of K steps at η: the gradient
grows along an ascent, and K smaller steps follow it). Chosen on the cpu benchmark's
validation queries (Fisher: 2.8 → 2.5 trials per query against aiming at the target; Adam
unchanged); it moves only the cost, never what a trial must reach to be accepted."""
_FAR = math.log(2.0)
"""Before a bracket, a step from the last trial larger than this factor (log) after a
prediction that did not cross the target is squared: the predictions are far off there
(the ascent's effect explodes within its K steps, as on a memorised query), and squaring
gets across in a few trials instead of creeping."""
_SHRINK = (0.1, 0.9)
"""Inside a bracket, the next η stays within this fraction of its log width (progress)."""

__all__ = ["Calibration", "Trial", "calibrate_lr", "resolve_query_config"]


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
    """Forward passes on the query the search ran (all but each trial's last with a
    backward); θ0's, shared by every trial, counts once."""
    first_guess: float | None = None
    """The first-order η the search started from (None: it started at ``START_LR``)."""
    ascent: PerturbedState | None = field(default=None, repr=False)
    """The chosen trial's ascent: exactly what ``perturb`` gives at ``lr``, so the caller
    reuses it instead of running the K ascent steps again."""
    start: Start | None = field(default=None, repr=False)
    """The query's loss and gradient at θ0 that every trial started from: the descent at
    ``lr`` starts from it too (``perturb(..., start=...)``, bit-identical to computing it
    again), then the caller drops it (one gradient of the perturbed parameters)."""

    def chosen(self) -> Trial:
        return next(t for t in self.trials if t.lr == self.lr and t.finished)

    def to_dict(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "criterion": self.criterion,
            "target": self.target,
            "achieved": self.achieved,
            "reached": self.reached,
            "first_guess": self.first_guess,
            "trials": [
                {"lr": t.lr, "effect": t.effect, "steps": t.steps, "overshot_at": t.overshot_at}
                for t in self.trials
            ],
            "seconds": round(self.seconds, 4),
            "query_steps": self.query_steps,
        }


def _rank(trial: Trial, target: float) -> tuple[float, float]:
    """Order of preference: closest to the target, then the smaller step."""
    return _log_ratio(trial.effect, target), trial.lr


def _keep_best_state(trials: Sequence[Trial], target: float) -> None:
    """Drop the parameters of every trial but the best eligible one so far (one copy)."""
    kept = [t for t in trials if t.state is not None and eligible(t)]
    best = min(kept, key=lambda t: _rank(t, target)) if kept else None
    for t in trials:
        if t is not best:
            t.state = None


def _log_ratio(effect: float, target: float) -> float:
    """Distance of an effect from the target on a log scale (inf when it cannot compare)."""
    if effect <= 0 or not math.isfinite(effect):
        return math.inf
    return abs(math.log(effect / target))


def _within(effect: float, target: float) -> bool:
    return _log_ratio(effect, target) <= math.log1p(TOLERANCE)


def _next_lr(
    trials: Sequence[Trial], target: float, k_steps: int, lo_lr: float, hi_lr: float
) -> float:
    """Next η, from trials below the target (eligible, short of it) and above it (the rest).

    Inside a bracket: bisect it (log) after two trials in a row on the same side; else the
    log-log secant between its ends when both have a K-step effect, else the trajectory's
    prediction; always within ``_SHRINK`` of its log width. Before a bracket: the
    trajectory's prediction, its step from the last trial squared when that trial was
    itself a prediction that fell short of crossing and the step is beyond ``_FAR``. Of a
    trial that overshot early it uses only where it crossed the target, so a trial stopped
    there leads to the same next η as the full one.
    """
    under = [t for t in trials if _below(t, target)]
    over = [t for t in trials if not _below(t, target)]
    lo = max(under, key=lambda t: t.lr) if under else None
    hi = min(over, key=lambda t: t.lr) if over else None
    if lo is not None and hi is not None and lo.lr < hi.lr:
        a, b = math.log(lo.lr), math.log(hi.lr)
        frac = _bracket_frac(trials, lo, hi, target, k_steps)
        return math.exp(a + min(max(frac, _SHRINK[0]), _SHRINK[1]) * (b - a))
    ref = lo if lo is not None else hi
    assert ref is not None
    up = ref is lo
    guess = predict_lr(ref, target * _AIM, k_steps)
    if guess is None:  # no usable trajectory: the largest jump towards the target
        guess = ref.lr * (_MAX_JUMP if up else 1 / _MAX_JUMP)
    elif len(under if up else over) >= 2 and abs(math.log(guess / ref.lr)) > _FAR:
        guess *= guess / ref.lr  # the last prediction fell far short: so will this one
    guess = min(max(guess, ref.lr / _MAX_JUMP), ref.lr * _MAX_JUMP)
    return min(max(guess, lo_lr), hi_lr)


def _bracket_frac(
    trials: Sequence[Trial], lo: Trial, hi: Trial, target: float, k_steps: int
) -> float:
    """Where in the bracket's log width the next η goes (0: ``lo``, 1: ``hi``)."""
    a, b = math.log(lo.lr), math.log(hi.lr)
    if len(trials) >= 2 and _below(trials[-1], target) == _below(trials[-2], target):
        return 0.5  # the last step did not cross: bisect so the bracket halves
    if eligible(hi) and math.isfinite(hi.effect) and 0 < lo.effect < hi.effect:
        la, lb = math.log(lo.effect), math.log(hi.effect)
        return (math.log(target) - la) / (lb - la)
    source = hi if (crossing(hi, target * _AIM) or 0) >= 2 else lo
    guess = predict_lr(source, target * _AIM, k_steps)
    return (math.log(guess) - a) / (b - a) if guess else 0.5


def _below(trial: Trial, target: float) -> bool:
    """An eligible trial short of the target (overshoots and divergences are above it)."""
    return eligible(trial) and trial.effect < target


def calibrate_lr(
    model: torch.nn.Module,
    query: EncodedQuery,
    names: Sequence[str],
    cfg: PerturbConfig,
    *,
    n_units: int,
    fisher: Mapping[str, torch.Tensor] | None = None,
    early_abort: bool = True,
) -> Calibration:
    """Search η for one query so K ascent steps reach ``cfg.lr_target``.

    ``early_abort``: stop a trial once its effect has passed the top of the tolerance window
    before step K (it is an overshoot whatever follows: see the module doc). The trials and
    the chosen η are the same, bit for bit, as with False, which runs every trial to K steps
    (the reference for tests and benchmarks); only the cost differs.
    """
    started = time.perf_counter()
    target, start_lr = cfg.lr_target, START_LR[cfg.optimizer]
    lo_lr, hi_lr = start_lr * SPAN[0], start_lr * SPAN[1]
    start = start_point(model, query, names)
    guess = first_order_lr(start, names, cfg, n_units=n_units, fisher=fisher)
    lr = start_lr if guess is None else min(max(guess, lo_lr), hi_lr)
    trial_at = functools.partial(
        run_trial, model, query, names, cfg, start=start, n_units=n_units, fisher=fisher,
        window_top=target * (1 + TOLERANCE),
    )  # fmt: skip
    trials: list[Trial] = []
    while _passes(trials) + cfg.steps <= MAX_TRIALS * cfg.steps:  # a full trial still fits
        trial = trial_at(lr, stop_early=early_abort)
        trials.append(trial)
        _keep_best_state(trials, target)
        if eligible(trial) and _within(trial.effect, target):
            break
        lr = _next_lr(trials, target, cfg.steps, lo_lr, hi_lr)
        if any(math.isclose(lr, t.lr, rel_tol=1e-9) for t in trials):
            break  # pinned at an end of the span, or the bracket cannot shrink further
    best = _choose(trials, target, trial_at)
    if best is None:
        raise NonFiniteLossError(
            f"Query {query.query.query_id!r}: the ascent diverged for every step size down to "
            f"{lo_lr:g} (optimizer {cfg.optimizer}): use --lr with a fixed value, or set "
            "--max-grad-norm."
        )
    result = Calibration(
        lr=best.lr,
        criterion=cfg.lr_criterion,
        target=target,
        achieved=best.effect,
        reached=_within(best.effect, target),
        trials=trials,
        seconds=time.perf_counter() - started,
        query_steps=1 + _passes(trials),
        first_guess=guess,
        ascent=best.state,
        start=start,
    )
    for t in trials:
        t.state = None
    _log_result(query, result)
    return result


def _passes(trials: Sequence[Trial]) -> int:
    """Query forward passes the trials ran beyond θ0's (one per step reached)."""
    return sum(len(t.trajectory) - 1 for t in trials)


def _choose(trials: list[Trial], target: float, trial_at: Callable[[float], Trial]) -> Trial | None:
    """The eligible trial closest to the target; None when every trial diverged.

    When no trial is eligible (every one overshot early or diverged), a full run of the
    smallest η tried is appended and taken if it finished: only a finished trial has an
    ascent state to reuse.
    """
    candidates = [t for t in trials if eligible(t)]
    if not candidates and any(len(t.trajectory) > 1 for t in trials):
        trials.append(trial_at(min(t.lr for t in trials)))
        candidates = [trials[-1]] if trials[-1].finished else []
    if not candidates:
        return None
    best = min(candidates, key=lambda t: _rank(t, target))
    if best.effect <= 0:  # nothing moved the loss up: take the largest eligible trial
        best = max(candidates, key=lambda t: t.lr)
    return best


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
