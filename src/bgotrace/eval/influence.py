"""Model-based influence metrics: tail-patch, leave-k-out retraining and LDS.

Each is a small function plus what it needs from the model; the runner
(:mod:`bgotrace.eval.runner`) calls them for every method and summarises with the pure
functions of :mod:`bgotrace.eval.metrics`. Signs follow METHOD.md: a unit with a high score
supports the query, so

* **tail-patch** — one optimiser step from θ0 on a single unit (its mean token loss), then
  the change of the query completion's log-probability, Δ = log p(c | p; θ') − log p(c | p; θ0),
  in nats, summed over the loss tokens (positive = the unit helps produce the completion).
  Default step: plain SGD, θ' = θ0 − 1e-2 · ∇L(z), no clipping or weight decay. Option
  ``adam``: one Adam step (no weight decay) that reuses the final training moments from
  ``optimizer_state.safetensors`` (lr 1e-4 by default; the reused first moment adds the same
  drift to every unit, which the random-k control absorbs). θ0 is never modified: patched
  parameters are new tensors passed through ``torch.func.functional_call``.
* **leave-k-out** — remove the top-k units, retrain with the same recipe and seed, and
  measure the query loss (mean NLL per loss token, nats); compare with removing k random
  units (drawn per query and seed, shared by all methods) and with removing nothing.
* **LDS** — m random subsets of a fraction of the units, one retrain each (recorded seed),
  shared by all methods and queries; per query the Spearman correlation of each subset's
  summed scores with minus its retrained query loss (:func:`metrics.lds_over_queries`).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from bgotrace.cache import TokenCache
from bgotrace.cache.batching import unit_labels
from bgotrace.errors import ConfigError
from bgotrace.eval.metrics import TailPatchSummary, lds_over_queries, tail_patch_summary
from bgotrace.eval.reference_form import REFERENCE_LR, fresh_adamw_step
from bgotrace.eval.retrain import RetrainCache
from bgotrace.modeling.losses import forward_logits, mean_loss, token_losses
from bgotrace.perturb.grad_scope import grads_only_for
from bgotrace.query import EncodedQuery
from bgotrace.ranking.order import rank_order
from bgotrace.variants import get_variant

TAIL_PATCH_LR = {"sgd": 1e-2, "adam": 1e-4, "adamw-fresh": REFERENCE_LR}
"""Default step size of each tail-patch optimiser."""


@dataclass(frozen=True)
class TailPatchConfig:
    """How tail-patch steps are taken."""

    ks: tuple[int, ...] = (1, 5, 10)
    """Numbers of top units (and random units) whose Δ log p are averaged."""
    optimizer: str = "sgd"
    """``sgd`` (fixed lr) or ``adam`` (reuses the final training moments)."""
    lr: float | None = None
    """Step size; None = 1e-2 for sgd, 1e-4 for adam."""
    seed: int = 0
    """Seed of the random-k control units."""
    reference: bool = True
    """Also report the reference scripts' form, |Δp|/p × 100 after one fresh AdamW step
    (lr 1e-5, gradient clipped at 1.0): ``tail_patch_ref@k`` (:mod:`eval.reference_form`)."""

    def __post_init__(self) -> None:
        if self.optimizer not in TAIL_PATCH_LR:
            raise ConfigError(
                f"tail-patch optimizer={self.optimizer!r} is unknown: use sgd or adam "
                "(or adamw-fresh, the reference scripts' step)."
            )
        if not self.ks or min(self.ks) < 1:
            raise ConfigError(f"tail-patch ks must be positive integers, got {self.ks}.")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"tail-patch lr must be > 0, got {self.lr}.")

    @property
    def step_lr(self) -> float:
        return self.lr if self.lr is not None else TAIL_PATCH_LR[self.optimizer]


# --------------------------------------------------------------------------- unit choice


def top_units(scores: np.ndarray, query_ids: Sequence[str], k: int) -> np.ndarray:
    """The k best units of each query, (q, k) indices; ties in seeded random order."""
    return np.stack([rank_order(row, qid)[:k] for row, qid in zip(scores, query_ids, strict=True)])


def random_units(n_units: int, query_id: str, k: int, *, seed: int, stream: int = 0) -> np.ndarray:
    """k distinct random units for a query, (k,); the same for every method."""
    rng = np.random.default_rng([seed, zlib.crc32(query_id.encode("utf-8")), stream])
    return rng.choice(n_units, size=k, replace=False)


# --------------------------------------------------------------------------- tail-patch


@torch.no_grad()
def completion_logprob(
    model: torch.nn.Module,
    query: EncodedQuery,
    overrides: dict[str, torch.Tensor] | None = None,
) -> float:
    """log p of the query's loss tokens (nats, summed) under ``model`` or its override."""
    device = next(model.parameters()).device
    ids, labels = query.input_ids.to(device), query.labels.to(device)
    logits = forward_logits(model, ids, overrides=overrides)  # (1, T, V)
    return -float(token_losses(logits, labels).sum())


