"""Per-unit sensitivity: how much a unit's loss moves under *any* perturbation (``--normalize``).

BGO's score is, to first order, a preconditioned dot product of the unit's and the query's
gradients, so a unit whose loss moves under every perturbation (a long unit with
``reduce=sum``, a high-loss unit with large gradients) is ranked high for every query: a hub.
Gradient cosine fixes the same problem of the raw dot product by dividing by the unit's
gradient norm. The BGO analogue needs no per-unit backward pass: perturb θ0 along R fixed
random directions δ_r and measure each unit's central difference

    s(z) = sqrt( mean_r ((L(z; θ0 + δ_r) − L(z; θ0 − δ_r)) / 2)² ),

which estimates ‖D·∇L(z)‖ (D = the directions' per-tensor scale) since
E[(δᵀ∇L)²] = ∇Lᵀ E[δδᵀ] ∇L. L is the unit's summed token loss; ``reduce=mean`` divides by
the unit's token count, like the scores. s depends on the model, the parameter selection
and the corpus only, so it is computed once (2R corpus passes) and cached beside the token
cache, like the Fisher diagonal. ``--normalize sensitivity`` ranks by score(z) / s(z).

Directions: per tensor a seeded Gaussian rescaled to ``RADIUS`` × the tensor's norm, so
every tensor moves by the same relative amount (a tensor of zeros, such as a fresh bias,
moves by ``RADIUS`` × the mean parameter RMS per entry).
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
from bgotrace.score.sweep import unit_loss_sums

log = logging.getLogger(__name__)

RADIUS = 1e-3
"""‖δ_t‖ / ‖θ_t‖ of every tensor: small enough to stay in the linear regime."""
N_DIRECTIONS = 4
"""R random directions (2R corpus passes); the estimate's relative noise is ~1/√(2R)."""
_FLOOR = 1e-3
"""Sensitivities are floored at this fraction of their median before dividing."""


class UnitCache(Protocol):
    """What the sensitivity pass needs from a token cache."""

    root: Path
    manifest: dict
    lengths: np.ndarray

    def __len__(self) -> int: ...

    def unit_tokens(self, i: int) -> np.ndarray: ...


def random_directions(
    model: torch.nn.Module, names: Sequence[str], n: int, seed: int
) -> list[dict[str, torch.Tensor]]:
    """``n`` seeded directions over the named parameters (float32, on their device)."""
    params = dict(model.named_parameters())
    total = sum(float(params[k].detach().float().pow(2).sum()) for k in names)
    rms = math.sqrt(total / max(1, sum(params[k].numel() for k in names)))
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        direction = {}
        for k in names:
            p = params[k].detach()
            g = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            norm = float(p.float().norm()) or rms * math.sqrt(p.numel())
            direction[k] = (g * (RADIUS * norm / float(g.norm().clamp_min(1e-30)))).to(p.device)
        out.append(direction)
    return out


def half_differences(
    model: torch.nn.Module,
    units: UnitCache,
    names: Sequence[str],
    *,
    seed: int,
    batch_size: int,
    pad_id: int,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """(L(z; θ0+δ_r) − L(z; θ0−δ_r)) / 2 of summed losses (R, n_units), and token counts."""
    params = dict(model.named_parameters())
    states = []
    for d in random_directions(model, names, N_DIRECTIONS, seed):
        for sign in (1.0, -1.0):
            states.append(
                {k: (params[k].detach().float() + sign * d[k]).to(params[k].dtype) for k in names}
            )
    indices = np.arange(len(units))
    sums, counts = unit_loss_sums(
        model, units, indices, states, batch_size=batch_size, pad_id=pad_id, device=device
    )
    return (sums[0::2] - sums[1::2]) / 2.0, counts


def sensitivity_from(diffs: np.ndarray, counts: np.ndarray, reduce: str) -> np.ndarray:
    """s(z) from the half differences, in the unit of the scores (sum or mean per token)."""
    if reduce == "mean":
        diffs = diffs / np.maximum(counts, 1)[None, :]
    return np.sqrt(np.mean(diffs**2, axis=0))


def normalize_scores(scores: np.ndarray, sensitivity: np.ndarray) -> np.ndarray:
    """score / s, with s floored at a fraction of its median (a unit that never moves)."""
    positive = sensitivity[sensitivity > 0]
    floor = _FLOOR * float(np.median(positive)) if positive.size else 1.0
    return scores / np.maximum(sensitivity, floor)


def sensitivity_key(
    units: UnitCache, model: torch.nn.Module, names: Sequence[str], seed: int
) -> str:
    """Cache key: corpus cache, model weights, parameter selection, directions."""
    parts = {
        "cache": json.dumps(units.manifest, sort_keys=True, default=str),
        "model": model_fingerprint(model, names),
        "names": list(names),
        "radius": RADIUS,
        "directions": N_DIRECTIONS,
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def cached_sensitivity(
    model: torch.nn.Module,
    units: UnitCache,
    names: Sequence[str],
    *,
    reduce: str,
    seed: int,
    batch_size: int,
    pad_id: int,
    device: torch.device,
) -> np.ndarray:
    """s(z) of every unit (n_units,), loaded from beside the token cache or computed once."""
    path = units.root / "sensitivity" / f"{sensitivity_key(units, model, names, seed)}.npz"
    if path.is_file():
        log.info("reusing unit sensitivities %s", path)
        with np.load(path) as data:
            diffs, counts = data["diffs"], data["counts"]
    else:
        diffs, counts = half_differences(
            model, units, names, seed=seed, batch_size=batch_size, pad_id=pad_id, device=device
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".part.npz")
        np.savez(tmp, diffs=diffs, counts=counts)
        tmp.replace(path)  # atomic: a crash never leaves a half-written file
    return sensitivity_from(diffs, counts, reduce)


def normalized(scores: np.ndarray, sensitivity: np.ndarray | None) -> np.ndarray:
    """Scores as ``--normalize`` asks: unchanged (None) or divided by the sensitivity."""
    if sensitivity is None:
        return scores
    if scores.shape[-1] != sensitivity.shape[0]:
        raise ValueError(f"{scores.shape[-1]} unit scores but {sensitivity.shape[0]} sensitivities")
    return normalize_scores(scores, sensitivity)
