"""Per-unit sensitivity: how much a unit's loss moves under *any* perturbation (``--normalize``).

BGO's score is, to first order, a preconditioned dot product of the unit's and the query's
gradients, so a unit whose loss moves under every perturbation (a long unit with
``reduce=sum``, a high-loss unit with large gradients) is ranked high for every query: a hub.
Gradient cosine fixes the same problem of the raw dot product by dividing by the unit's
gradient norm, and ``--normalize sensitivity`` does the same for BGO: it ranks by

    score(z) / s(z),   s(z) = ‖∇θ L(z)‖₂ over the perturbed parameters,

with L the unit's summed token loss (``reduce=sum``) or its mean (``reduce=mean``: s / tokens),
so s is in the unit of the scores per unit of parameter movement. s depends on the model,
the parameter selection and the corpus only: it is computed once per unit (one batched
forward and backward per batch of units, per-unit norms without per-unit gradients: see
:mod:`bgotrace.perturb.ghost_norms`) and kept in a per-unit store beside the token cache
(:mod:`bgotrace.perturb.norm_store`), like the Fisher diagonal:

- only for the units that are scored: with ``--candidates``, the candidates (plus the fixed
  reference sample, below); a later run with other candidates computes the missing ones;
- in the sweep model's dtype (``--model-dtype`` / ``--dtype``: 16-bit forward and backward,
  float32 accumulation of the norms); the dtype is part of the cache key;
- in blocks, written as each finishes (an interrupted run resumes), spread over the Ray
  workers when a sweep has them (each holds the sweep model already).

``--normalize damped`` divides by s(z) + λ·M instead: on a model that has memorised its
data the units it learned best have tiny gradients, and dividing by s alone inflates them into
hubs (issue 15); the damping bounds that inflation at 1/λ of the median unit's. M (and the
floor, 1e-3·M) is the median of s over a fixed seeded sample of the corpus
(:func:`reference_units`), so it is the same number in a full run and in a run over any
candidates: a unit's divisor never depends on which other units are scored.

Why the exact norm and not the loss change under a few fixed random perturbations: that
estimate is E[(δᵀ∇L)²]^½, and with R directions its relative noise is ~1/√(2R); on the cpu
benchmark two seeds of R = 4 (8 corpus passes) agreed only at Spearman 0.49 (R = 8: 0.68),
and dividing by that noise made hubs worse (benchmarks/RESULTS.md, issue 9 section).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import torch

from bgotrace.cache.batching import collate, length_buckets, loss_counts, unit_labels
from bgotrace.modeling.fingerprint import model_fingerprint
from bgotrace.modeling.losses import forward_logits, token_losses
from bgotrace.perturb.ghost_norms import GhostPlan, batch_squared_norms, plan_for
from bgotrace.perturb.grad_scope import grads_only_for
from bgotrace.perturb.norm_store import NormStore
from bgotrace.runtime.progress import progress_task

if TYPE_CHECKING:
    from bgotrace.config import ScoreConfig

log = logging.getLogger(__name__)

_FLOOR = 1e-3
"""Sensitivities are floored at this fraction of their median before dividing."""
_FORMAT = "gradient-norm-2"
"""Part of the cache key: a change of the estimator or of the store never reuses an old file
(2: a per-unit store with a computed mask, norms in the sweep dtype)."""


def _nothing(n: int) -> None:
    """No progress to tell (the default of every ``advance``)."""


class UnitCache(Protocol):
    """What the sensitivity pass needs from a token cache."""

    root: Path
    manifest: dict

    @property
    def lengths(self) -> np.ndarray: ...

    def __len__(self) -> int: ...

    def unit_tokens(self, i: int) -> np.ndarray: ...


def unit_gradient_norms_loop(
    model: torch.nn.Module,
    units: UnitCache,
    names: Sequence[str],
    device: torch.device,
    indices: np.ndarray | None = None,
    advance: Callable[[int], None] = _nothing,
) -> np.ndarray:
    """‖∇ Σ_t NLL_t(z)‖₂ over the named parameters, one unit at a time (the slow reference,
    and the path for parameters :mod:`~bgotrace.perturb.ghost_norms` does not cover).
    ``advance(n)``: told after every unit (the normaliser's one progress bar)."""
    indices = np.arange(len(units)) if indices is None else indices
    norms = np.zeros(len(indices), dtype=np.float64)
    with grads_only_for(model, names) as params:
        for k, i in enumerate(indices):
            ids = torch.as_tensor(units.unit_tokens(int(i)).astype(np.int64), device=device)[None]
            labels = torch.as_tensor(unit_labels(units, int(i)), device=device)[None]
            total = token_losses(forward_logits(model, ids), labels).sum()  # summed NLL of z
            grads = torch.autograd.grad(total, params)
            norms[k] = math.sqrt(sum(float(g.detach().double().pow(2).sum()) for g in grads))
            advance(1)
    return norms


def unit_gradient_norms(
    model: torch.nn.Module,
    units: UnitCache,
    names: Sequence[str],
    device: torch.device,
    *,
    batch_size: int = 16,
    indices: np.ndarray | None = None,
    batch_tokens: int | None = None,
    plan: GhostPlan | None = None,
    advance: Callable[[int], None] = _nothing,
) -> tuple[np.ndarray, np.ndarray]:
    """‖∇ Σ_t NLL_t(z)‖₂ over the named parameters for every unit (or ``indices``), and its
    predicted-token counts, both (n,): batched ghost norms, the per-unit loop for the rest.

    ``plan``: a :func:`checked_plan` of this model and ``names`` (a pass over many blocks
    checks once); None checks one here. ``advance(n)``: told as units are done."""
    indices = np.arange(len(units)) if indices is None else np.asarray(indices)
    if plan is None:
        plan = checked_plan(model, units, names, device, indices)
    squares = np.zeros(len(indices), dtype=np.float64)
    if plan.modules:
        squares += _ghost_squares(
            model, units, names, plan, device, indices, batch_size, batch_tokens, advance
        )
    if plan.uncovered:
        told = _nothing if plan.modules else advance  # each unit counted once
        loop = unit_gradient_norms_loop(model, units, plan.uncovered, device, indices, told)
        squares += loop**2
    return np.sqrt(squares), loss_counts(units)[indices]


def checked_plan(
    model: torch.nn.Module,
    units: UnitCache,
    names: Sequence[str],
    device: torch.device,
    indices: np.ndarray,
) -> GhostPlan:
    """Which of ``names`` the ghost norms cover (:func:`plan_for`), checked on the first two
    of ``indices`` against the per-unit loop (:func:`_ghost_agrees`): none when they
    disagree. The answer depends on the architecture only, so a pass checks once (and says
    once what it will compute one unit at a time)."""
    plan = plan_for(model, names)
    if not _ghost_agrees(model, units, names, plan, device, indices):
        plan = GhostPlan(uncovered=list(names))
    if plan.uncovered:
        log.warning("sensitivity of %d parameter tensors one unit at a time", len(plan.uncovered))
    return plan


def _ghost_squares(
    model: torch.nn.Module,
    units: UnitCache,
    names: Sequence[str],
    plan: GhostPlan,
    device: torch.device,
    indices: np.ndarray,
    batch_size: int,
    batch_tokens: int | None = None,
    advance: Callable[[int], None] = _nothing,
) -> np.ndarray:
    """Squared gradient norms over the parameters the plan covers, batch by batch (at most
    ``batch_size`` units, or ``batch_tokens`` padded tokens: :func:`length_buckets`)."""
    where = {int(u): k for k, u in enumerate(indices)}
    out = np.zeros(len(indices), dtype=np.float64)
    with grads_only_for(model, names):
        for batch in length_buckets(indices, units.lengths, batch_size, batch_tokens):
            ids, mask, labels = collate(units, batch, 0, device)  # pads: masked, any id will do
            squares = batch_squared_norms(model, plan, ids, mask, labels)
            out[[where[int(u)] for u in batch]] = squares.cpu().numpy()
            advance(len(batch))
    return out


_AGREEMENT = 1e-3
"""Relative difference between the ghost and the loop norms of two units beyond which the
architecture is taken to use a parameter outside the hooked modules (the loop is used)."""


def _ghost_agrees(
    model: torch.nn.Module,
    units: UnitCache,
    names: Sequence[str],
    plan: GhostPlan,
    device: torch.device,
    indices: np.ndarray,
) -> bool:
    """Check the ghost norms of two units against the loop: a model that uses a covered
    parameter outside its module (a functional tied head, say) would otherwise be wrong."""
    covered = [n for n in names if n not in set(plan.uncovered)]
    if not covered or not len(indices):
        return True
    first = indices[:2]  # one batch of two: broadcasting across units would show up too
    ghost = np.sqrt(_ghost_squares(model, units, covered, plan, device, first, 2))
    loop = unit_gradient_norms_loop(model, units, covered, device, first)
    if np.all(np.abs(ghost - loop) <= _AGREEMENT * np.maximum(loop, 1e-12)):
        return True
    log.warning("batched gradient norms disagree with the loop (%s, %s): per unit", ghost, loop)
    return False


def sensitivity_from(norms: np.ndarray, counts: np.ndarray, reduce: str) -> np.ndarray:
    """s(z) in the unit of the scores: the summed loss's gradient norm, or per token."""
    return norms / np.maximum(counts, 1) if reduce == "mean" else norms


def score_divisors(sensitivity: np.ndarray) -> np.ndarray:
    """What each unit's score is divided by: s, floored at a fraction of the reference median
    (a unit that never moves would otherwise get an unbounded score). NaN stays NaN."""
    return np.maximum(sensitivity, _FLOOR * reference_median(sensitivity))


def normalize_scores(scores: np.ndarray, sensitivity: np.ndarray) -> np.ndarray:
    """score / s (floored, see :func:`score_divisors`)."""
    return scores / score_divisors(sensitivity)


REFERENCE_UNITS = 256
"""Units in the fixed sample whose median s is the floor's and ``damped``'s reference."""
_REFERENCE_SEED = 20261206


def reference_units(n_units: int) -> np.ndarray:
    """The reference sample: min(n, :data:`REFERENCE_UNITS`) units drawn with a fixed seed,
    sorted (every unit when the corpus has no more).

    Why a fixed sample and not the units at hand: with ``--candidates`` only some units'
    s are computed, and a median over those would change with the candidates (and over
    "the units computed so far" with the history of the cache), so one unit would get
    other divisors in other runs. The sample's median is one number per (corpus, model,
    parameters): every run, full or reranked, divides by the same. It is computed with the
    candidates (a few hundred units once per cache key) and estimates the corpus median to a
    few percent (a median of 256 draws), which is all the damping and the floor need.
    """
    if n_units <= REFERENCE_UNITS:
        return np.arange(n_units)
    rng = np.random.default_rng(_REFERENCE_SEED)
    return np.sort(rng.choice(n_units, size=REFERENCE_UNITS, replace=False))


def reference_median(sensitivity: np.ndarray) -> float:
    """Median of the positive s of the reference units of a (n_units,) array (1.0 if none)."""
    ref = sensitivity[reference_units(len(sensitivity))]
    positive = ref[np.isfinite(ref) & (ref > 0)]
    return float(np.median(positive)) if positive.size else 1.0


def sensitivity_key(units: UnitCache, model: torch.nn.Module, names: Sequence[str]) -> str:
    """Cache key: corpus cache, model weights, parameter selection, the dtype the norms are
    computed in, estimator."""
    parts = {
        "cache": json.dumps(units.manifest, sort_keys=True, default=str),
        "model": model_fingerprint(model, names),
        "names": list(names),
        "dtype": str(next(model.parameters()).dtype),
        "estimator": _FORMAT,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


@runtime_checkable
class NormWorkers(Protocol):
    """Workers that compute blocks of norms (the Ray executor), each holding the model."""

    def unit_norms(
        self,
        units: UnitCache,
        blocks: Sequence[np.ndarray],
        names: Sequence[str],
        batch_size: int,
        batch_tokens: int | None = None,
    ) -> Iterator[tuple[int, np.ndarray]]:
        """(block number, the norms of its units) as each block finishes, in any order."""
        ...


def cached_sensitivity(
    model: torch.nn.Module,
    units: UnitCache,
    names: Sequence[str],
    *,
    reduce: str,
    device: torch.device,
    batch_size: int = 16,
    block_units: int = 1024,
    indices: np.ndarray | None = None,
    workers: NormWorkers | None = None,
    batch_tokens: int | None = None,
) -> np.ndarray:
    """s(z) (n_units,) of every unit, or of ``indices`` and whatever an earlier run computed
    (NaN elsewhere), from the per-unit store beside the token cache; the missing units are
    computed in ``model``'s dtype, in blocks of ``block_units`` (on ``workers`` when given),
    each kept as soon as it is done (an interrupted run resumes: :mod:`.norm_store`)."""
    key = sensitivity_key(units, model, names)
    store = NormStore(units.root / "sensitivity" / f"{key}.npz", len(units))
    norms, computed = store.load()
    wanted = np.arange(len(units)) if indices is None else np.unique(indices)
    missing = wanted[~computed[wanted]]
    if not len(missing) and not store.merged:
        log.info("reusing unit sensitivities %s", store.path)
    blocks = [missing[i : i + block_units] for i in range(0, len(missing), block_units)]
    if blocks:
        log.info(
            "gradient norms of %d units (%d reused) in %s", len(missing),
            len(wanted) - len(missing), str(next(model.parameters()).dtype).removeprefix("torch."),
        )  # fmt: skip
    batching = (batch_size, batch_tokens)
    bar = progress_task("Normaliser (gradient norms)", len(missing), enabled=bool(blocks))
    with bar as advance:
        done = _computed_blocks(model, units, names, device, blocks, batching, workers, advance)
        for k, block_norms in done:
            store.add_block(blocks[k], block_norms)
            norms[blocks[k]], computed[blocks[k]] = block_norms, True
            if workers is not None:  # a worker's block is told when it arrives
                advance(len(blocks[k]))
    if store.merged:
        store.merge(norms, computed)
    return sensitivity_from(np.where(computed, norms, np.nan), loss_counts(units), reduce)


def _computed_blocks(
    model: torch.nn.Module,
    units: UnitCache,
    names: Sequence[str],
    device: torch.device,
    blocks: Sequence[np.ndarray],
    batching: tuple[int, int | None],
    workers: NormWorkers | None,
    advance: Callable[[int], None] = _nothing,
) -> Iterator[tuple[int, np.ndarray]]:
    """(block number, norms) of every block: here, one after the other (the ghost norms
    checked once, on the first block), or on ``workers``; ``batching``: (units, padded tokens
    or None) per batch; ``advance(n)``: told as units are done here."""
    size, tokens = batching
    if workers is not None and blocks:
        yield from workers.unit_norms(units, blocks, names, size, tokens)
        return
    plan = checked_plan(model, units, names, device, blocks[0]) if blocks else None
    for k, block in enumerate(blocks):
        norms, _ = unit_gradient_norms(
            model, units, names, device, batch_size=size, indices=block, batch_tokens=tokens,
            plan=plan, advance=advance,
        )  # fmt: skip
        yield k, norms


def damped(sensitivity: np.ndarray, damping: float) -> np.ndarray:
    """s(z) + λ·M, M the reference median of s (:func:`reference_median`): what
    ``--normalize damped`` divides by."""
    return sensitivity + damping * reference_median(sensitivity)


def unit_normalizers(
    model: torch.nn.Module,
    units: UnitCache,
    names: Sequence[str],
    cfg: ScoreConfig,
    device: torch.device,
    *,
    indices: np.ndarray | None = None,
    workers: NormWorkers | None = None,
) -> np.ndarray | None:
    """What ``--normalize`` divides each unit's score by (before the floor of
    :func:`score_divisors`): None for ``none``, s(z), or s(z) + λ·M for ``damped``; (n_units,)
    with NaN outside ``indices`` (the units scored; None: all) and the reference units."""
    if cfg.normalize == "none":
        return None
    if indices is not None:  # the reference median needs its sample, whatever is scored
        indices = np.union1d(indices, reference_units(len(units)))
    s = cached_sensitivity(
        model, units, names, reduce=cfg.reduce, device=device, batch_size=cfg.batch_size,
        block_units=cfg.block_units, indices=indices, workers=workers,
        batch_tokens=cfg.batch_tokens or None,
    )  # fmt: skip
    return damped(s, cfg.normalize_damping) if cfg.normalize == "damped" else s


@dataclass
class UnitNormaliser:
    """``--normalize``'s divisors, computed on first use (once a sweep's workers exist, so
    they share the work) and kept: :attr:`bgotrace.score.context.SweepContext.sensitivity`."""

    model: torch.nn.Module
    """The model the norms are taken of: the sweep model, so they run in the sweep dtype."""
    units: UnitCache
    """The whole token cache (divisors are indexed by corpus unit)."""
    names: Sequence[str]
    cfg: ScoreConfig
    device: torch.device
    indices: np.ndarray | None = None
    """Corpus units whose scores are divided (``--candidates``); None: every unit."""
    _divisors: np.ndarray | None = field(default=None, init=False, repr=False)

    def divisors(self, workers: NormWorkers | None = None) -> np.ndarray:
        """(n_units,) divisors before the floor, NaN for units not computed; blocks of norms
        on ``workers`` when given, else in this process."""
        if self._divisors is None:
            out = unit_normalizers(
                self.model, self.units, self.names, self.cfg, self.device,
                indices=self.indices, workers=workers,
            )  # fmt: skip
            assert out is not None  # built for --normalize sensitivity | damped only
            self._divisors = out
        return self._divisors


def normalized(scores: np.ndarray, sensitivity: np.ndarray | None) -> np.ndarray:
    """Scores as ``--normalize`` asks: unchanged (None) or divided by the sensitivity."""
    if sensitivity is None:
        return scores
    if scores.shape[-1] != sensitivity.shape[0]:
        raise ValueError(f"{scores.shape[-1]} unit scores but {sensitivity.shape[0]} sensitivities")
    return normalize_scores(scores, sensitivity)