def unit_gradient(
    model: torch.nn.Module,
    token_ids: np.ndarray,
    names: Sequence[str],
    labels: np.ndarray | None = None,
) -> dict[str, torch.Tensor]:
    """Gradient of the unit's mean token NLL (as in training) w.r.t. the named parameters;
    ``labels`` (IGNORE outside the loss) default to the tokens."""
    device = next(model.parameters()).device
    ids = torch.as_tensor(np.asarray(token_ids, dtype=np.int64), device=device)[None]  # (1, T)
    targets = ids if labels is None else torch.as_tensor(labels, device=device)[None]
    with torch.enable_grad(), grads_only_for(model, names) as params:
        loss = mean_loss(forward_logits(model, ids), targets)
        grads = torch.autograd.grad(loss, params)
    return dict(zip(names, grads, strict=True))


@dataclass(frozen=True)
class AdamState:
    """AdamW moments at the end of training, as ``bgotrace train`` saves them."""

    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    step: int
    betas: tuple[float, float]
    eps: float


def load_adam_state(path: str | Path, names: Sequence[str], device: torch.device) -> AdamState:
    """Read ``optimizer_state.safetensors``; every named parameter must have both moments."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"tail-patch optimizer adam needs {path}, which `bgotrace train` writes: "
            "use optimizer sgd for models without it."
        )
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta: dict[str, Any] = f.metadata() or {}
        keys = set(f.keys())
        missing = [n for n in names if f"exp_avg.{n}" not in keys or f"exp_avg_sq.{n}" not in keys]
        if missing:
            raise ConfigError(
                f"{path} lacks the Adam moments of {missing[:3]}: use tail-patch optimizer sgd."
            )
        m = {n: f.get_tensor(f"exp_avg.{n}").to(device) for n in names}
        v = {n: f.get_tensor(f"exp_avg_sq.{n}").to(device) for n in names}
    betas = tuple(float(b) for b in json.loads(meta.get("betas", "[0.9, 0.999]")))
    return AdamState(m, v, int(meta.get("step", 0)), (betas[0], betas[1]), float(meta["eps"]))


def sgd_step(
    params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor], lr: float
) -> dict[str, torch.Tensor]:
    """θ − lr·g as new tensors."""
    return {n: params[n].detach() - lr * g for n, g in grads.items()}


def adam_step(
    params: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor],
    state: AdamState,
    lr: float,
) -> dict[str, torch.Tensor]:
    """One bias-corrected Adam step continuing ``state`` (step t+1), as new tensors."""
    (b1, b2), t = state.betas, state.step + 1
    out = {}
    for n, g in grads.items():
        m = b1 * state.exp_avg[n] + (1 - b1) * g
        v = b2 * state.exp_avg_sq[n] + (1 - b2) * g * g
        denom = (v / (1 - b2**t)).sqrt() + state.eps
        out[n] = params[n].detach() - lr * (m / (1 - b1**t)) / denom
    return out


class TailPatcher:
    """Δ log p of each query after one step on a unit from θ0, memoised per (query, unit).

    Deltas do not depend on the method that picked the unit, so methods that retrieve the
    same units share the work. ``n_steps`` counts unit gradients taken.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        cache: TokenCache,
        queries: Sequence[EncodedQuery],
        config: TailPatchConfig,
        adam_state: AdamState | None = None,
    ) -> None:
        if config.optimizer == "adam" and adam_state is None:
            raise ConfigError("tail-patch optimizer adam needs the training optimizer state.")
        self.model, self.cache, self.queries = model, cache, list(queries)
        self.config, self.adam_state = config, adam_state
        self.names = [n for n, _ in model.named_parameters()]
        self.base = np.array([completion_logprob(model, q) for q in self.queries])
        self._memo: dict[tuple[int, int], float] = {}
        self.n_steps = 0

    def _patched(self, unit: int) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        labels = unit_labels(self.cache, unit)
        grads = unit_gradient(self.model, self.cache.unit_tokens(unit), self.names, labels)
        self.n_steps += 1
        if self.config.optimizer == "adamw-fresh":  # the reference scripts' step
            return fresh_adamw_step(params, grads, self.config.step_lr)
        if self.adam_state is not None and self.config.optimizer == "adam":
            return adam_step(params, grads, self.adam_state, self.config.step_lr)
        return sgd_step(params, grads, self.config.step_lr)

    def deltas(self, units: np.ndarray) -> np.ndarray:
        """Δ log p (nats) for ``units`` (q, k): row i holds units to patch for query i."""
        wanted: dict[int, set[int]] = {}
        for qi, row in enumerate(np.asarray(units)):
            for u in row.tolist():
                if (qi, u) not in self._memo:
                    wanted.setdefault(u, set()).add(qi)
        for u, query_rows in wanted.items():
            overrides = self._patched(u)
            for qi in sorted(query_rows):
                patched = completion_logprob(self.model, self.queries[qi], overrides)
                self._memo[(qi, u)] = patched - float(self.base[qi])
        return np.array([[self._memo[(qi, u)] for u in row] for qi, row in enumerate(units)])


