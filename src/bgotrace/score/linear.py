"""BGO's exact first-order control, ``bgo-linear``: ∇L(z; θ0)·Δ by forward-mode differentiation.

To first order, BGO's bidirectional score is

    s(z) = L(z; θ−) − L(z; θ+) ≈ ∇L(z; θ0)·(θ− − θ+),

and the right-hand side is one Jacobian-vector product per unit along the direction
Δ = θ− − θ+ of the query's actual perturbed states (the same states BGO sweeps; every
``--score`` variant gets its own first-order control, see :func:`tangents`).
:func:`linear_scores` computes it exactly, one forward-mode pass over the units per query
(``torch.func.jvp``), with the sweep's own loss path (same masks, padding, BOS,
split at the first perturbed block, chunked head) and reduction (``sum`` / ``mean``), so it is
in nats like BGO. The gap between the two is what BGO's finite steps add:
:func:`linearity_diagnostic` measures it on a unit sample.

Forward mode needs an attention kernel with forward-AD formulas: PyTorch's fused CPU flash
kernel (what ``sdpa`` picks on CPU) has none, so every JVP runs under the math SDPA backend
(:func:`forward_ad_attention`, the one place that chooses it). Tangents are float32 when the
model is (the perturbation model, float32 recommended); states swept in bfloat16 give a Δ
rounded to bfloat16.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr
from torch.func import jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from bgotrace.cache.batching import TokenSource, collate, length_buckets, loss_counts
from bgotrace.errors import InputError
from bgotrace.modeling.split import log_once, state_token_losses, trunk
from bgotrace.perturb.sensitivity import score_divisors
from bgotrace.query import EncodedQuery
from bgotrace.runtime.progress import progress_task
from bgotrace.score.context import SweepContext
from bgotrace.score.engine import QueryLosses, perturb_checked
from bgotrace.score.sweep import Overrides, states_split
from bgotrace.score.variants import reduce_sums
from bgotrace.variants import BASE, get_variant, score_losses

Direction = dict[str, torch.Tensor]
"""Δ per perturbed parameter name (same shapes as the parameters)."""

TOP_K = 10
"""Top units whose overlap the diagnostic reports (within its sample)."""
LINEAR = "linear"
"""Key of the first-order score in a ``bgo-linear`` query's numbers (``loss_linear`` column)."""


@contextmanager
def forward_ad_attention() -> Iterator[None]:
    """Run attention with the math SDPA backend: the fused flash kernels have no forward AD."""
    log_once("bgo-linear: math SDPA attention (the fused flash kernels have no forward-mode AD)")
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def tangents(
    variant: str, states: Mapping[str, Overrides], base: Mapping[str, torch.Tensor]
) -> dict[str, Direction]:
    """The directions whose JVPs give a variant's first-order loss changes, keyed by state.

    Scores are loss *changes*: adding one constant to every state's loss leaves them
    unchanged, so the base state's linearised change is 0 and one JVP per other state
    suffices. A variant of two states (a, b) needs only one: Δ = θ_a − θ_b keyed by ``a``,
    ``b``'s change then 0 (bidirectional and abs: θ− − θ+; ascent: θ− − θ0; descent:
    θ0 − θ+). With three states (``agree``): θ_s − θ0 for each perturbed state. θ0 (``base``
    or a missing state) is read from ``base``; float32 whatever the states' dtype.
    """
    read = get_variant(variant).states
    names = next(s for s in states.values() if s is not None).keys()

    def value(key: str, name: str) -> torch.Tensor:
        state = states.get(key)
        return (state[name] if state is not None else base[name]).detach().float()

    pairs = [(read[0], read[1])] if len(read) == 2 else [(s, BASE) for s in read if s != BASE]
    return {a: {n: value(a, n) - value(b, n) for n in names} for a, b in pairs}


def combine_linear(variant: str, changes: Mapping[str, np.ndarray]) -> np.ndarray:
    """The variant's scores from first-order loss changes (:func:`tangents`' keys; others 0)."""
    like = next(iter(changes.values()))
    losses = {s: changes.get(s, np.zeros_like(like)) for s in get_variant(variant).states}
    return score_losses(variant, losses)


