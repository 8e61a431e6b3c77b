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
    base = dict(model.named_parameters())
    work = [base[n].detach().clone().requires_grad_(True) for n in names]
    optimizer = _make_optimizer(work, cfg, ascent=direction == ASCENT, n_units=n_units)
    trajectory: list[float] = []
    with grads_only_for(model, []):  # gradients flow to `work` only, never to the model
        for step in range(cfg.steps):
            loss = _query_loss(model, names, work, query, shared)
            trajectory.append(_check_finite(loss, direction, step, cfg))
            grads = torch.autograd.grad(loss, work)
            _set_grads(work, grads, names, cfg, fisher)
            optimizer.step()
        with torch.no_grad():
            final = _query_loss(model, names, work, query, shared)
        trajectory.append(_check_finite(final, direction, cfg.steps, cfg))
    params = {n: w.detach() for n, w in zip(names, work, strict=True)}
    return PerturbedState(direction=direction, params=params, loss_trajectory=trajectory)


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