@dataclass(frozen=True)
class TailPatchResult:
    """Δ log p (nats) for each query's top units and random units, (q, k_max) each."""

    topk: np.ndarray
    random: np.ndarray

    def summary(self, k: int) -> TailPatchSummary:
        """Mean over the first k units, then bootstrap over queries (paired with random)."""
        return tail_patch_summary(self.topk[:, :k], self.random[:, :k])


def tail_patch(
    patcher: TailPatcher, scores: Mapping[str, np.ndarray], query_ids: Sequence[str]
) -> dict[str, TailPatchResult]:
    """Tail-patch each method's top-k_max units (scores (q, n_units) per method) beside the
    same k_max random units per query. All (query, unit) pairs are patched in one pass, so
    each distinct unit's gradient is taken once however many methods retrieve it."""
    k = max(patcher.config.ks)
    chosen = {m: top_units(s, query_ids, k) for m, s in scores.items()}
    n_units = len(patcher.cache)
    control = np.stack(
        [random_units(n_units, qid, k, seed=patcher.config.seed) for qid in query_ids]
    )
    patcher.deltas(np.hstack([control, *chosen.values()]))
    random = patcher.deltas(control)
    return {m: TailPatchResult(patcher.deltas(c), random) for m, c in chosen.items()}


# --------------------------------------------------------------------------- leave-k-out


@dataclass(frozen=True)
class LeaveKOutConfig:
    """Which units are removed and how often the retrain is repeated."""

    k: int = 10
    """Units removed per query: the method's top k, or k random units."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Training seeds; top-k, random-k and no-removal retrains are paired by seed
    (``run_eval``'s ``seeds`` argument sets them)."""
    max_queries: int | None = 8
    """Queries evaluated (each costs ~2 retrains per method and seed); None = all."""
    query_kind: str | None = "fact"
    """Only queries of this kind: removing k of thousands of units can move a memorised
    fact, while a style query's loss barely notices; None = every kind."""
    seed: int = 0
    """Seed of the random-k sets."""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"leave-k-out k must be >= 1, got {self.k}.")
        if len(self.seeds) < 2 or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(
                f"leave-k-out needs at least 2 distinct seeds for a paired CI, got {self.seeds}: "
                "the protocol uses 3 (0,1,2)."
            )
        if self.max_queries is not None and self.max_queries < 1:
            raise ConfigError("leave-k-out max_queries must be >= 1 or None (all queries).")