STACK_BYTES = 1 << 30
"""Most bytes of directions one vmap stacks (a copy of them): their JVPs then share the
primal forward (per direction 2.5 instead of 3.4 forwards for 8 directions on a 12-block
model on CPU, bit-identical). A direction larger than this (a 1B model's) goes alone."""
STACK_MAX = 8
"""Most directions in one stack."""


def _unit_jvps(
    model: torch.nn.Module,
    shared: Any,
    labels: torch.Tensor,
    primals: dict[str, torch.Tensor],
    tangents: Direction,
    stacked: bool = False,
) -> torch.Tensor:
    """d/dε of each unit's summed token NLL at θ0 + εΔ (B,), float32; ``stacked``: every
    tangent has a leading direction axis, the result is (n_directions, B)."""

    def summed(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return state_token_losses(model, shared, params, labels).sum(dim=1)  # (B,)

    def along(t: Direction) -> torch.Tensor:
        return jvp(summed, (primals,), (t,))[1]  # (primal, tangent)

    try:
        tangent = _stacked_jvps(along, tangents) if stacked else along(tangents)
    except NotImplementedError as err:  # e.g. a flash-attention-2 model
        raise InputError(
            f"Forward-mode differentiation is not available through this model ({err}): load "
            "it with --attn-implementation sdpa (or eager) to use bgo-linear."
        ) from err
    return tangent.float()


def _stacked_jvps(along: Callable[[Direction], torch.Tensor], tangents: Direction) -> torch.Tensor:
    """``along`` of each stacked direction (n, B): in one vmap, or one at a time where vmap
    cannot batch the model (the reason is logged once; the numbers are the same)."""
    try:
        with warnings.catch_warnings():  # an op without a batching rule loops: still exact
            warnings.filterwarnings("ignore", message="There is a performance drop because")
            return vmap(along)(tangents)
    except RuntimeError as err:  # NotImplementedError too: the loop below raises it again
        log_once("bgo-linear: directions one at a time (%s)", str(err).splitlines()[0][:160])
        n = next(iter(tangents.values())).shape[0]
        return torch.stack([along({k: v[i] for k, v in tangents.items()}) for i in range(n)])


def _per_stack(direction_bytes: int) -> int:
    """Directions one stack holds: as many as fit :data:`STACK_BYTES`, one at least."""
    return max(1, min(STACK_MAX, STACK_BYTES // max(direction_bytes, 1)))


def _stacks(directions: Sequence[Direction]) -> list[tuple[int, int, Direction, bool]]:
    """(first, stop, tangents, stacked) runs of ``directions``: runs of up to
    :data:`STACK_MAX` whose copy fits :data:`STACK_BYTES` stacked along a new first axis
    (made once per pass), single directions as they are."""
    per_stack = _per_stack(sum(t.numel() * t.element_size() for t in directions[0].values()))
    out = []
    for lo in range(0, len(directions), per_stack):
        run = directions[lo : lo + per_stack]
        if len(run) == 1:
            out.append((lo, lo + 1, run[0], False))
        else:
            stack = {n: torch.stack([d[n] for d in run]) for n in run[0]}
            out.append((lo, lo + len(run), stack, True))
    return out


def linear_sums(
    model: torch.nn.Module,
    units: TokenSource,
    indices: np.ndarray,
    directions: Sequence[Direction],
    *,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    batch_tokens: int | None = None,
    advance: Callable[[int], None] = lambda n: None,
) -> tuple[np.ndarray, np.ndarray]:
    """∇(summed NLL of z)·Δ per direction and unit (n_dirs, len(indices)), and token counts.

    Per batch one JVP per direction, stacked directions in one vmap that shares the primal
    forward (:data:`STACK_BYTES`); the trunk below the first perturbed block has no
    tangent, so it is computed once per batch with the base weights, as in the sweep.
    """
    if not directions:
        raise ValueError("linear_sums needs at least one direction")
    params = dict(model.named_parameters())
    primals = {n: params[n].detach() for n in directions[0]}
    along = [{n: d[n].to(primals[n]) for n in primals} for d in directions]  # dtype, device
    if next(iter(primals.values())).dtype != torch.float32:
        log_once("bgo-linear: tangents in the model's dtype, not float32: expect rounding")
    start = states_split(model, [primals])
    position = {int(u): k for k, u in enumerate(indices)}
    runs = _stacks(along)
    sums = np.zeros((len(directions), len(indices)), dtype=np.float64)
    counts = np.zeros(len(indices), dtype=np.int64)
    with torch.no_grad(), forward_ad_attention():
        for batch in length_buckets(indices, units.lengths, batch_size, batch_tokens):
            input_ids, attention_mask, labels = collate(units, batch, pad_id, device)
            cols = [position[int(u)] for u in batch]
            counts[cols] = (labels[:, 1:] != -100).sum(dim=1).cpu().numpy()
            shared = trunk(model, input_ids, attention_mask, start)
            for lo, hi, tangents, stacked in runs:
                rows = _unit_jvps(model, shared, labels, primals, tangents, stacked)
                sums[lo:hi, cols] = rows.reshape(hi - lo, -1).double().cpu().numpy()
            advance(len(batch))
    return sums, counts


def linear_scores(
    model: torch.nn.Module,
    units: TokenSource,
    directions: Sequence[Direction],
    *,
    indices: np.ndarray | None = None,
    reduce: str = "sum",
    batch_size: int = 16,
    pad_id: int = 0,
    device: torch.device | None = None,
    batch_tokens: int | None = None,
    advance: Callable[[int], None] = lambda n: None,
) -> np.ndarray:
    """∇L(z; θ0)·Δ in nats for each direction Δ and unit (n_directions, n_units), float64.

    ``directions``: Δ per perturbed parameter name. ``reduce``: ``sum`` (summed token NLL)
    or ``mean`` (per predicted token), as the sweep. ``indices``: units to score (default
    all, in ``units``' order); the columns follow ``indices``.
    """
    if indices is None:
        indices = np.arange(len(units.lengths))
    device = device or next(model.parameters()).device
    sums, counts = linear_sums(
        model, units, indices, directions,
        batch_size=batch_size, pad_id=pad_id, device=device, batch_tokens=batch_tokens,
        advance=advance,
    )  # fmt: skip
    return reduce_sums(sums, counts[None, :], reduce)


def variant_linear_scores(
    model: torch.nn.Module,
    units: TokenSource,
    states: Sequence[Mapping[str, Overrides]],
    *,
    variant: str = "bidirectional",
    indices: np.ndarray | None = None,
    reduce: str = "sum",
    batch_size: int = 16,
    pad_id: int = 0,
    device: torch.device | None = None,
    batch_tokens: int | None = None,
    advance: Callable[[int], None] = lambda n: None,
) -> np.ndarray:
    """``bgo-linear`` scores (n_queries, n_units) in nats: the first-order control of the
    ``variant``'s score for each query's states (``ascent``/``descent``/``base`` → values).

    One forward-mode pass over the units for all queries (one JVP per query and batch, two
    for ``agree``), sharing each batch's trunk. Not normalised.
    """
    base = dict(model.named_parameters())
    per_query = [tangents(variant, s, base) for s in states]
    flat = [d for t in per_query for d in t.values()]
    rows = linear_scores(
        model, units, flat, indices=indices, reduce=reduce, batch_size=batch_size,
        pad_id=pad_id, device=device, batch_tokens=batch_tokens, advance=advance,
    )  # fmt: skip
    out, k = [], 0
    for t in per_query:
        out.append(combine_linear(variant, dict(zip(t, rows[k : k + len(t)], strict=True))))
        k += len(t)
    return np.stack(out)


def sample_units(candidates: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A seeded sample of ``size`` of ``candidates`` (all of them when fewer), sorted."""
    if size >= len(candidates):
        return np.sort(candidates)
    return np.sort(np.random.default_rng(seed).choice(candidates, size=size, replace=False))


def agreement(exact: np.ndarray, linear: np.ndarray, top_k: int = TOP_K) -> dict[str, float]:
    """Spearman of two score vectors over the same units, and the overlap of their top-k."""
    k = min(top_k, len(exact))
    top_exact = set(np.argsort(-exact, kind="stable")[:k].tolist())
    top_linear = set(np.argsort(-linear, kind="stable")[:k].tolist())
    rho = float(spearmanr(exact, linear).statistic) if len(exact) > 1 else float("nan")
    return {"spearman": rho, f"top{top_k}_overlap": len(top_exact & top_linear) / max(k, 1)}


def linearity_diagnostic(
    model: torch.nn.Module,
    units: TokenSource,
    states: Mapping[str, Overrides],
    exact: np.ndarray,
    **options: Any,
) -> dict[str, Any]:
    """How far one query's exact BGO scores are from their first-order control: the one
    query of :func:`linearity_diagnostics` (same options)."""
    return linearity_diagnostics(model, units, [states], [exact], **options)[0]


def linearity_diagnostics(
    model: torch.nn.Module,
    units: TokenSource,
    states: Sequence[Mapping[str, Overrides]],
    exact: Sequence[np.ndarray],
    *,
    variant: str = "bidirectional",
    reduce: str = "sum",
    divisors: np.ndarray | None = None,
    sample: int = 256,
    seed: int = 0,
    top_k: int = TOP_K,
    batch_size: int = 16,
    pad_id: int = 0,
    device: torch.device | None = None,
    batch_tokens: int | None = None,
) -> list[dict[str, Any]]:
    """How far each query's exact BGO scores are from their first-order control.

    ``exact``: per query, its exact scores over ``units`` (n_units,), as ranked (NaN = not
    swept, e.g. outside the prefilter's candidates); ``states``: per query, its perturbed
    states (``ascent``/``descent``/``base`` → values, as the sweep got them); ``divisors``:
    the per-unit divisors ``exact`` was normalised by (``score_divisors``), None when raw.
    The linear scores of a seeded sample of ``sample`` swept units (all when fewer) are
    computed, normalised the same way, and compared with the exact ones on that sample:
    Spearman, and the overlap of the top ``top_k`` *within the sample* (not the corpus).
    Returns per query ``{"n_sample", "seed", "spearman", "top10_overlap"}`` (key named by
    ``top_k``). Queries with the same sample share one forward-mode pass over it (their
    directions stacked, :func:`linear_sums`), as many at a time as :data:`STACK_BYTES` holds.
    """
    chosen = [sample_units(np.flatnonzero(np.isfinite(e)), sample, seed) for e in exact]
    alike: dict[bytes, list[int]] = {}
    for i, c in enumerate(chosen):
        alike.setdefault(c.tobytes(), []).append(i)
    per_pass = _directions_per_pass(states[0])
    out: list[dict[str, Any]] = [{} for _ in exact]
    for members in alike.values():
        indices = chosen[members[0]]
        for lo in range(0, len(members), per_pass):
            part = members[lo : lo + per_pass]
            linear = variant_linear_scores(
                model, units, [states[i] for i in part], variant=variant, indices=indices,
                reduce=reduce, batch_size=batch_size, pad_id=pad_id, device=device,
                batch_tokens=batch_tokens,
            )  # fmt: skip
            for i, row in zip(part, linear, strict=True):
                if divisors is not None:
                    row = row / divisors[indices]
                out[i] = {"n_sample": len(indices), "seed": seed,
                          **agreement(exact[i][indices], row, top_k)}  # fmt: skip
    return out


def _directions_per_pass(states: Mapping[str, Overrides]) -> int:
    """Queries whose directions one diagnostic pass holds at once (:func:`_per_stack` of a
    float32 direction), so a large model's diagnostic holds one direction at a time, as the
    sweep's memory plan assumes."""
    values = next((s for s in states.values() if s is not None), {})
    return _per_stack(4 * sum(t.numel() for t in values.values()))


def group_linear_scores(ctx: SweepContext, states: Sequence[Mapping[str, Overrides]]) -> np.ndarray:
    """``bgo-linear`` scores (n_queries, n_swept) in nats, unnormalised, of a group's queries
    (``states``: per query, its states by name, as :class:`QueryLosses.states`), with the
    context's variant, reduction and batching, on the perturbation model (float32)."""
    cfg = ctx.score_cfg
    with progress_task("Linear scores (forward mode)", total=ctx.n_swept) as advance:
        return variant_linear_scores(
            ctx.model, ctx.units, states, variant=cfg.score, reduce=cfg.reduce,
            batch_size=cfg.batch_size, pad_id=ctx.pad_id, device=ctx.device,
            batch_tokens=cfg.batch_tokens, advance=advance,
        )  # fmt: skip


MIN_DIAGNOSTIC_UNITS = 32
"""Fewest units the diagnostic samples (when the corpus has them): fewer make its Spearman
and top-10 overlap too coarse to read."""


def diagnostic_size(cap: int, share: float, n_swept: int) -> int:
    """Units the linearity diagnostic samples: ``cap`` (``--linearity-sample``; 0 = off), but
    at most ``share`` of the ``n_swept`` units and at least :data:`MIN_DIAGNOSTIC_UNITS`.

    Why a share: its forward-mode pass costs ~3 forwards a unit, a query's sweep 2, so 256
    units of a 1,300-unit corpus would add a third to every query; at 2% it adds ~3%, and
    from 12,800 units on the sample is the full ``cap``.
    """
    if cap == 0:
        return 0
    return min(cap, max(MIN_DIAGNOSTIC_UNITS, math.ceil(share * n_swept)))


def query_linearity(
    ctx: SweepContext, losses: QueryLosses, exact: np.ndarray, *, seed: int = 0
) -> dict[str, Any] | None:
    """:func:`group_linearity` of one query."""
    return group_linearity(ctx, [losses], [exact], seed=seed)[0]


def group_linearity(
    ctx: SweepContext,
    losses: Sequence[QueryLosses],
    exact: Sequence[np.ndarray],
    *,
    seed: int = 0,
) -> list[dict[str, Any] | None]:
    """:func:`linearity_diagnostics` of a sweep group's queries, sized by the score config's
    ``linearity_sample`` and ``linearity_share`` (None each when off). ``exact``: per query,
    its scores as ranked over ``ctx.units``; ``losses[i].states`` must still hold its states."""
    size = diagnostic_size(
        int(getattr(ctx.score_cfg, "linearity_sample", 256)),
        float(getattr(ctx.score_cfg, "linearity_share", 1.0)),
        ctx.n_swept,
    )
    if size == 0:
        return [None for _ in losses]
    divisors = None if ctx.sensitivity is None else score_divisors(ctx.sensitivity)
    cfg = ctx.score_cfg
    return list(
        linearity_diagnostics(
            ctx.model, ctx.units, [r.states for r in losses], exact, variant=cfg.score,
            reduce=cfg.reduce, divisors=divisors, sample=size, seed=seed,
            batch_size=cfg.batch_size, pad_id=ctx.pad_id, device=ctx.device,
            batch_tokens=cfg.batch_tokens,
        )
    )  # fmt: skip


def linear_group(ctx: SweepContext, g: int, group: Sequence[EncodedQuery]) -> list[QueryLosses]:
    """``bgo-linear``'s group step: BGO's states of ``group`` (perturbed exactly as ``bgo``
    does, resume-checked), then one forward-mode pass over ``ctx.units`` instead of the
    sweep. Each query's numbers are ``{"linear": ∇L(z; θ0)·Δ}`` (nats, unnormalised)."""
    perturbed = perturb_checked(ctx, g, group)
    if next(ctx.sweep_model.parameters()).dtype != next(ctx.model.parameters()).dtype:
        log_once("bgo-linear: Δ from states rounded to the sweep dtype; use --dtype float32")
    states = [
        {d: perturbed.states[k] for k, (owner, d) in enumerate(perturbed.keys) if owner in (q, -1)}
        for q in range(len(group))
    ]
    scores = group_linear_scores(ctx, states)  # (n_queries, n_swept)
    counts = loss_counts(ctx.units)  # the sweep's count
    return [
        QueryLosses(
            query=query,
            losses={LINEAR: scores[q]},
            counts=counts,
            states=states[q],
            trajectories=perturbed.trajectories[q],
            calibration=perturbed.calibrations[q],
        )  # fmt: skip
        for q, query in enumerate(group)
    ]


def linear_unit_scores(variant: str, numbers: dict[str, np.ndarray]) -> np.ndarray:
    """``bgo-linear``'s raw score of one query: its first-order score (the variant is
    already applied in :func:`linear_group`)."""
    return numbers[LINEAR]
