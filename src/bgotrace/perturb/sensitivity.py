"""Per-unit sensitivity: how much a unit's loss moves under *any* perturbation (``--normalize``).

BGO's score is, to first order, a preconditioned dot product of the unit's and the query's
gradients, so a unit whose loss moves under every perturbation (a long unit with
``reduce=sum``, a high-loss unit with large gradients) is ranked high for every query: a hub.
Gradient cosine fixes the same problem of the raw dot product by dividing by the unit's
gradient norm, and ``--normalize sensitivity`` does the same for BGO: it ranks by

    score(z) / s(z),   s(z) = ‖∇θ L(z)‖₂ over the perturbed parameters,

with L the unit's summed token loss (``reduce=sum``) or its mean (``reduce=mean``: s / tokens),
so s is in the unit of the scores per unit of parameter movement. s depends on the model,
the parameter selection and the corpus only: it is computed once (one forward and backward
per unit, the cost of ~3 corpus passes) and cached beside the token cache, like the Fisher
diagonal.

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
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from bgotrace.modeling.fingerprint import model_fingerprint
from bgotrace.modeling.losses import forward_logits, token_losses
from bgotrace.perturb.grad_scope import grads_only_for
from bgotrace.runtime.progress import progress_bar

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


def unit_gradient_norms(
    model: torch.nn.Module, units: UnitCache, names: Sequence[str], device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """‖∇ Σ_t NLL_t(z)‖₂ over the named parameters for every unit (n_units,), and its
    predicted-token counts (n_units,)."""
    norms = np.zeros(len(units), dtype=np.float64)
    counts = np.zeros(len(units), dtype=np.int64)
    with grads_only_for(model, names) as params:
        for i in progress_bar(range(len(units)), "Sensitivity"):
            ids = torch.as_tensor(units.unit_tokens(i).astype(np.int64), device=device)[None]
            total = token_losses(forward_logits(model, ids), ids).sum()  # summed NLL of z
            grads = torch.autograd.grad(total, params)
            norms[i] = math.sqrt(sum(float(g.detach().double().pow(2).sum()) for g in grads))
            counts[i] = ids.shape[1] - 1
    return norms, counts


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
) -> np.ndarray:
    """s(z) of every unit (n_units,), loaded from beside the token cache or computed once."""
    path = units.root / "sensitivity" / f"{sensitivity_key(units, model, names)}.npz"
    if path.is_file():
        log.info("reusing unit sensitivities %s", path)
        with np.load(path) as data:
            norms, counts = data["norms"], data["counts"]
    else:
        norms, counts = unit_gradient_norms(model, units, names, device)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".part.npz")
        np.savez(tmp, norms=norms, counts=counts)
        tmp.replace(path)  # atomic: a crash never leaves a half-written file
    return sensitivity_from(norms, counts, reduce)


def normalized(scores: np.ndarray, sensitivity: np.ndarray | None) -> np.ndarray:
    """Scores as ``--normalize`` asks: unchanged (None) or divided by the sensitivity."""
    if sensitivity is None:
        return scores
    if scores.shape[-1] != sensitivity.shape[0]:
        raise ValueError(f"{scores.shape[-1]} unit scores but {sensitivity.shape[0]} sensitivities")
    return normalize_scores(scores, sensitivity)
