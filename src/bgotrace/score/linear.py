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
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr
from torch.func import jvp
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


def _unit_jvps(
    model: torch.nn.Module,
    shared: Any,
    labels: torch.Tensor,
    primals: dict[str, torch.Tensor],
    tangents: Direction,
) -> torch.Tensor:
    """d/dε of each unit's summed token NLL at θ0 + εΔ (B,), float32."""

    def summed(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return state_token_losses(model, shared, params, labels).sum(dim=1)  # (B,)

    try:
        tangent = jvp(summed, (primals,), (tangents,))[1]  # (primal, tangent)
    except NotImplementedError as err:  # e.g. a flash-attention-2 model
        raise InputError(
            f"Forward-mode differentiation is not available through this model ({err}): load "
            "it with --attn-implementation sdpa (or eager) to use bgo-linear."
        ) from err
    return tangent.float()


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

    One JVP per direction and batch; the trunk below the first perturbed block has no
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
    sums = np.zeros((len(directions), len(indices)), dtype=np.float64)
    counts = np.zeros(len(indices), dtype=np.int64)
    with torch.no_grad(), forward_ad_attention():
        for batch in length_buckets(indices, units.lengths, batch_size, batch_tokens):
            input_ids, attention_mask, labels = collate(units, batch, pad_id, device)
            cols = [position[int(u)] for u in batch]
            counts[cols] = (labels[:, 1:] != -100).sum(dim=1).cpu().numpy()
            shared = trunk(model, input_ids, attention_mask, start)
            for q, tangent in enumerate(along):
                row = _unit_jvps(model, shared, labels, primals, tangent)
                sums[q, cols] = row.double().cpu().numpy()
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
) -> dict[str, Any]:
    """How far one query's exact BGO scores are from their first-order control.

    ``exact``: the query's exact scores over ``units`` (n_units,), as ranked (NaN = not
    swept, e.g. outside the prefilter's candidates); ``states``: its perturbed states
    (``ascent``/``descent``/``base`` → values, as the sweep got them); ``divisors``: the
    per-unit divisors ``exact`` was normalised by (``score_divisors``), None when raw.
    The linear scores of a seeded sample of ``sample`` swept units (all when fewer) are
    computed, normalised the same way, and compared with the exact ones on that sample:
    Spearman, and the overlap of the top ``top_k`` *within the sample* (not the corpus).
    Returns ``{"n_sample", "seed", "spearman", "top10_overlap"}`` (key named by ``top_k``);
    costs one forward-mode pass over the sample (~``sample`` units of a sweep).
    """
    chosen = sample_units(np.flatnonzero(np.isfinite(exact)), sample, seed)
    linear = variant_linear_scores(
        model, units, [states], variant=variant, indices=chosen, reduce=reduce,
        batch_size=batch_size, pad_id=pad_id, device=device, batch_tokens=batch_tokens,
    )[0]  # fmt: skip
    if divisors is not None:
        linear = linear / divisors[chosen]
    return {"n_sample": len(chosen), "seed": seed, **agreement(exact[chosen], linear, top_k)}


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
    """:func:`linearity_diagnostic` of one query of a BGO run, sized by the score config's
    ``linearity_sample`` (None when it is 0: off). ``exact``: the query's scores as ranked
    over ``ctx.units``; ``losses.states`` must still hold its states."""
    size = diagnostic_size(
        int(getattr(ctx.score_cfg, "linearity_sample", 256)),
        float(getattr(ctx.score_cfg, "linearity_share", 1.0)),
        ctx.n_swept,
    )
    if size == 0:
        return None
    divisors = None if ctx.sensitivity is None else score_divisors(ctx.sensitivity)
    cfg = ctx.score_cfg
    return linearity_diagnostic(
        ctx.model, ctx.units, losses.states, exact, variant=cfg.score, reduce=cfg.reduce,
        divisors=divisors, sample=size, seed=seed, batch_size=cfg.batch_size,
        pad_id=ctx.pad_id, device=ctx.device, batch_tokens=cfg.batch_tokens,
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
