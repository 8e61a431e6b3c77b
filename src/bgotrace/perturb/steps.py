"""θ+ and θ−: K optimizer steps of descent and ascent on the query loss.

Both directions start from θ0 with a fresh optimizer of the same kind and the same
step size, so they differ only in the sign of the objective:

- ``sgd``:    θ ← θ ∓ η·g
- ``adam``:   θ ← θ ∓ η·m̂/(√v̂+ε)            (torch.optim.Adam, ``maximize`` for ascent)
- ``fisher``: θ ← θ ∓ (η/N)·g/(F̂+ε)           (the reference scripts' update; N = corpus units)

Only the selected parameters' perturbed values are kept (a dict of tensors, never a
model copy), and no tensor of the base model is ever written: a run swaps its working
copies into the model's parameter entries once for its K steps
(:func:`bgotrace.modeling.bind.swapped`) and restores them after. (Re-binding every
parameter on every step with ``functional_call`` cost a quarter of the perturbation of a
12-block model on CPU.)

Memory of one direction (what ``bgotrace.plan`` counts): the working copy, the optimizer's
moments and one gradient, each the size of the selected parameters. They are float32 for
a float32 model; for a bfloat16/float16 model they stay in half precision and only each
update's arithmetic is float32 (:mod:`bgotrace.perturb.lowp`). θ+ waits in host memory while
θ− is made on a GPU.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from bgotrace.config import PerturbConfig
from bgotrace.errors import NonFiniteLossError
from bgotrace.modeling.bind import swapped
from bgotrace.modeling.losses import mean_token_loss
from bgotrace.modeling.split import TrunkState, split_block, state_token_losses, trunk
from bgotrace.perturb.fisher import fisher_denominators
from bgotrace.perturb.grad_scope import grads_only_for
from bgotrace.perturb.lowp import LowPrecisionOptimizer, needs_lowp
from bgotrace.query import EncodedQuery
from bgotrace.variants import ASCENT, DESCENT  # one set of state names for every stage


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
    work: Sequence[torch.Tensor], cfg: PerturbConfig, ascent: bool, n_units: int
) -> torch.optim.Optimizer | LowPrecisionOptimizer:
    if needs_lowp(work):  # half-precision weights: no float32 copies (see perturb.lowp)
        betas = (cfg.adam_beta1, cfg.adam_beta2, cfg.adam_eps)
        adam = betas if cfg.optimizer == "adam" else None
        lr = cfg.fixed_lr / n_units if cfg.optimizer == "fisher" else cfg.fixed_lr
        return LowPrecisionOptimizer(work, lr=lr, adam=adam, maximize=ascent)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(
            work,
            lr=cfg.fixed_lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
            maximize=ascent,
            # One kernel over all tensors: 30% of a 12-block model's perturbation on CPU,
            # where torch's default is a Python loop over them; on CUDA the default
            # (foreach) would hold one more parameter-sized temporary than the plan counts.
            fused=True,
        )
    # sgd and fisher are both plain steps; fisher divides the gradient by (F̂+ε) first.
    lr = cfg.fixed_lr / n_units if cfg.optimizer == "fisher" else cfg.fixed_lr
    return torch.optim.SGD(work, lr=lr, maximize=ascent)


def _working_copies(model: torch.nn.Module, names: Sequence[str]) -> list[torch.nn.Parameter]:
    """θ0's selected parameters, copied: the values a run's optimizer steps in place."""
    base = dict(model.named_parameters())
    return [torch.nn.Parameter(base[n].detach().clone()) for n in names]


@contextmanager
def _running(
    model: torch.nn.Module, names: Sequence[str], work: Sequence[torch.nn.Parameter]
) -> Iterator[None]:
    """The model with ``work`` in place of its selected parameters, gradients flowing to
    ``work`` only (never to the model's own tensors); both undone on exit."""
    with grads_only_for(model, []), swapped(model, dict(zip(names, work, strict=True))):
        yield


def _query_loss(model: torch.nn.Module, q: EncodedQuery, shared: TrunkState) -> torch.Tensor:
    """The query's mean token loss under the parameters the model holds now (see _running)."""
    labels = q.labels.to(shared.input_ids.device)
    return mean_token_loss(state_token_losses(model, shared, None, labels), labels)


def _check_finite(value: float, direction: str, step: int, cfg: PerturbConfig) -> None:
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"The query loss became {value} at {direction} step {step} "
            f"(optimizer {cfg.optimizer}, lr {cfg.lr}): lower --lr or --steps, "
            "or set --max-grad-norm."
        )


def query_trunk(model: torch.nn.Module, names: Sequence[str], q: EncodedQuery) -> TrunkState:
    """The query through the blocks no step moves, once (base weights, no gradients).

    Every step then runs only the blocks that hold perturbed parameters (+ final norm and
    head); with a perturbation outside the blocks this is the full forward each step.
    """
    device = next(model.parameters()).device
    with torch.no_grad():
        return trunk(model, q.input_ids.to(device), None, split_block(model, names))


