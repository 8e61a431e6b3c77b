"""The one BGO path: perturb each query group, sweep the corpus, score, keep what is shown.

Every perturbation method runs through :func:`run_bgo`: ``bgotrace attribute``
(:mod:`bgotrace.pipeline`) and the ``bgo``/``untrac-inv`` attributors of ``bgotrace eval`` and
``bench`` alike, so every perturbation, scoring and execution option reaches each of them,
they resume from a run store, record loss trajectories and close the workers they start.

Per group of ``--queries-per-sweep`` queries (a query and its spans stay in one group):

1. the method's group step makes the group's states and their per-unit losses over the
   swept units (every unit, or with ``--candidates`` the group's candidates only);
2. each query's scores: the method's raw score of its losses, ``--normalize``-d;
3. the per-token loss changes of each query's top units, under the group's states;
4. the states are dropped, so peak memory depends on ``--queries-per-sweep``, not on the
   number of queries.

Plugging in a perturbation method (``bgo-linear``, say): register a
:class:`PerturbationMethod` with :func:`register_method` and add its name to
``config.METHODS``. Its ``score_group`` makes a group's states (the directions the score
variant needs, ``STATES_NEEDED``; :func:`bgotrace.score.engine.perturb_checked` makes and
resume-checks them) and turns them into per-unit numbers keyed by state
(:class:`QueryLosses`: ``losses``, ``counts``, and the ``states`` the top-token step reads);
its ``unit_scores`` turns one query's numbers into one raw score per unit (default: the
score variant); ``pinned`` names the options it fixes (``untrac-inv``: ``score: ascent``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from bgotrace.cache import TokenCache
from bgotrace.config import AttributeConfig, ExecutionConfig, PerturbConfig, ScoreConfig
from bgotrace.dist.ray_executor import ray_executor_for
from bgotrace.errors import ConfigError, InputError
from bgotrace.modeling.split import log_once
from bgotrace.perturb.sensitivity import normalized, score_divisors
from bgotrace.query import EncodedQuery
from bgotrace.ranking.tokens import top_token_changes, top_units
from bgotrace.score.context import SweepContext, build_sweep_context
from bgotrace.score.engine import QueryLosses, check_split_once, score_group
from bgotrace.score.linear import group_linearity, linear_group, linear_unit_scores
from bgotrace.score.store import RunStore
from bgotrace.score.subset import SubsetUnits, scatter
from bgotrace.spans import group_size_for
from bgotrace.variants import score_losses

GroupStep = Callable[[SweepContext, int, Sequence[EncodedQuery]], list[QueryLosses]]
"""(context, group index, the group's queries) → per query: numbers by state over
``ctx.units`` and the states themselves."""

RERANK_DIR = "rerank"
"""Run-store folder of the candidate groups' own stores (``RUN/rerank/gNNN/``)."""


@dataclass(frozen=True)
class PerturbationMethod:
    """A method that perturbs the model per query and evaluates the corpus under the states."""

    name: str
    """Its ``--method`` name."""
    score_group: GroupStep = score_group
    """Makes a group's states and evaluates them over the swept units (BGO: perturb + sweep)."""
    unit_scores: Callable[[str, dict[str, np.ndarray]], np.ndarray] = score_losses
    """(score variant, one query's numbers by state) → raw per-unit scores."""
    pinned: Mapping[str, Any] = field(default_factory=dict)
    """Perturbation/scoring options the method always uses; another value is an error."""


_METHODS: dict[str, PerturbationMethod] = {}


def register_method(method: PerturbationMethod) -> PerturbationMethod:
    """Make ``method`` runnable by :func:`run_bgo` (and ``--method``) under its name."""
    if method.name in _METHODS:
        raise ValueError(f"perturbation method {method.name!r} is registered twice")
    _METHODS[method.name] = method
    return method


register_method(PerturbationMethod("bgo"))
register_method(PerturbationMethod("untrac-inv", pinned={"score": "ascent"}))
register_method(  # BGO's exact first-order control (score/linear.py)
    PerturbationMethod("bgo-linear", score_group=linear_group, unit_scores=linear_unit_scores)
)


def perturbation_method(name: str) -> PerturbationMethod | None:
    """The registered perturbation method ``name`` (None: a baseline)."""
    return _METHODS.get(name)


# --------------------------------------------------------------------------- options

EVERY_METHOD_USES = frozenset({"params", "batch_size", "device", "device_memory"})
"""Options of those sections that a baseline reads too (gradient methods' parameters, the
batch size, the device and the memory the run must fit in)."""
SWEEP_SECTIONS = ("perturb", "scoring", "execution")
"""Config sections that only perturbation methods read (besides ``EVERY_METHOD_USES``)."""


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resolve_method(config: AttributeConfig) -> AttributeConfig:
    """``config`` with its method's pinned options set; refuses options the method ignores.

    An option counts as given when it differs from its field's default (a replayed
    ``config.yaml`` records every field). A baseline ignores the perturbation and scoring
    options but ``params`` and ``batch_size``; ``untrac-inv`` pins ``score: ascent``.
    """
    method = perturbation_method(config.method)
    if method is None:
        _refuse_sweep_options(config)
        return config
    for key, value in method.pinned.items():
        config = _pin(config, method.name, key, value)
    return config


def _refuse_sweep_options(config: AttributeConfig) -> None:
    for name in SWEEP_SECTIONS:
        section = getattr(config, name, None)
        for f in dataclasses.fields(section) if section is not None else ():
            value = getattr(section, f.name)
            if f.name not in EVERY_METHOD_USES and value != _default(f):
                raise ConfigError(
                    f"{_flag(f.name)} {value} has no effect with --method {config.method} (only "
                    f"the perturbation methods {', '.join(_METHODS)} read it): drop "
                    f"{_flag(f.name)}, or use --method bgo."
                )


def _pin(config: AttributeConfig, method: str, key: str, value: Any) -> AttributeConfig:
    """``config`` with ``key`` (a perturb or scoring option) set to ``value``."""
    for name in ("perturb", "scoring"):
        section = getattr(config, name)
        fields = {f.name: f for f in dataclasses.fields(section)}
        if key not in fields:
            continue
        given, flag = getattr(section, key), _flag(key)
        if given not in (value, _default(fields[key])):
            raise ConfigError(
                f"{flag} {given} has no effect with --method {method}, which always uses "
                f"{flag} {value}: drop {flag}, or use --method bgo {flag} {given}."
            )
        return dataclasses.replace(config, **{name: dataclasses.replace(section, **{key: value})})
    raise ValueError(f"pinned option {key!r} of method {method} is in no config section")


# --------------------------------------------------------------------------- the run


class CandidateGroups(Protocol):
    """The units each query group sweeps (``bgotrace.prefilter.CandidatePlan``)."""

    @property
    def group_size(self) -> int: ...

    @property
    def groups(self) -> tuple[np.ndarray, ...]: ...

    def mask(self, group: int) -> np.ndarray: ...

    def fingerprint(self, group: int) -> dict[str, Any]: ...

    def summary(self) -> dict[str, Any]: ...


@dataclass
class SweepInputs:
    """What the sweep context is built from (:func:`build_sweep_context`)."""

    model: torch.nn.Module
    """Base model (float32 recommended); never written."""
    cache: TokenCache
    """Token cache of the training units; scores come in its unit order."""
    perturb: PerturbConfig
    scoring: ScoreConfig
    pad_id: int
    seed: int = 0
    """Seed of the Fisher sample."""
    device: torch.device | None = None
    """Where to compute; the model's device when None."""
    execution: ExecutionConfig | None = None
    """Ray workers sharing the sweep (None: this process only)."""


@dataclass
class QueryScores:
    """One query's result: scores of every unit and what explains them."""

    query: EncodedQuery
    scores: np.ndarray
    """(n_units,) the method's score of each unit, ``--normalize``-d; NaN where not swept."""
    losses: dict[str, np.ndarray]
    """State → (n_units,) reduced loss (NaN where not swept)."""
    counts: np.ndarray
    """(n_units,) predicted tokens per unit."""
    candidate: np.ndarray | None
    """(n_units,) bool: the units swept (None: every unit)."""
    trajectories: dict[str, list[float]]
    """Direction → query loss along the perturbation (nats)."""
    calibration: dict[str, Any] | None
    """The ``--lr auto`` search (None with a fixed lr)."""
    top_tokens: list[dict[str, Any]]
    """Per-token loss changes of the top units (:func:`top_token_changes` rows)."""
    linearity: dict[str, Any] | None = None
    """Agreement of the scores with their first-order control on a unit sample
    (:func:`bgotrace.score.linear.group_linearity`); None when off or not applicable."""


@dataclass
class BGORun:
    """Every query's scores and the run's details for ``summary.json``."""

    queries: list[QueryScores]
    details: dict[str, Any]
    """Device, perturbed tensors and parameters, the prefilter's summary."""


@dataclass
class _TopTokens:
    """What the top-token step needs besides a query's losses."""

    k: int
    tokenizer: PreTrainedTokenizerBase | None
    unit_ids: np.ndarray
    divisors: np.ndarray | None


def run_bgo(
    inputs: SweepInputs,
    queries: Sequence[EncodedQuery],
    *,
    method: str = "bgo",
    store: RunStore | None = None,
    plan: CandidateGroups | None = None,
    top_tokens: int = 0,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> BGORun:
    """Score ``queries`` with perturbation method ``method``; close what it starts.

    ``store``: a run directory to resume from and write the sweep's shards to; ``plan``:
    each group's candidate units (prefilter + rerank); ``top_tokens``: top units per query
    whose per-token changes are kept (needs ``tokenizer``).
    """
    spec = _METHODS[method]
    _check_pinned(spec, inputs)
    ctx = _sweep_context(inputs, queries, store, plan)
    top = _top_tokens_of(ctx, inputs.cache, top_tokens, tokenizer)
    scored: list[QueryScores] = []
    try:
        for g, losses in enumerate(group_losses(ctx, queries, spec, plan)):
            # The group's states go here, before the next group is perturbed.
            scored += _finish_group(ctx, spec, losses, None if plan is None else plan.mask(g), top)
    finally:
        ctx.close()  # stop the Ray workers (and a Ray this run started), also on errors
    return BGORun(scored, _details(ctx, inputs.model, plan))


def _check_pinned(method: PerturbationMethod, inputs: SweepInputs) -> None:
    """The options a method pins are set (callers resolve them: :func:`resolve_method`)."""
    for key, value in method.pinned.items():
        for section in (inputs.perturb, inputs.scoring):
            if getattr(section, key, value) != value:
                raise ValueError(f"method {method.name} runs with {key}={value!r} only")


def _sweep_context(
    inputs: SweepInputs,
    queries: Sequence[EncodedQuery],
    store: RunStore | None,
    plan: CandidateGroups | None = None,
) -> SweepContext:
    if store is not None:  # shards on disk belong to one corpus
        store.check_state("cache", inputs.cache.manifest.get("corpus_fingerprint"))
    # A query and its spans are perturbed states of one sweep: keep them in one group.
    per_sweep = group_size_for(queries, inputs.scoring.queries_per_sweep)
    ctx = build_sweep_context(
        inputs.model, inputs.cache,
        perturb_cfg=inputs.perturb,
        score_cfg=dataclasses.replace(inputs.scoring, queries_per_sweep=per_sweep),
        pad_id=inputs.pad_id, seed=inputs.seed, device=inputs.device, store=store,
        normalise_units=None if plan is None else _candidates_of(plan),
    )  # fmt: skip
    # Attached before the normaliser's first use: its blocks go to the same workers.
    ctx.block_executor = ray_executor_for(ctx, inputs.cache, inputs.execution or ExecutionConfig())
    return ctx


def _candidates_of(plan: CandidateGroups) -> np.ndarray:
    """Every unit some query group reranks (the units ``--normalize`` divides)."""
    return np.unique(np.concatenate([np.zeros(0, dtype=np.int64), *plan.groups]))


def group_losses(
    ctx: SweepContext,
    queries: Sequence[EncodedQuery],
    method: PerturbationMethod,
    plan: CandidateGroups | None = None,
) -> Iterator[list[QueryLosses]]:
    """Per query group, in order: each query's numbers by state over the whole corpus (NaN
    outside the group's candidates with a ``plan``) and the group's states."""
    size = ctx.score_cfg.queries_per_sweep
    if plan is not None and plan.group_size != size:
        raise ValueError("the candidate plan was grouped differently from the sweep")
    if plan is None:
        check_split_once(ctx)
    for g, start in enumerate(range(0, len(queries), size)):
        group = queries[start : start + size]
        yield (
            method.score_group(ctx, g, group)
            if plan is None
            else _rerank_group(ctx, method, plan, g, group)
        )


def _rerank_group(
    ctx: SweepContext,
    method: PerturbationMethod,
    plan: CandidateGroups,
    g: int,
    group: Sequence[EncodedQuery],
) -> list[QueryLosses]:
    """Group ``g`` swept over its candidates only, into its own store: on the run's Ray
    workers when it has them (the same executor, bound to the view), else in this process."""
    view = SubsetUnits(ctx.units, plan.groups[g])
    sub = ctx.over(view, _group_store(ctx.store, plan, g))
    check_split_once(sub)
    return [scatter(r, view.indices, ctx.units) for r in method.score_group(sub, 0, group)]


def _group_store(store: RunStore | None, plan: CandidateGroups, g: int) -> RunStore | None:
    """Group ``g``'s own resumable store, after recording its candidate set in the run's
    (a resumed run with other candidates is refused)."""
    if store is None:
        return None
    store.check_state(f"candidates{g:03d}", plan.fingerprint(g))
    root = store.root / RERANK_DIR / f"g{g:03d}"
    root.mkdir(parents=True, exist_ok=True)
    return RunStore(root)


def _finish_group(
    ctx: SweepContext,
    method: PerturbationMethod,
    losses: list[QueryLosses],
    candidate: np.ndarray | None,
    top: _TopTokens,
) -> list[QueryScores]:
    """Scores, first-order checks and top-token changes of a group's queries; then their
    states are released."""
    scores = [normalized(method.unit_scores(ctx.score_cfg.score, r.losses), ctx.sensitivity)
              for r in losses]  # fmt: skip
    checks = _linearity(ctx, method, losses, scores, candidate)
    out = []
    for r, s, check in zip(losses, scores, checks, strict=True):
        tokens = _top_token_rows(ctx, r, s, candidate, top) if top.k else []
        out.append(
            QueryScores(r.query, s, r.losses, r.counts, candidate, r.trajectories,
                        r.calibration, tokens, check)
        )  # fmt: skip
    for r in losses:
        r.states = {}  # a reference left elsewhere (the loop's last item) holds no state
    return out


def _linearity(
    ctx: SweepContext,
    method: PerturbationMethod,
    losses: list[QueryLosses],
    scores: list[np.ndarray],
    candidate: np.ndarray | None,
) -> list[dict[str, Any] | None]:
    """Did the finite steps change the answer? Per query, Spearman and top-10 overlap of the
    scores with the first-order control on a unit sample (one pass for the group), while
    the group's states are still alive. Off for ``bgo-linear`` itself and for reranked
    groups (their scores cover the candidates)."""
    if method.name == "bgo-linear" or candidate is not None:
        return [None for _ in losses]
    try:
        return group_linearity(ctx, losses, scores)
    except InputError as err:  # no forward mode through this model (e.g. fused MoE experts)
        log_once("first-order check skipped: %s", str(err).split(" (")[0])
        return [None for _ in losses]


def _top_tokens_of(
    ctx: SweepContext, cache: TokenCache, k: int, tokenizer: PreTrainedTokenizerBase | None
) -> _TopTokens:
    if k and tokenizer is None:
        raise ValueError("top-token changes need the tokenizer")
    divisors = None if ctx.sensitivity is None else score_divisors(ctx.sensitivity)
    ids = cache.units["unit_id"].to_numpy() if k else np.zeros(0, dtype=object)
    return _TopTokens(k, tokenizer, ids, divisors)


def _top_token_rows(
    ctx: SweepContext,
    result: QueryLosses,
    scores: np.ndarray,
    candidate: np.ndarray | None,
    top: _TopTokens,
) -> list[dict[str, Any]]:
    assert top.tokenizer is not None  # checked in _top_tokens_of
    return top_token_changes(
        ctx.sweep_model, ctx.units, top.tokenizer, result,
        top_units(scores, top.k, candidate, top.unit_ids),
        variant=ctx.score_cfg.score, device=ctx.device, divisors=top.divisors,
    )  # fmt: skip


def _details(
    ctx: SweepContext, model: torch.nn.Module, plan: CandidateGroups | None
) -> dict[str, Any]:
    params = dict(model.named_parameters())
    details: dict[str, Any] = {
        "device": str(ctx.device),
        "perturbed_tensors": len(ctx.names),
        "perturbed_parameters": int(sum(params[n].numel() for n in ctx.names)),
    }
    if plan is not None:
        details["prefilter"] = plan.summary()
    return details
