"""θ+ and θ−: K optimizer steps of descent and ascent on the query loss.

Both directions start from θ0 with a fresh optimizer of the same kind and the same
step size, so they differ only in the sign of the objective:

- ``sgd``:    θ ← θ ∓ η·g
- ``adam``:   θ ← θ ∓ η·m̂/(√v̂+ε)            (torch.optim.Adam, ``maximize`` for ascent)
- ``fisher``: θ ← θ ∓ (η/N)·g/(F̂+ε)           (the reference scripts' update; N = corpus units)

Only the selected parameters' perturbed values are kept (a dict of tensors, never a
model copy), and the base model is read through ``functional_call``, never written.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from bgotrace.config import PerturbConfig
from bgotrace.errors import NonFiniteLossError
from bgotrace.modeling.losses import mean_token_loss
from bgotrace.modeling.split import TrunkState, split_block, state_token_losses, trunk
from bgotrace.perturb.fisher import fisher_denominators
from bgotrace.perturb.grad_scope import grads_only_for
from bgotrace.query import EncodedQuery

DESCENT = "descent"
ASCENT = "ascent"


@dataclass
class PerturbedState:
    """One perturbed model: the selected parameters' new values."""

    direction: str
    """``descent`` (θ+, learn the query more) or ``ascent`` (θ−, unlearn it)."""
    params: dict[str, torch.Tensor]
    """Perturbed values of the selected parameters, in the base model's dtype."""
    loss_trajectory: list[float] = field(default_factory=list)
    """Query loss before each step and after the last one (K+1 values, nats)."""

    @property
    def final_loss(self) -> float:
        return self.loss_trajectory[-1]


def _make_optimizer(
    work: list[torch.Tensor], cfg: PerturbConfig, ascent: bool, n_units: int
) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(
            work,
            lr=cfg.fixed_lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
            maximize=ascent,
        )
    # sgd and fisher are both plain steps; fisher divides the gradient by (F̂+ε) first.
    lr = cfg.fixed_lr / n_units if cfg.optimizer == "fisher" else cfg.fixed_lr
    return torch.optim.SGD(work, lr=lr, maximize=ascent)


def query_trunk(model: torch.nn.Module, names: Sequence[str], q: EncodedQuery) -> TrunkState:
    """The query through the blocks no step moves, once (base weights, no gradients).

    Every step then runs only the blocks that hold perturbed parameters (+ final norm and
    head); with a perturbation outside the blocks this is the full forward each step.
    """
    device = next(model.parameters()).device
    with torch.no_grad():
        return trunk(model, q.input_ids.to(device), None, split_block(model, names))


def _query_loss(
    model: torch.nn.Module,
    names: Sequence[str],
    values: Sequence[torch.Tensor],
    q: EncodedQuery,
    shared: TrunkState,
) -> torch.Tensor:
    labels = q.labels.to(values[0].device)
    losses = state_token_losses(model, shared, dict(zip(names, values, strict=True)), labels)
    return mean_token_loss(losses, labels)


def _check_finite(loss: torch.Tensor, direction: str, step: int, cfg: PerturbConfig) -> float:
    value = float(loss.detach())
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"The query loss became {value} at {direction} step {step} "
            f"(optimizer {cfg.optimizer}, lr {cfg.lr}): lower --lr or --steps, "
            "or set --max-grad-norm."
        )
    return value


@dataclass
class _Run:
    """One direction in progress: its work tensors, optimizer and loss trajectory."""

    direction: str
    work: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    trajectory: list[float] = field(default_factory=list)


def _start(
    model: torch.nn.Module, names: Sequence[str], cfg: PerturbConfig, direction: str, n_units: int
) -> _Run:
    base = dict(model.named_parameters())
    work = [base[n].detach().clone().requires_grad_(True) for n in names]
    return _Run(direction, work, _make_optimizer(work, cfg, direction == ASCENT, n_units))


