"""Per-unit sensitivity: how much a unit's loss moves under *any* perturbation (``--normalize``).

BGO's score is, to first order, a preconditioned dot product of the unit's and the query's
gradients, so a unit whose loss moves under every perturbation (a long unit with
``reduce=sum``, a high-loss unit with large gradients) is ranked high for every query: a hub.
Gradient cosine fixes the same problem of the raw dot product by dividing by the unit's
gradient norm, and ``--normalize sensitivity`` does the same for BGO: it ranks by

    score(z) / s(z),   s(z) = ‖∇θ L(z)‖₂ over the perturbed parameters,

with L the unit's summed token loss (``reduce=sum``) or its mean (``reduce=mean``: s / tokens),
so s is in the unit of the scores per unit of parameter movement. s depends on the model,
the parameter selection and the corpus only: it is computed once (one batched forward and
backward per batch of units, per-unit norms without per-unit gradients: see
:mod:`bgotrace.perturb.ghost_norms`), in resumable blocks, and cached beside the token cache,
like the Fisher diagonal.

``--normalize damped`` divides by s(z) + λ·median(s) instead: on a model that has memorised its
data the units it learned best have tiny gradients, and dividing by s alone inflates them into
hubs (issue 15); the damping bounds that inflation at 1/λ of the median unit's.

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
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from bgotrace.cache.batching import collate, length_buckets, loss_counts, unit_labels
from bgotrace.modeling.fingerprint import model_fingerprint
from bgotrace.modeling.losses import forward_logits, token_losses
from bgotrace.perturb.ghost_norms import GhostPlan, batch_squared_norms, plan_for
from bgotrace.perturb.grad_scope import grads_only_for
from bgotrace.runtime.progress import progress_bar

if TYPE_CHECKING:
    from bgotrace.config import ScoreConfig

log = logging.getLogger(__name__)

_FLOOR = 1e-3
"""Sensitivities are floored at this fraction of their median before dividing."""
_FORMAT = "gradient-norm-1"
"""Part of the cache key: a change of the estimator never reuses an old file."""


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
) -> np.ndarray:
    """‖∇ Σ_t NLL_t(z)‖₂ over the named parameters, one unit at a time (the slow reference,
    and the path for parameters :mod:`~bgotrace.perturb.ghost_norms` does not cover)."""
    indices = np.arange(len(units)) if indices is None else indices
    norms = np.zeros(len(indices), dtype=np.float64)
    with grads_only_for(model, names) as params:
        for k, i in enumerate(progress_bar(indices, "Sensitivity (per unit)")):
            ids = torch.as_tensor(units.unit_tokens(int(i)).astype(np.int64), device=device)[None]
            labels = torch.as_tensor(unit_labels(units, int(i)), device=device)[None]
            total = token_losses(forward_logits(model, ids), labels).sum()  # summed NLL of z
            grads = torch.autograd.grad(total, params)
            norms[k] = math.sqrt(sum(float(g.detach().double().pow(2).sum()) for g in grads))
    return norms


def unit_gradient_norms(
    model: torch.nn.Module,
    units: UnitCache,
    names: Sequence[str],
    device: torch.device,
    *,
    batch_size: int = 16,
    indices: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """‖∇ Σ_t NLL_t(z)‖₂ over the named parameters for every unit (or ``indices``), and its
    predicted-token counts, both (n,): batched ghost norms, the per-unit loop for the rest."""
    indices = np.arange(len(units)) if indices is None else np.asarray(indices)
    plan = plan_for(model, names)
    if not _ghost_agrees(model, units, names, plan, device, indices):
        plan = GhostPlan(uncovered=list(names))
    squares = np.zeros(len(indices), dtype=np.float64)
    if plan.modules:
        squares += _ghost_squares(model, units, names, plan, device, indices, batch_size)
    if plan.uncovered:
        log.warning("sensitivity of %d parameter tensors one unit at a time", len(plan.uncovered))
        squares += unit_gradient_norms_loop(model, units, plan.uncovered, device, indices) ** 2
    return np.sqrt(squares), loss_counts(units)[indices]


def _ghost_squares(
    model: torch.nn.Module,
    units: UnitCache,
    names: Sequence[str],
    plan: GhostPlan,
    device: torch.device,
    indices: np.ndarray,
    batch_size: int,
) -> np.ndarray:
    """Squared gradient norms over the parameters the plan covers, batch by batch."""
    where = {int(u): k for k, u in enumerate(indices)}
    out = np.zeros(len(indices), dtype=np.float64)
    with grads_only_for(model, names):
        batches = length_buckets(indices, units.lengths, batch_size)
        for batch in progress_bar(batches, "Sensitivity"):
            ids, mask, labels = collate(units, batch, 0, device)  # pads: masked, any id will do
            squares = batch_squared_norms(model, plan, ids, mask, labels)
            out[[where[int(u)] for u in batch]] = squares.cpu().numpy()
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
    """What each unit's score is divided by: s, floored at a fraction of its median (a unit
    that never moves would otherwise get an unbounded score)."""
    positive = sensitivity[sensitivity > 0]
    floor = _FLOOR * float(np.median(positive)) if positive.size else 1.0
    return np.maximum(sensitivity, floor)


def normalize_scores(scores: np.ndarray, sensitivity: np.ndarray) -> np.ndarray:
    """score / s (floored, see :func:`score_divisors`)."""
    return scores / score_divisors(sensitivity)


def sensitivity_key(units: UnitCache, model: torch.nn.Module, names: Sequence[str]) -> str:
    """Cache key: corpus cache, model weights, parameter selection, estimator."""
    parts = {
        "cache": json.dumps(units.manifest, sort_keys=True, default=str),
        "model": model_fingerprint(model, names),
        "names": list(names),
        "estimator": _FORMAT,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def cached_sensitivity(
    model: torch.nn.Module,
    units: UnitCache,
    names: Sequence[str],
    *,
    reduce: str,
    device: torch.device,
    batch_size: int = 16,
    block_units: int = 1024,
) -> np.ndarray:
    """s(z) of every unit (n_units,), loaded from beside the token cache or computed once, in
    blocks of ``block_units`` that an interrupted run reuses."""
    path = units.root / "sensitivity" / f"{sensitivity_key(units, model, names)}.npz"
    if path.is_file():
        log.info("reusing unit sensitivities %s", path)
        with np.load(path) as data:
            norms, counts = data["norms"], data["counts"]
    else:

        def compute(indices: np.ndarray) -> np.ndarray:
            norms, _ = unit_gradient_norms(
                model, units, names, device, batch_size=batch_size, indices=indices
            )
            return norms

        blocks = path.with_name(path.stem + ".blocks")
        norms = blocked(compute, len(units), block_units, blocks)
        counts = units.lengths.astype(np.int64) - 1
        tmp = path.with_name(path.stem + ".part.npz")
        np.savez(tmp, norms=norms, counts=counts)
        tmp.replace(path)  # atomic: a crash never leaves a half-written file
        shutil.rmtree(blocks, ignore_errors=True)
    return sensitivity_from(norms, counts, reduce)


def blocked(
    compute: Callable[[np.ndarray], np.ndarray], n: int, block_units: int, folder: Path
) -> np.ndarray:
    """compute(indices) over 0..n-1 in blocks, each saved to ``folder`` when done and
    reused from there, so an interrupted pass resumes at its first missing block."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for start in range(0, n, block_units):
        stop = min(n, start + block_units)
        path = folder / f"{start:010d}-{stop:010d}.npy"
        if not path.is_file():
            tmp = folder / f"{path.stem}.part.npy"
            np.save(tmp, compute(np.arange(start, stop)))
            tmp.replace(path)
        parts.append(np.load(path))
    return np.concatenate(parts) if parts else np.zeros(0)


