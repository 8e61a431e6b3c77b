"""The sweep context: one builder shared by the pipeline and the ``bgo``/``untrac-inv`` methods.

Everything the engine needs besides the queries: the base model in the perturbation and
sweep dtypes, the units to sweep, the selected parameters (+ Fisher diagonal), the
configs, and where blocks are computed (this process or Ray workers).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from bgotrace.cache import TokenCache
from bgotrace.cache.batching import TokenSource
from bgotrace.cache.trunk_cache import TrunkCache, get_trunk_cache
from bgotrace.config import PerturbConfig, ScoreConfig
from bgotrace.devices import resolve_dtype
from bgotrace.modeling.split import split_block
from bgotrace.perturb.fisher import cached_fisher
from bgotrace.perturb.params import select_parameters
from bgotrace.perturb.sensitivity import NormWorkers, UnitNormaliser
from bgotrace.score.executor import BlockExecutor, LocalExecutor, SharedExecutor
from bgotrace.score.store import RunStore

log = logging.getLogger(__name__)


@dataclass
class SweepContext:
    """Everything the engine needs besides the queries."""

    model: torch.nn.Module
    """Base model in the perturbation dtype (float32 recommended)."""
    sweep_model: torch.nn.Module
    """Base model in the sweep dtype (may be ``model`` itself)."""
    units: TokenSource
    """The units swept (the whole token cache, or a subset view of it)."""
    names: Sequence[str]
    """Names of the perturbed parameters."""
    perturb_cfg: PerturbConfig
    score_cfg: ScoreConfig
    device: torch.device
    pad_id: int
    n_units: int
    """Training units N of the corpus (the Fisher step's N), not necessarily ``len(units)``."""
    fisher: Mapping[str, torch.Tensor] | None = None
    store: RunStore | None = None
    block_executor: BlockExecutor | None = None
    """Where blocks are computed; this process when None."""
    normaliser: UnitNormaliser | None = None
    """``--normalize``'s divisors, computed on first use of :attr:`sensitivity` (None: none)."""

    trunk_cache: TrunkCache | None = None
    """Stored trunk outputs of every corpus unit (``--trunk-cache``); None: computed."""

    def close(self) -> None:
        """Release the executor's workers (a Ray executor stops what it started)."""
        close = getattr(self.block_executor, "close", None)
        if close is not None:
            close()

    @property
    def sensitivity(self) -> np.ndarray | None:
        """What each unit's score is divided by under ``--normalize`` (s(z), or s(z) + λ·M for
        ``damped``), (n_units,) over the whole cache, NaN for units not computed (outside the
        candidates); None for ``none``. Computed on first use, so on the Ray workers when the
        caller attached them first (the BGO orchestration does)."""
        if self.normaliser is None:
            return None
        workers = self.block_executor
        return self.normaliser.divisors(workers if isinstance(workers, NormWorkers) else None)

    def executor(self) -> BlockExecutor:
        if self.block_executor is None:
            rows = None if self.trunk_cache is None else self.trunk_cache.for_units(self.units)
            self.block_executor = LocalExecutor(
                self.sweep_model, self.units, self.score_cfg.batch_size, self.pad_id,
                self.device, trunk_rows=rows, batch_tokens=self.score_cfg.batch_tokens or None,
            )  # fmt: skip
        return self.block_executor

    def over(self, units: TokenSource, store: RunStore | None) -> SweepContext:
        """This context sweeping ``units`` (a subset view of the cache: a rerank group's
        candidates) into ``store``. Workers are shared, bound to the view (one executor per
        run, never one per group); a local executor is rebuilt for the view's trunk rows.
        The run closes the workers through this context, never through the view's."""
        shared = self.block_executor
        bound = shared.over(units) if isinstance(shared, SharedExecutor) else None
        return dataclasses.replace(self, units=units, store=store, block_executor=bound)

    @property
    def n_swept(self) -> int:
        """Number of units the sweep visits (``len(units)``)."""
        return len(self.units.lengths)


def build_sweep_context(
    model: torch.nn.Module,
    cache: TokenCache,
    *,
    units: TokenSource | None = None,
    perturb_cfg: PerturbConfig,
    score_cfg: ScoreConfig,
    pad_id: int,
    seed: int = 0,
    device: torch.device | None = None,
    store: RunStore | None = None,
    normalise_units: np.ndarray | None = None,
) -> SweepContext:
    """Select the parameters, estimate the Fisher if needed, and build the caches beside it.

    Blocks are computed in this process unless the caller attaches an executor (the BGO
    orchestration attaches Ray workers: :func:`bgotrace.dist.ray_executor.ray_executor_for`).

    The Fisher sample and the Fisher step's N come from the whole ``cache``; the sweep
    visits ``units`` (a subset view implementing :class:`TokenSource`), or the whole cache.
    ``normalise_units``: the corpus units whose scores ``--normalize`` divides (the
    candidates), None: every unit. The normaliser runs on first use of
    :attr:`SweepContext.sensitivity`, in the sweep dtype (:class:`UnitNormaliser`).
    """
    device = device or next(model.parameters()).device
    names = select_parameters(model, perturb_cfg.params)
    fisher = None
    if perturb_cfg.optimizer == "fisher":
        fisher = cached_fisher(
            model, cache, names, n_samples=perturb_cfg.fisher_samples, seed=seed, device=device
        )
    sweep_model = sweep_model_in(model, score_cfg.dtype)
    # Before the workers start: they are told where the validated trunk cache is.
    trunk_cache = _trunk_cache(sweep_model, cache, names, score_cfg, pad_id, device)
    normaliser = None
    if score_cfg.normalize != "none":
        normaliser = UnitNormaliser(sweep_model, cache, names, score_cfg, device, normalise_units)
    return SweepContext(
        model=model,
        sweep_model=sweep_model,
        units=cache if units is None else units,
        names=names,
        perturb_cfg=perturb_cfg,
        score_cfg=score_cfg,
        device=device,
        pad_id=pad_id,
        n_units=len(cache),
        fisher=fisher,
        store=store,
        trunk_cache=trunk_cache,
        normaliser=normaliser,
    )


def _trunk_cache(
    sweep_model: torch.nn.Module,
    cache: TokenCache,
    names: Sequence[str],
    score_cfg: ScoreConfig,
    pad_id: int,
    device: torch.device,
) -> TrunkCache | None:
    """The trunk cache of this split, validated or built here (Ray workers included: each
    then reads it by path where its node can, see ``bgotrace.dist.trunk``)."""
    if not score_cfg.trunk_cache:
        return None
    split = split_block(sweep_model, names)
    if split is None:
        log.warning("--trunk-cache unused: no split (restrict --params to blocks, e.g. last:N)")
        return None
    return get_trunk_cache(
        sweep_model, cache, split, dtype=score_cfg.trunk_cache_dtype,
        batch_size=score_cfg.batch_size, pad_id=pad_id, device=device,
    )  # fmt: skip


def sweep_model_in(model: torch.nn.Module, dtype_name: str) -> torch.nn.Module:
    """The base model in the sweep dtype (``auto``: its own); a copy only when that differs."""
    if dtype_name == "auto":
        return model
    dtype = resolve_dtype(dtype_name)
    own = next(model.parameters()).dtype
    if own == dtype:
        return model
    if dtype.itemsize > own.itemsize:  # e.g. --model-dtype bfloat16 with the default --dtype
        log.warning(
            "sweeping a %s model in %s holds a second, larger copy of its weights: pass "
            "--dtype %s to sweep the model as loaded",
            str(own).removeprefix("torch."), dtype_name, str(own).removeprefix("torch."),
        )  # fmt: skip
    else:
        log.warning(
            "sweeping in %s: perturbations smaller than its rounding step vanish; "
            "use float32 if scores look flat",
            dtype_name,
        )
    return copy.deepcopy(model).to(dtype)