@dataclass
class _Steps:
    """The K steps on one query: its loss, gradient and update, for either direction."""

    model: torch.nn.Module
    query: EncodedQuery
    names: Sequence[str]
    cfg: PerturbConfig
    fisher: Mapping[str, torch.Tensor] | None
    shared: TrunkState

    def grads(self, run: _Run, step: int) -> list[torch.Tensor]:
        """The query loss at ``run``'s current values (recorded) and its gradient."""
        loss = _query_loss(self.model, self.names, run.work, self.query, self.shared)
        run.trajectory.append(_check_finite(loss, run.direction, step, self.cfg))
        return list(torch.autograd.grad(loss, run.work))

    def update(self, run: _Run, grads: Sequence[torch.Tensor]) -> None:
        _set_grads(run.work, grads, self.names, self.cfg, self.fisher)
        run.optimizer.step()

    def finish(self, run: _Run, first_step: int) -> PerturbedState:
        """Steps ``first_step..K-1`` of ``run``, then the final loss."""
        for step in range(first_step, self.cfg.steps):
            self.update(run, self.grads(run, step))
        with torch.no_grad():
            final = _query_loss(self.model, self.names, run.work, self.query, self.shared)
        run.trajectory.append(_check_finite(final, run.direction, self.cfg.steps, self.cfg))
        params = {n: w.detach() for n, w in zip(self.names, run.work, strict=True)}
        return PerturbedState(run.direction, params, run.trajectory)


def perturb(
    model: torch.nn.Module,
    query: EncodedQuery,
    names: Sequence[str],
    cfg: PerturbConfig,
    direction: str,
    *,
    n_units: int,
    fisher: Mapping[str, torch.Tensor] | None = None,
    shared: TrunkState | None = None,
) -> PerturbedState:
    """Run K steps of ``direction`` on the query loss from the base parameters.

    ``shared``: the query's :func:`query_trunk`, when the caller perturbs the same query
    several times (computed here otherwise).
    """
    shared = shared if shared is not None else query_trunk(model, names, query)
    steps = _Steps(model, query, names, cfg, fisher, shared)
    run = _start(model, names, cfg, direction, n_units)
    with grads_only_for(model, []):  # gradients flow to `work` only, never to the model
        return steps.finish(run, first_step=0)


def perturb_pair(
    model: torch.nn.Module,
    query: EncodedQuery,
    names: Sequence[str],
    cfg: PerturbConfig,
    *,
    n_units: int,
    fisher: Mapping[str, torch.Tensor] | None = None,
    shared: TrunkState | None = None,
) -> tuple[PerturbedState, PerturbedState]:
    """(descent, ascent) of the query: bit-identical to two :func:`perturb` calls, cheaper.

    Both directions start at θ0, so the first step's query loss and gradient are the same:
    computed once (and the query's trunk once), they feed both optimizers; each direction
    then takes its own K-1 steps. Saves one forward + backward of the 2K per query.
    """
    shared = shared if shared is not None else query_trunk(model, names, query)
    steps = _Steps(model, query, names, cfg, fisher, shared)
    with grads_only_for(model, []):
        descent = _start(model, names, cfg, DESCENT, n_units)
        grads = steps.grads(descent, step=0)
        steps.update(descent, grads)
        descended = steps.finish(descent, first_step=1)
        # The ascent starts once the descent is done (one optimizer state alive at a time),
        # from the same gradient tensors, not a copy: torch's optimizers only read them (the
        # pair test would catch one that wrote them). Peak memory: two perturb calls' plus
        # this one gradient.
        ascent = _start(model, names, cfg, ASCENT, n_units)
        ascent.trajectory.append(descended.loss_trajectory[0])
        steps.update(ascent, grads)
        del grads
        return descended, steps.finish(ascent, first_step=1)


def _set_grads(
    work: list[torch.Tensor],
    grads: Sequence[torch.Tensor],
    names: Sequence[str],
    cfg: PerturbConfig,
    fisher: Mapping[str, torch.Tensor] | None,
) -> None:
    if cfg.max_grad_norm is not None:
        total = torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads]))
        scale = min(1.0, cfg.max_grad_norm / (float(total) + 1e-12))
        grads = [g * scale for g in grads]
    if cfg.optimizer == "fisher":
        if fisher is None:
            raise ValueError("optimizer 'fisher' needs the Fisher diagonal")
        # F̂ + ε (reference scripts) or F̂ + λ·mean(F̂) (--fisher-damping): see perturb.fisher.
        denominators = fisher_denominators(fisher, names, cfg.fisher_eps, cfg.fisher_damping)
        grads = [
            (g.float() / denominators[n]).to(g.dtype) for g, n in zip(grads, names, strict=True)
        ]
    for w, g in zip(work, grads, strict=True):
        w.grad = g
