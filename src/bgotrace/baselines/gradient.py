"""Gradient-similarity baselines at the final checkpoint (TracIn-style, one checkpoint).

Every method here scores a unit z for a query x by an inner product of feature vectors
φ(z)·φ(x), where φ is built from the loss gradient g = ∇θ L over the selected parameters
(``params``), flattened in ``model.named_parameters()`` order:

- ``graddot``:        φ(g) = g                      score = g_zᵀ g_x           (nats² / param²)
- ``gradcos``:        φ(g) = g / ‖g‖                score = cos(g_z, g_x)      in [-1, 1]
- ``fisher-graddot``: φ(g) = g / √(F̂+ε)            score = g_zᵀ diag(F̂+ε)⁻¹ g_x (unitless)
- ``trackstar``:      φ(g) = unit(P (g / (√v+ε)))   score ≈ cos of second-moment-corrected,
  randomly projected gradients (Chang et al. 2024), in [-1, 1]

L(z) is the unit's mean token NLL (as BGO's ``reduce=mean``), L(x) the query's mean NLL over
its loss tokens (the completion by default), both exactly as BGO takes them. Sign: a
positive inner product means a gradient step on z also lowers the query loss, so
**high = the unit supports the query**. ``fisher-graddot`` is BGO's first-order limit:
with the ``fisher`` optimizer, K steps of size η and N units, BGO's bidirectional score is
≈ 2K(η/N) · fisher-graddot (same F̂ and ε, from :func:`cached_fisher`).

Per-unit gradients are computed once in ``prepare`` (batch size 1, no padding), turned
into features block by block and kept in memory as an (n_units, dim) float32 matrix; with
``proj_dim`` set, dim is the projection's (see :mod:`projection`), else the parameter count.
TrackStar's task-specific Hessian correction is not applied (only the optimizer's v).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from safetensors import safe_open

from bgotrace.baselines.base import Attributor, MethodContext, register
from bgotrace.baselines.projection import GaussianProjection
from bgotrace.cache.batching import unit_labels
from bgotrace.errors import ConfigError
from bgotrace.modeling.losses import forward_logits, mean_loss
from bgotrace.perturb.fisher import cached_fisher
from bgotrace.perturb.grad_scope import grads_only_for
from bgotrace.perturb.params import select_parameters
from bgotrace.query import EncodedQuery
from bgotrace.runtime.progress import progress_task

log = logging.getLogger(__name__)

OPTIMIZER_STATE_FILE = "optimizer_state.safetensors"
BLOCK_FLOATS = 1 << 28
"""Floats of one block of raw per-unit gradients (1 GiB in float32). Blocks are large
because the projection matrix is regenerated once per block."""


@dataclass
class GradientOptions:
    """Options of ``graddot`` and ``gradcos``."""

    proj_dim: int | None = None
    """Random projection dimension (None: exact inner products of the full gradients)."""
    max_store_gb: float = 4.0
    """Refuse to keep per-unit features larger than this many GiB (set proj_dim instead)."""

    def __post_init__(self) -> None:
        if self.proj_dim is not None and self.proj_dim < 1:
            raise ConfigError(f"proj_dim must be >= 1 or None, got {self.proj_dim}.")
        if self.max_store_gb <= 0:
            raise ConfigError(f"max_store_gb must be > 0, got {self.max_store_gb}.")


@dataclass
class FisherOptions(GradientOptions):
    """Options of ``fisher-graddot`` (defaults match BGO's ``PerturbConfig``)."""

    fisher_samples: int = 256
    """Corpus units sampled to estimate the diagonal Fisher F̂."""
    fisher_eps: float = 1e-6
    """ε added to F̂ before dividing."""


@dataclass
class TrackStarOptions(GradientOptions):
    """Options of ``trackstar``."""

    proj_dim: int | None = 1024
    """Random projection dimension (None: no projection)."""
    optimizer_state: str | None = None
    """Adam state file with ``exp_avg_sq.<param>`` tensors; default: the model directory's
    ``optimizer_state.safetensors`` if present, else the diagonal Fisher stands in for v."""
    eps: float = 1e-8
    """ε in g / (√v + ε) (Adam's default)."""
    fisher_samples: int = 256
    """Units sampled for the Fisher that replaces v when no optimizer state exists."""


def flat_grad(
    model: torch.nn.Module,
    params: list[torch.Tensor],
    input_ids: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    """Gradient (D,) float32 of the mean NLL of one sequence (1, T) w.r.t. ``params``."""
    loss = mean_loss(forward_logits(model, input_ids), labels)
    grads = torch.autograd.grad(loss, params)
    return torch.cat([g.reshape(-1).float() for g in grads])


def unit_ids(ctx: MethodContext, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels (1, L) of unit i; the labels are IGNORE outside its loss (an SFT
    conversation's loss mask), else its tokens."""
    ids = torch.as_tensor(ctx.cache.unit_tokens(i).astype(np.int64), device=ctx.torch_device)
    labels = torch.as_tensor(unit_labels(ctx.cache, i), device=ctx.torch_device)
    return ids[None], labels[None]


class GradientAttributor(Attributor):
    """φ(z)·φ(x) for gradient features φ; subclasses choose weights and normalisation."""

    Options: ClassVar[type] = GradientOptions
    normalize: ClassVar[bool] = False
    """Scale features to unit length (cosine scores)."""

    def _prepare(self, ctx: MethodContext) -> None:
        self.names = select_parameters(ctx.model, ctx.params)
        params = dict(ctx.model.named_parameters())
        dim = sum(params[n].numel() for n in self.names)
        self.weights = self.feature_weights(ctx)  # (D,) or None
        self.projection = self._projection(dim, ctx.seed)
        out_dim = self.projection.dim_out if self.projection is not None else dim
        self._check_memory(ctx.n_units, out_dim)
        self.unit_features = self._unit_features(ctx, dim, out_dim)  # (N, k) float32

    def feature_weights(self, ctx: MethodContext) -> torch.Tensor | None:
        """Per-coordinate weights w (D,) applied as g·w before projecting; None = all ones."""
        return None

    def featurize(self, grads: torch.Tensor) -> torch.Tensor:
        """Features (B, k) of gradients (B, D): weight, project, normalise."""
        if self.weights is not None:
            grads = grads * self.weights
        if self.projection is not None:
            grads = self.projection(grads)
        if self.normalize:
            grads = grads / grads.norm(dim=-1, keepdim=True).clamp(min=1e-30)
        return grads

    def _projection(self, dim: int, seed: int) -> GaussianProjection | None:
        k = self.opts.proj_dim
        if k is None:
            return None
        if k >= dim:
            log.info("%s: proj_dim %d >= %d parameters, so no projection", self.name, k, dim)
            return None
        return GaussianProjection(dim, k, seed)

    def _check_memory(self, n_units: int, dim: int) -> None:
        gib = n_units * dim * 4 / 2**30
        if gib > self.opts.max_store_gb:
            raise ConfigError(
                f"{self.name}: per-unit features would take {gib:.1f} GiB ({n_units} units x "
                f"{dim} floats), above max_store_gb={self.opts.max_store_gb}: set proj_dim "
                "(e.g. 1024), restrict params (e.g. last:2), or raise max_store_gb."
            )

    def _unit_features(self, ctx: MethodContext, dim: int, out_dim: int) -> torch.Tensor:
        n = ctx.n_units
        block = max(1, min(n, BLOCK_FLOATS // dim))  # units per block
        buffer = torch.empty(block, dim, device=ctx.torch_device)  # (B, D) raw gradients
        features = torch.empty(n, out_dim)  # (N, k) float32, on CPU
        with (
            grads_only_for(ctx.model, self.names) as params,
            progress_task(f"{self.name} gradients", total=n) as advance,
        ):
            for start in range(0, n, block):
                stop = min(start + block, n)
                for row, i in enumerate(range(start, stop)):
                    ids, labels = unit_ids(ctx, i)
                    buffer[row] = flat_grad(ctx.model, params, ids, labels)
                    advance(1)
                features[start:stop] = self.featurize(buffer[: stop - start]).cpu()
        return features

    def _score(self, queries: list[EncodedQuery]) -> np.ndarray:
        ctx = self._prepared()
        device = ctx.torch_device
        with grads_only_for(ctx.model, self.names) as params:
            grads = [
                flat_grad(ctx.model, params, q.input_ids.to(device), q.labels.to(device))
                for q in queries
            ]
        q_features = self.featurize(torch.stack(grads)).double().cpu()  # (Q, k)
        return _inner_products(self.unit_features, q_features)


def _inner_products(units: torch.Tensor, queries: torch.Tensor) -> np.ndarray:
    """(Q, N) float64 inner products, unit rows converted to float64 a block at a time."""
    out = np.empty((queries.shape[0], units.shape[0]))
    step = 1 << 14
    for start in range(0, units.shape[0], step):
        block = units[start : start + step].double()  # (n, k)
        out[:, start : start + step] = (queries @ block.T).numpy()
    return out


def flatten(tensors: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """Concatenate per-parameter tensors (float32) in ``names`` order: (D,)."""
    return torch.cat([tensors[n].reshape(-1).float() for n in names])


def fisher_diagonal(ctx: MethodContext, names: list[str], n_samples: int) -> torch.Tensor:
    """BGO's diagonal Fisher F̂ (D,), from (or into) the cache beside the token cache."""
    fisher = cached_fisher(
        ctx.model, ctx.cache, names, n_samples=n_samples, seed=ctx.seed, device=ctx.torch_device
    )
    return flatten(fisher, names)


@register("graddot")
class GradDot(GradientAttributor):
    """Raw gradient inner product g_zᵀ g_x; dominated by high-gradient-norm units."""


@register("gradcos")
class GradCos(GradientAttributor):
    """Gradient cosine cos(g_z, g_x) in [-1, 1]."""

    normalize = True


@register("fisher-graddot")
class FisherGradDot(GradientAttributor):
    """g_zᵀ diag(F̂+ε)⁻¹ g_x: BGO's first-order limit (÷ 2K·η/N)."""

    Options = FisherOptions

    def feature_weights(self, ctx: MethodContext) -> torch.Tensor | None:
        fisher = fisher_diagonal(ctx, self.names, self.opts.fisher_samples)
        return (fisher + self.opts.fisher_eps).rsqrt()  # w² = 1/(F̂+ε)


@register("trackstar")
class TrackStar(GradientAttributor):
    """Cosine of g/(√v+ε), projected to ``proj_dim``: v is Adam's final second moment
    (bias-corrected), or the diagonal Fisher when the model has no saved optimizer state."""

    Options = TrackStarOptions
    normalize = True

    def feature_weights(self, ctx: MethodContext) -> torch.Tensor | None:
        path = self._state_path(ctx)
        if path is None:
            log.info("trackstar: no %s, using the Fisher diagonal as v", OPTIMIZER_STATE_FILE)
            self.second_moment = "fisher"
            v = fisher_diagonal(ctx, self.names, self.opts.fisher_samples)
        else:
            self.second_moment = str(path)
            v = flatten(adam_second_moment(path, ctx.model, self.names), self.names)
        return 1.0 / (v.to(ctx.torch_device).sqrt() + self.opts.eps)

    def _state_path(self, ctx: MethodContext) -> Path | None:
        if self.opts.optimizer_state is not None:
            path = Path(self.opts.optimizer_state)
            if not path.is_file():
                raise ConfigError(
                    f"trackstar optimizer_state {path} does not exist: pass the "
                    f"{OPTIMIZER_STATE_FILE} that bgotrace train wrote, or omit it."
                )
            return path
        model_dir = str(getattr(ctx.model, "name_or_path", "") or "")
        path = Path(model_dir) / OPTIMIZER_STATE_FILE
        return path if model_dir and path.is_file() else None


def adam_second_moment(
    path: Path, model: torch.nn.Module, names: list[str]
) -> dict[str, torch.Tensor]:
    """Adam's ``exp_avg_sq`` per parameter, divided by 1 − β2^step when the file says so."""
    params = dict(model.named_parameters())
    with safe_open(str(path), framework="pt") as f:
        meta, keys = f.metadata() or {}, set(f.keys())
        missing = [n for n in names if f"exp_avg_sq.{n}" not in keys]
        if missing:
            raise ConfigError(
                f"{path} has no exp_avg_sq for {len(missing)} selected parameter(s), e.g. "
                f"{missing[0]!r}: pass the state saved with this model, or restrict params."
            )
        v = {n: f.get_tensor(f"exp_avg_sq.{n}").float() for n in names}
    for n in names:
        if v[n].shape != params[n].shape:
            raise ConfigError(
                f"{path}: exp_avg_sq.{n} has shape {tuple(v[n].shape)} but the parameter has "
                f"{tuple(params[n].shape)}: the state belongs to another model."
            )
    step, betas = int(meta.get("step", 0)), json.loads(meta.get("betas", "null") or "null")
    if step > 0 and betas:
        v = {n: t / (1.0 - float(betas[1]) ** step) for n, t in v.items()}  # Adam's v̂
    return v
