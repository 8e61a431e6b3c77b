"""Diagonal empirical Fisher F̂ for the reference scripts' preconditioning.

F̂ = mean over sampled corpus units of the squared per-unit loss gradient (batch
size 1, as the reference scripts do). It depends on the model, the parameter
selection and the corpus, so it is cached beside the token cache under a key made
of all three and reused by every later query.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from bgotrace.cache.batching import unit_labels
from bgotrace.cache.locking import exclusive
from bgotrace.modeling.fingerprint import model_fingerprint
from bgotrace.modeling.losses import forward_logits, mean_loss
from bgotrace.perturb.grad_scope import grads_only_for
from bgotrace.runtime.progress import progress_bar

log = logging.getLogger(__name__)


class UnitSource(Protocol):
    """What the Fisher estimate needs from a token cache."""

    root: Path
    manifest: dict

    def __len__(self) -> int: ...

    def unit_tokens(self, i: int) -> np.ndarray: ...


def fisher_denominators(
    fisher: Mapping[str, torch.Tensor],
    names: Sequence[str],
    eps: float,
    damping: float | None,
) -> dict[str, torch.Tensor]:
    """What the query gradient of each named tensor is divided by.

    ``damping`` None: F̂ + ε, the reference scripts' form. Otherwise the damped Fisher
    F̂ + λ·mean(F̂), with one global mean over every perturbed parameter rather than one per
    tensor: a single scalar keeps the Fisher's relative scaling between tensors (the point of
    the preconditioner) and does not depend on how a model splits its weights into tensors
    (fused vs separate q/k/v). Entries with F̂ → 0 are divided by λ·mean(F̂) at least, so no
    entry's step exceeds 1/λ times that of an average one. Damping a Fisher that is exactly
    zero everywhere falls back to ε.
    """
    if damping is None:
        return {n: fisher[n] + eps for n in names}
    total = sum(float(fisher[n].double().sum()) for n in names)
    count = sum(fisher[n].numel() for n in names)
    floor = damping * total / count if total > 0 else eps
    return {n: fisher[n] + floor for n in names}


def sample_units(n_units: int, n_samples: int, seed: int) -> np.ndarray:
    """Indices of the units the estimate uses: a seeded sample without replacement."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_units, size=min(n_samples, n_units), replace=False))


def estimate_fisher(
    model: torch.nn.Module,
    units: UnitSource,
    names: Sequence[str],
    indices: np.ndarray,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Mean squared per-unit gradient of each named parameter, in float32."""
    acc = {
        n: torch.zeros_like(p, dtype=torch.float32)
        for n, p in model.named_parameters()
        if n in set(names)
    }
    with grads_only_for(model, names) as params:
        for i in progress_bar(indices.tolist(), "Fisher"):
            ids = torch.as_tensor(units.unit_tokens(i).astype(np.int64), device=device)[None]
            labels = torch.as_tensor(unit_labels(units, i), device=device)[None]
            loss = mean_loss(forward_logits(model, ids), labels)
            grads = torch.autograd.grad(loss, params)
            for n, g in zip(names, grads, strict=True):
                acc[n] += g.detach().float() ** 2
    return {n: a / len(indices) for n, a in acc.items()}


def fisher_key(
    units: UnitSource, model: torch.nn.Module, names: Sequence[str], n: int, seed: int
) -> str:
    """Cache key: corpus cache, model weights, parameter selection, sample size and seed."""
    parts = {
        "cache": json.dumps(units.manifest, sort_keys=True, default=str),
        "model": model_fingerprint(model, names),
        "names": list(names),
        "n": n,
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def cached_fisher(
    model: torch.nn.Module,
    units: UnitSource,
    names: Sequence[str],
    *,
    n_samples: int,
    seed: int,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Load F̂ from beside the token cache, or estimate and store it."""
    path = units.root / "fisher" / f"{fisher_key(units, model, names, n_samples, seed)}.safetensors"
    # Two runs on one cache estimate F̂ once: the second waits, then reuses the file.
    with exclusive(path, what="Fisher diagonal"):
        if path.is_file():
            log.info("reusing Fisher diagonal %s", path)
            return {n: t.to(device) for n, t in load_file(path).items()}
        sample = sample_units(len(units), n_samples, seed)
        fisher = estimate_fisher(model, units, names, sample, device)
        tmp = path.with_suffix(".part")
        save_file({n: t.contiguous().cpu() for n, t in fisher.items()}, str(tmp))
        tmp.replace(path)  # atomic: a crash never leaves a half-written Fisher file
    return fisher