def removal_losses(
    retrains: RetrainCache,
    queries: Sequence[EncodedQuery],
    removed: np.ndarray,
    seeds: Sequence[int],
) -> np.ndarray:
    """Query loss (nats per token) after retraining without ``removed`` (q, n_seeds, k)
    units of each query with each seed; shape (q, n_seeds). k may be 0 (no removal)."""
    out = np.empty((len(queries), len(seeds)))
    for qi, query in enumerate(queries):
        for si, seed in enumerate(seeds):
            out[qi, si] = retrains.query_losses(removed[qi, si], seed, [query])[0]
    return out


def top_k_removals(
    scores: np.ndarray, query_ids: Sequence[str], config: LeaveKOutConfig
) -> np.ndarray:
    """The method's top-k units of each query, the same for every seed: (q, n_seeds, k)."""
    top = top_units(scores, query_ids, config.k)  # (q, k)
    return np.repeat(top[:, None, :], len(config.seeds), axis=1)


def random_k_removals(
    n_units: int, query_ids: Sequence[str], config: LeaveKOutConfig
) -> np.ndarray:
    """k random units per query, drawn afresh for each seed: (q, n_seeds, k)."""
    return np.stack(
        [
            np.stack([random_units(n_units, qid, config.k, seed=config.seed, stream=1 + s)
                      for s in config.seeds])
            for qid in query_ids
        ]
    )  # fmt: skip


def no_removals(n_queries: int, config: LeaveKOutConfig) -> np.ndarray:
    """Empty removal sets (q, n_seeds, 0): the seed-noise floor."""
    return np.zeros((n_queries, len(config.seeds), 0), dtype=np.int64)


# --------------------------------------------------------------------------- LDS


@dataclass(frozen=True)
class LDSConfig:
    """The random subsets shared by every method and query."""

    n_subsets: int = 32
    """Number m of subsets, one retrain each (the protocol uses 32-100)."""
    fraction: float = 0.5
    """Share of units each subset keeps."""
    seed: int = 0
    """Seed of the subset draws (retrains use the model's recorded training seed)."""

    def __post_init__(self) -> None:
        if self.n_subsets < 2:
            raise ConfigError(f"LDS needs at least 2 subsets, got {self.n_subsets}.")
        if not 0.0 < self.fraction < 1.0:
            raise ConfigError(f"LDS fraction must be in (0, 1), got {self.fraction}.")


def lds_subsets(n_units: int, config: LDSConfig) -> np.ndarray:
    """Boolean masks (m, n_units) of the kept units; each keeps round(fraction·n) units."""
    rng = np.random.default_rng([config.seed, 0x1D5])
    size = max(1, round(config.fraction * n_units))
    masks = np.zeros((config.n_subsets, n_units), dtype=bool)
    for j in range(config.n_subsets):
        masks[j, rng.choice(n_units, size=size, replace=False)] = True
    return masks


def lds_losses(
    retrains: RetrainCache, masks: np.ndarray, queries: Sequence[EncodedQuery]
) -> np.ndarray:
    """Query losses (m, q) of the model retrained on each subset (recorded seed)."""
    seed = retrains.setup.config.seed
    return np.stack([retrains.query_losses(np.flatnonzero(~m), seed, queries) for m in masks])


def lds_values(masks: np.ndarray, scores: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """Per-query LDS (q,); NaN for a query whose scores are not all finite."""
    out = np.full(scores.shape[0], np.nan)
    ok = np.all(np.isfinite(scores), axis=1)
    if ok.any():
        out[ok] = lds_over_queries(masks, scores[ok], losses[:, ok])
    return out


def unscored_reason(method: Any) -> str | None:
    """Why a method leaves some units unscored (so LDS's subset sums are undefined), or None."""
    scoring = getattr(getattr(method, "opts", None), "scoring", None)
    candidates = getattr(scoring, "candidates", None)
    if candidates is None:
        return None
    return (
        f"method {method.name} with candidates={candidates!r} scores only the prefilter's "
        "candidates (the other units are NaN)"
    )


def unsigned_reason(method: Any) -> str | None:
    """Why a method's scores are not signed and additive (so LDS must refuse them), or None."""
    if getattr(method, "signed", True) is False:
        return f"method {method.name} declares unsigned scores"
    scoring = getattr(getattr(method, "opts", None), "scoring", None)
    score = getattr(scoring, "score", None)
    if score is not None and not (variant := get_variant(score)).additive:
        return f"method {method.name} uses score={score} ({variant.formula}), which is not additive"
    return None