@dataclass
class Start:
    """The query at θ0: what every perturbation of it starts with, whatever its direction,
    optimizer or step size (so computed once when one query is perturbed several times)."""

    loss: float
    """The query's loss at θ0 (nats): the first value of every trajectory."""
    grads: list[torch.Tensor]
    """The query loss's gradient at θ0, one tensor per perturbed parameter: the first step's.
    Read, never written (torch's optimizers only read ``.grad``), so runs share it."""
    shared: TrunkState
    """The query through the blocks no step moves (:func:`query_trunk`)."""


def query_start(model: torch.nn.Module, query: EncodedQuery, names: Sequence[str]) -> Start:
    """The query's trunk, loss and gradient at θ0: the first step of :func:`perturb`."""
    shared = query_trunk(model, names, query)
    work = _working_copies(model, names)
    with _running(model, names, work):
        loss = _query_loss(model, query, shared)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"The query loss is {value} at the base parameters, before any step: "
                "check the model's weights (and dtype) and the query's tokens."
            )
        return Start(value, list(torch.autograd.grad(loss, work)), shared)


Stop = Callable[[int, Sequence[float], Sequence[torch.Tensor]], bool]
"""Called by :func:`perturb` after each step k = 1..K with k, the trajectory so far (k+1
values, the loss after step k last, finite or not) and the current parameter values;
True ends the run there."""


def perturb(
    model: torch.nn.Module,
    query: EncodedQuery,
    names: Sequence[str],
    cfg: PerturbConfig,
    direction: str,
    *,
    n_units: int,
    fisher: Mapping[str, torch.Tensor] | None = None,
    start: Start | None = None,
    stop: Stop | None = None,
) -> PerturbedState:
    """Run K steps of ``direction`` on the query loss from the base parameters.

    The one K-step loop: every perturbation (:func:`perturb_pair`, the ``--lr auto``
    trials, the Ray workers) runs it. ``start``: the query's :func:`query_start`, when the
    caller perturbs the same query several times (computed here otherwise); the result is
    bit-identical either way. ``stop`` (see :data:`Stop`) may end the run before step K,
    and sees a non-finite loss before it raises :class:`NonFiniteLossError`: a caller that
    stops there gets the partial run back instead (its last loss non-finite).
    """
    first = start if start is not None else query_start(model, query, names)
    trajectory, grads, shared = [first.loss], first.grads, first.shared
    del first  # a start made here dies now: its gradient lives on in `grads` until set
    work = _working_copies(model, names)
    optimizer = _make_optimizer(work, cfg, direction == ASCENT, n_units)
    with _running(model, names, work):
        for step in range(1, cfg.steps + 1):
            _set_grads(work, grads, names, cfg, fisher)
            grads = []  # the raw gradient is dead once set (transformed or not) on `work`
            optimizer.step()
            for w in work:  # read by the step only: free it before the next gradient exists
                w.grad = None
            with torch.set_grad_enabled(step < cfg.steps):  # the final loss needs no graph
                loss = _query_loss(model, query, shared)
            trajectory.append(float(loss.detach()))
            if stop is not None and stop(step, trajectory, work):
                break
            _check_finite(trajectory[-1], direction, step, cfg)
            if step < cfg.steps:
                grads = list(torch.autograd.grad(loss, work))
    params = {n: w.detach() for n, w in zip(names, work, strict=True)}
    return PerturbedState(direction, params, trajectory)


def perturb_pair(
    model: torch.nn.Module,
    query: EncodedQuery,
    names: Sequence[str],
    cfg: PerturbConfig,
    *,
    n_units: int,
    fisher: Mapping[str, torch.Tensor] | None = None,
    start: Start | None = None,
) -> tuple[PerturbedState, PerturbedState]:
    """(descent, ascent) of the query: bit-identical to two :func:`perturb` calls, cheaper.

    Both directions start at θ0, so the first step's query loss and gradient are the same:
    computed once (:func:`query_start`, with the query's trunk), they feed both runs. Saves
    one forward + backward of the 2K per query. The ascent starts once the descent is done
    (one optimizer state alive at a time, θ+ moved to the host on a GPU): peak memory is one
    perturb call's plus the gradient at θ0. With half-precision weights memory comes first:
    each direction takes its own first step, so that gradient is not held through both.
    """
    run = functools.partial(perturb, model, query, names, cfg, n_units=n_units, fisher=fisher)
    if needs_lowp([p for n, p in model.named_parameters() if n in set(names)]):
        # Memory first: each direction computes its own first gradient, so at most one
        # parameter-sized gradient is alive (one forward + backward more per query).
        descended = _off_device(run(direction=DESCENT, start=start))
        return _on_device(descended, model), run(direction=ASCENT)
    start = start if start is not None else query_start(model, query, names)
    descended = _off_device(run(direction=DESCENT, start=start))
    return _on_device(descended, model), run(direction=ASCENT, start=start)


def _off_device(state: PerturbedState) -> PerturbedState:
    """θ+ waits in host memory while θ− is made (it is not read until the sweep)."""
    if next(iter(state.params.values())).device.type != "cpu":
        state.params = {n: t.to("cpu") for n, t in state.params.items()}
    return state


def _on_device(state: PerturbedState, model: torch.nn.Module) -> PerturbedState:
    device = next(model.parameters()).device
    state.params = {n: t.to(device) for n, t in state.params.items()}
    return state


def _set_grads(
    work: Sequence[torch.Tensor],
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