def damped(sensitivity: np.ndarray, damping: float) -> np.ndarray:
    """s(z) + λ·median(s) (median of the positive s): what ``--normalize damped`` divides by."""
    positive = sensitivity[sensitivity > 0]
    median = float(np.median(positive)) if positive.size else 1.0
    return sensitivity + damping * median


def unit_normalizers(
    model: torch.nn.Module,
    units: UnitCache,
    names: Sequence[str],
    cfg: ScoreConfig,
    device: torch.device,
) -> np.ndarray | None:
    """What ``--normalize`` divides each unit's score by (before the floor of
    :func:`score_divisors`): None for ``none``, s(z), or s(z) + λ·median(s) for ``damped``."""
    if cfg.normalize == "none":
        return None
    s = cached_sensitivity(
        model, units, names, reduce=cfg.reduce, device=device,
        batch_size=cfg.batch_size, block_units=cfg.block_units,
    )  # fmt: skip
    return damped(s, cfg.normalize_damping) if cfg.normalize == "damped" else s


def normalized(scores: np.ndarray, sensitivity: np.ndarray | None) -> np.ndarray:
    """Scores as ``--normalize`` asks: unchanged (None) or divided by the sensitivity."""
    if sensitivity is None:
        return scores
    if scores.shape[-1] != sensitivity.shape[0]:
        raise ValueError(f"{scores.shape[-1]} unit scores but {sensitivity.shape[0]} sensitivities")
    return normalize_scores(scores, sensitivity)
