"""``bgo`` and ``untrac-inv``: BGO's engine behind the common interface (no second engine).

- ``bgo``: the configured BGO score (default bidirectional, L(z; θ−) − L(z; θ+)).
- ``untrac-inv``: ascent only, L(z; θ−) − L(z; θ0): unlearn the query by gradient ascent
  and see which units' losses rise (UnTrac-Inv, Isonuma & Titov 2024, for one query), with
  BGO's optimizer settings (Adam, lr 1e-4, 10 steps unless overridden).

Both build their sweep context with :func:`bgotrace.score.context.build_sweep_context` (as
the pipeline does) and hand the queries to :func:`bgotrace.score.engine.score_queries`; their
options are the fields of
:class:`PerturbConfig` and :class:`ScoreConfig` (``lr``, ``steps``, ``optimizer``, ``score``,
``reduce``, ``dtype``…), with ``params`` and ``batch_size`` taken from the context unless
given. Scores are in nats (per token with ``reduce=mean``); high = the unit supports the
query (its loss rises when the query is unlearned and falls when it is learned more).
With the ``candidates`` option (prefilter + rerank, :mod:`bgotrace.prefilter`) only each
query group's candidates are swept and the other units' scores are NaN.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from bgotrace.baselines.base import Attributor, MethodContext, option_names, register
from bgotrace.config import PerturbConfig, ScoreConfig, build_section
from bgotrace.errors import ConfigError
from bgotrace.perturb.sensitivity import normalized
from bgotrace.prefilter.candidates import CandidatePlan
from bgotrace.prefilter.propose import Prefilter
from bgotrace.prefilter.rerank import rerank_queries
from bgotrace.query import EncodedQuery
from bgotrace.score.context import build_sweep_context
from bgotrace.score.engine import score_queries
from bgotrace.variants import score_losses


@dataclass
class BGOOptions:
    """Options of ``bgo``: the perturbation and scoring sections of ``bgotrace attribute``."""

    perturb: PerturbConfig
    """How θ+ and θ− are made."""
    scoring: ScoreConfig
    """How the corpus sweep turns loss changes into scores."""


@register("bgo")
class BGO(Attributor):
    """BGO scores in nats, through the attribution engine."""

    fixed: ClassVar[dict[str, Any]] = {}
    """Options this method pins (untrac-inv pins the score variant)."""

    def context_defaults(self, ctx: MethodContext) -> dict[str, Any]:
        return {"params": ctx.params, "batch_size": ctx.batch_size}

    def _build_options(self, values: Mapping[str, Any]) -> BGOOptions:
        perturb_keys, score_keys = option_names(PerturbConfig), option_names(ScoreConfig)
        unknown = sorted(set(values) - set(perturb_keys) - set(score_keys))
        if unknown:
            raise ConfigError(
                f"Unknown option(s) {unknown} for method {self.name}: valid options are "
                f"{', '.join(perturb_keys + score_keys)}."
            )
        for key, value in self.fixed.items():
            if values.get(key, value) != value:
                raise ConfigError(
                    f"Method {self.name} always uses {key}={value!r}, got {values[key]!r}: "
                    f"use method bgo with {key}={values[key]!r} instead."
                )
        values = {**values, **self.fixed}
        perturb = {k: v for k, v in values.items() if k in perturb_keys}
        scoring = {k: v for k, v in values.items() if k in score_keys}
        return BGOOptions(
            perturb=build_section(PerturbConfig, perturb, f"method {self.name}"),
            scoring=build_section(ScoreConfig, scoring, f"method {self.name}"),
        )

    def _prepare(self, ctx: MethodContext) -> None:
        self.sweep = build_sweep_context(
            ctx.model,
            ctx.cache,
            perturb_cfg=self.opts.perturb,
            score_cfg=self.opts.scoring,
            pad_id=ctx.pad_id,
            seed=ctx.seed,
            device=ctx.torch_device,
        )
        self.trajectories: dict[str, dict[str, list[float]]] = {}
        self.calibrations: dict[str, dict[str, Any] | None] = {}
        """Per query id: the ``--lr auto`` search (None with a fixed lr)."""
        scoring = self.opts.scoring
        self.prefilter = None if scoring.candidates is None else Prefilter(scoring.prefilter, ctx)
        self.last_plan: CandidatePlan | None = None
        """The candidates of the last ``score`` call (None without a prefilter)."""

    def _score(self, queries: list[EncodedQuery]) -> np.ndarray:
        if self.prefilter is None:
            results = score_queries(self.sweep, queries)
        else:
            spec, size = self.opts.scoring.candidates, self.sweep.score_cfg.queries_per_sweep
            self.last_plan = self.prefilter.plan(queries, spec, group_size=size)
            results = rerank_queries(self.sweep, queries, self.last_plan)
        for r in results:  # query loss along each perturbation, for diagnostics
            self.trajectories[r.query.query.query_id] = r.trajectories
            self.calibrations[r.query.query.query_id] = r.calibration
        scores = np.stack([score_losses(self.opts.scoring.score, r.losses) for r in results])
        return normalized(scores, self.sweep.sensitivity)


@register("untrac-inv")
class UnTracInv(BGO):
    """Ascent-only BGO, L(z; θ−) − L(z; θ0) in nats: UnTrac-Inv for one query."""

    fixed: ClassVar[dict[str, Any]] = {"score": "ascent"}
