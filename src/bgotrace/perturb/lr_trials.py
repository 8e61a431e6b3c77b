"""The pieces of ``--lr auto``'s search: one trial of K ascent steps, and what it predicts.

A trial is :func:`bgotrace.perturb.steps.perturb`'s K ascent steps at its η, so a finished
trial's parameters are what ``perturb`` gives at that η, bit for bit (tests pin it). It uses
two of ``perturb``'s hooks, which leave a trial's outcome unchanged:

- ``start``: the query's gradient at θ0 is the same for every η, so it is computed once per
  search (:func:`start_point`) and every trial's first step reuses it;
- ``stop``: a trial stops as soon as its effect has passed the top of the target's tolerance
  window before step K (``stop_early``): such a trial is an overshoot whatever its effect at
  K, and all the search needs from it is where it crossed the target, so stopping it changes
  nothing but the cost.

The same gradient gives the search's first η, a first-order guess (:func:`first_order_lr`).

:func:`predict_lr` reads a trial's trajectory as a curve of η: the first k of K steps at η
move the parameters about as far as K steps at η·k/K would (exact for the first step of Adam,
≈ sign(g) per step; close for every optimizer while the gradient keeps its direction), so
one trial shows the effect at K values of η and the target can be interpolated inside it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from bgotrace.config import PerturbConfig
from bgotrace.perturb.fisher import fisher_denominators
from bgotrace.perturb.steps import ASCENT, PerturbedState, Start, perturb, query_start
from bgotrace.query import EncodedQuery

_SLOPE_RANGE = (0.5, 3.0)
"""Bounds of the log-log slope of effect against η used to extrapolate an undershoot: the
loss rise is convex in η on a trained model, concave on a fresh one (it saturates)."""


@dataclass
class Trial:
    """One candidate step size and the effect its ascent steps had."""

    lr: float
    effect: float
    """Loss rise (nats) or relative radius after the last step run; +inf when the loss
    became non-finite."""
    trajectory: list[float] = field(default_factory=list)
    """Query loss before each step and after the last one run (nats)."""
    effects: list[float] = field(default_factory=list)
    """The effect after 0, 1, … steps (``effects[0]`` = 0), finite steps only."""
    steps: int = 0
    """Optimizer steps run: K when finished, fewer when stopped early or diverged."""
    finished: bool = False
    """All K steps ran with a finite loss."""
    overshot_at: int | None = None
    """The first step before K whose effect passed the top of the tolerance window (the
    trial is an overshoot whatever happened after), None if none did."""
    state: PerturbedState | None = field(default=None, repr=False)
    """The ascent's parameters, kept for the best trial so far only (memory)."""


@dataclass
class StartPoint(Start):
    """What every trial of one query's search shares: θ0, its loss and its gradient."""

    base: list[torch.Tensor]
    """θ0 of the perturbed parameters (the model's own tensors, detached)."""
    base_norm: float
    """‖θ0‖ over the perturbed parameters (the radius criterion's unit)."""


def start_point(model: torch.nn.Module, query: EncodedQuery, names: Sequence[str]) -> StartPoint:
    """θ0's loss and gradient: ``perturb``'s first step, computed once for every trial."""
    start = query_start(model, query, names)
    params = dict(model.named_parameters())
    base = [params[n].detach() for n in names]
    norm = math.sqrt(sum(float(b.float().pow(2).sum()) for b in base))
    return StartPoint(start.loss, start.grads, start.shared, base, norm)


def _first_move(
    start: StartPoint,
    names: Sequence[str],
    cfg: PerturbConfig,
    n_units: int,
    fisher: Mapping[str, torch.Tensor] | None,
) -> list[torch.Tensor]:
    """The first step's update per unit of η (ascent), as the optimizer takes it."""
    grads = [g.float() for g in start.grads]
    if cfg.max_grad_norm is not None:
        total = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
        grads = [g * min(1.0, cfg.max_grad_norm / (total + 1e-12)) for g in grads]
    if cfg.optimizer == "adam":  # step 1: m̂ = g, √v̂ = |g|
        return [g / (g.abs() + cfg.adam_eps) for g in grads]
    if cfg.optimizer == "fisher":
        if fisher is None:
            raise ValueError("optimizer 'fisher' needs the Fisher diagonal")
        den = fisher_denominators(fisher, names, cfg.fisher_eps, cfg.fisher_damping)
        return [g / (den[n].float() * n_units) for g, n in zip(grads, names, strict=True)]
    return grads


