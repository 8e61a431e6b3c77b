"""``bgo`` and ``untrac-inv``: the one BGO path behind the common interface (no second engine).

- ``bgo``: the configured BGO score (default bidirectional, L(z; θ−) − L(z; θ+)).
- ``untrac-inv``: ascent only, L(z; θ−) − L(z; θ0): unlearn the query by gradient ascent
  and see which units' losses rise (UnTrac-Inv, Isonuma & Titov 2024, for one query), with
  BGO's optimizer settings (Adam, lr 1e-4, 10 steps unless overridden).

Both score through :func:`bgotrace.bgo.run_bgo`, exactly as ``bgotrace attribute`` does: their
options are the fields of :class:`PerturbConfig`, :class:`ScoreConfig` and
:class:`ExecutionConfig` (``lr``, ``steps``, ``optimizer``, ``score``, ``reduce``, ``dtype``,
``workers``…; the device is the context's), with ``params`` and ``batch_size`` taken from the
context unless given. Each ``score`` call closes the workers it starts; with
:meth:`BGO.resume_from` it writes (and resumes from) a run store's shards. Scores are in nats
(per token with ``reduce=mean``); high = the unit supports the query (its loss rises when
the query is unlearned and falls when it is learned more). With the ``candidates`` option
(prefilter + rerank) only each query group's candidates are swept and the other units'
scores are NaN.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from bgotrace.baselines.base import Attributor, MethodContext, get_attributor, option_names
from bgotrace.baselines.base import register as register_attributor
from bgotrace.bgo import SweepInputs, perturbation_method, run_bgo
from bgotrace.config import ExecutionConfig, PerturbConfig, ScoreConfig, build_section
from bgotrace.errors import ConfigError
from bgotrace.perturb.params import select_parameters
from bgotrace.query import EncodedQuery
from bgotrace.ranking.candidates import CandidatePlan, plan_from_scores
from bgotrace.score.store import RunStore
from bgotrace.spans import group_size_for

T = TypeVar("T")


@dataclass
class BGOOptions:
    """Options of ``bgo``: the perturbation, scoring and execution sections of ``attribute``."""

    perturb: PerturbConfig
    """How θ+ and θ− are made."""
    scoring: ScoreConfig
    """How the corpus sweep turns loss changes into scores."""
    execution: ExecutionConfig
    """Ray workers sharing the sweep (the device is the context's)."""


def _option_sections() -> dict[str, list[str]]:
    execution = [n for n in option_names(ExecutionConfig) if n != "device"]
    return {
        "perturb": option_names(PerturbConfig),
        "scoring": option_names(ScoreConfig),
        "execution": execution,
    }


@register_attributor("bgo")
class BGO(Attributor):
    """BGO scores in nats, through the one BGO path."""

    store: RunStore | None = None
    """Run store the sweep writes its shards to and resumes from (:meth:`resume_from`)."""

    def context_defaults(self, ctx: MethodContext) -> dict[str, Any]:
        return {"params": ctx.params, "batch_size": ctx.batch_size}

    def resume_from(self, store: RunStore | None) -> None:
        """Write the sweep's shards to ``store`` and reuse those an interrupted call left."""
        self.store = store

    def _build_options(self, values: Mapping[str, Any]) -> BGOOptions:
        sections = _option_sections()
        unknown = sorted(set(values) - {k for keys in sections.values() for k in keys})
        if unknown:
            valid = ", ".join(k for keys in sections.values() for k in keys)
            raise ConfigError(
                f"Unknown option(s) {unknown} for method {self.name}: valid options are {valid}."
            )
        pinned = self._pinned()
        for key, value in pinned.items():
            if values.get(key, value) != value:
                raise ConfigError(
                    f"Method {self.name} always uses {key}={value!r}, got {values[key]!r}: "
                    f"use method bgo with {key}={values[key]!r} instead."
                )
        values = {**values, **pinned}

        def section(cls: type[T], name: str) -> T:
            given = {k: v for k, v in values.items() if k in sections[name]}
            return build_section(cls, given, f"method {self.name}")

        return BGOOptions(
            section(PerturbConfig, "perturb"),
            section(ScoreConfig, "scoring"),
            section(ExecutionConfig, "execution"),
        )

    def _pinned(self) -> Mapping[str, Any]:
        method = perturbation_method(self.name)
        assert method is not None  # every BGO attributor is a registered perturbation method
        return method.pinned

    def _prepare(self, ctx: MethodContext) -> None:
        select_parameters(ctx.model, self.opts.perturb.params)  # a bad selection fails now
        self.trajectories: dict[str, dict[str, list[float]]] = {}
        self.calibrations: dict[str, dict[str, Any] | None] = {}
        """Per query id: the ``--lr auto`` search (None with a fixed lr)."""
        self.proposer = self._proposer(ctx)
        self.last_plan: CandidatePlan | None = None
        """The candidates of the last ``score`` call (None without a prefilter)."""

    def _proposer(self, ctx: MethodContext) -> Attributor | None:
        """The prefilter method, prepared (None without the ``candidates`` option)."""
        if self.opts.scoring.candidates is None:
            return None
        proposer = get_attributor(self.opts.scoring.prefilter)
        proposer.prepare(ctx)
        return proposer

    def _score(self, queries: list[EncodedQuery]) -> np.ndarray:
        ctx = self._prepared()
        opts = self.opts
        self.last_plan = None if self.proposer is None else self._plan(queries)
        inputs = SweepInputs(
            ctx.model, ctx.cache, opts.perturb, opts.scoring, ctx.pad_id, seed=ctx.seed,
            device=ctx.torch_device, execution=opts.execution,
        )  # fmt: skip
        run = run_bgo(inputs, queries, method=self.name, store=self.store, plan=self.last_plan)
        for r in run.queries:  # query loss along each perturbation, for diagnostics
            self.trajectories[r.query.query.query_id] = r.trajectories
            self.calibrations[r.query.query.query_id] = r.calibration
        return np.stack([r.scores for r in run.queries])

    def _plan(self, queries: list[EncodedQuery]) -> CandidatePlan:
        assert self.proposer is not None
        scoring = self.opts.scoring
        assert scoring.candidates is not None
        return plan_from_scores(
            self.proposer.score(queries), queries, prefilter=scoring.prefilter,
            spec=scoring.candidates,
            group_size=group_size_for(queries, scoring.queries_per_sweep),
        )  # fmt: skip


@register_attributor("untrac-inv")
class UnTracInv(BGO):
    """Ascent-only BGO, L(z; θ−) − L(z; θ0) in nats: UnTrac-Inv for one query."""