def first_order_lr(
    start: StartPoint,
    names: Sequence[str],
    cfg: PerturbConfig,
    *,
    n_units: int,
    fisher: Mapping[str, torch.Tensor] | None = None,
) -> float | None:
    """η at which K steps reach the target if each moved as far as the first, to first order.

    The first step at η moves θ by η·u (u: :func:`_first_move`), which raises the loss by
    ≈ η·gᵀu (Adam: η·Σ g²/(|g|+ε) ≈ η‖g‖₁; SGD: η‖g‖²; Fisher: (η/N)·Σ g²/(F̂+ε)) and has
    radius η‖u‖/‖θ0‖. Along an ascent the loss is convex in η, so this guess is an upper
    bound for the loss criterion. None when the gradient gives no direction (zero/non-finite).
    """
    moves = _first_move(start, names, cfg, n_units, fisher)
    if cfg.lr_criterion == "loss":
        per_lr = sum(float((g.float() * u).sum()) for g, u in zip(start.grads, moves, strict=True))
    else:
        moved = math.sqrt(sum(float(u.pow(2).sum()) for u in moves))
        per_lr = moved / max(start.base_norm, 1e-30)
    if not math.isfinite(per_lr) or per_lr <= 0:
        return None
    guess = cfg.lr_target / (cfg.steps * per_lr)
    return guess if math.isfinite(guess) and guess > 0 else None


def _effect(
    cfg: PerturbConfig, start: StartPoint, loss: float, work: Sequence[torch.Tensor]
) -> float:
    if cfg.lr_criterion == "loss":
        return loss - start.loss
    moved = sum(
        float((w.detach().float() - b.float()).pow(2).sum())
        for w, b in zip(work, start.base, strict=True)
    )
    return math.sqrt(moved) / max(start.base_norm, 1e-30)


def run_trial(
    model: torch.nn.Module,
    query: EncodedQuery,
    names: Sequence[str],
    cfg: PerturbConfig,
    lr: float,
    start: StartPoint,
    *,
    n_units: int,
    fisher: Mapping[str, torch.Tensor] | None,
    window_top: float = math.inf,
    stop_early: bool = False,
) -> Trial:
    """K ascent steps at ``lr`` (``perturb``'s); ``overshot_at`` records the first step before
    K whose effect exceeds ``window_top``, where ``stop_early`` ends the trial.

    A diverging trial (non-finite loss) is an overshoot with effect +inf, not an error.
    """
    trial = Trial(lr, 0.0, effects=[0.0])

    def observe(step: int, trajectory: Sequence[float], work: Sequence[torch.Tensor]) -> bool:
        trial.steps = step
        if not math.isfinite(trajectory[-1]):
            trial.effect = math.inf
            return True  # diverged: stop here rather than raise
        trial.effect = _effect(cfg, start, trajectory[-1], work)
        trial.effects.append(trial.effect)
        if step < cfg.steps and trial.overshot_at is None and trial.effect > window_top:
            trial.overshot_at = step
        return stop_early and trial.overshot_at is not None

    trial_cfg = dataclasses.replace(cfg, lr=lr)
    state = perturb(
        model, query, names, trial_cfg, ASCENT, n_units=n_units, fisher=fisher, start=start,
        stop=observe,
    )  # fmt: skip
    trial.trajectory = state.loss_trajectory[: len(trial.effects)]  # the finite losses
    if not math.isfinite(trial.effect):
        trial.effect = math.inf
    trial.finished = trial.steps == cfg.steps and math.isfinite(trial.effect)
    trial.state = state if trial.finished else None
    return trial


def eligible(trial: Trial) -> bool:
    """Whether the search may stop at or choose this trial: finished, never overshot early."""
    return trial.finished and trial.overshot_at is None


def crossing(trial: Trial, target: float) -> int | None:
    """The first step whose effect reached the target (the same whether or not the trial
    was stopped early, since it stops only after the crossing), None if none did."""
    return next((k for k, e in enumerate(trial.effects) if k > 0 and e >= target), None)


def predict_lr(trial: Trial, target: float, k_steps: int) -> float | None:
    """η at which K steps reach ``target``, read from one trial's trajectory (see module doc).

    Crossing inside the trajectory: log-log interpolation between the steps around it. No
    crossing (an eligible undershoot): extrapolation with the log-log slope of its second
    half. Uses only the trajectory up to the crossing, so it is the same for a stopped trial.
    """
    points = [(trial.lr * k / k_steps, e) for k, e in enumerate(trial.effects) if k > 0 and e > 0]
    k_cross = crossing(trial, target)
    if k_cross is not None:
        upper = trial.effects[k_cross]
        before = [(x, e) for x, e in points if x < trial.lr * k_cross / k_steps]
        x1 = trial.lr * k_cross / k_steps
        if not before:  # crossed on the first step: assume the effect linear below it
            return x1 * target / upper
        return _power_law(before[-1], (x1, upper), target, bounded=False)
    if not eligible(trial) or not points:
        return None
    return _power_law(points[(len(points) - 1) // 2], points[-1], target, bounded=True)


def _power_law(
    a: tuple[float, float], b: tuple[float, float], target: float, *, bounded: bool
) -> float:
    """x where the power law through points a and b (x, effect) reaches ``target``.

    ``bounded``: extrapolating, so the slope is kept within ``_SLOPE_RANGE``; interpolating
    (a below and b at or above the target) needs no bound to land between them.
    """
    (xa, ea), (xb, eb) = a, b
    slope = math.log(eb / ea) / math.log(xb / xa) if eb > ea and xb > xa else 1.0
    if bounded:
        slope = min(max(slope, _SLOPE_RANGE[0]), _SLOPE_RANGE[1])
    return xb * math.exp(math.log(target / eb) / slope)
