"""The five metric families run over every method's scores, filling a :class:`Collector`.

Each family gets the queries eligible for it (indices into the selected queries) and each
method's score matrix (q, n_units); what a family shares across methods is computed once:
the tail-patch deltas of a unit (memoised by :class:`TailPatcher`), the random-k and
no-removal retrains of leave-k-out, and LDS's subset retrains (all cached on disk by
:class:`RetrainCache`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bgotrace.baselines import MethodContext
from bgotrace.eval import influence as inf
from bgotrace.eval.collect import Collector
from bgotrace.eval.hubs import hub_diagnostics, query_group, spearman_rows
from bgotrace.eval.metrics import MetricSummary
from bgotrace.eval.ranking_metrics import fact_tracing, source_attribution
from bgotrace.eval.reference_form import relative_change_percent
from bgotrace.eval.retrain import RetrainCache, TrainingSetup
from bgotrace.query import EncodedQuery
from bgotrace.score.sweep import unit_loss_sums


@dataclass
class EvalInputs:
    """Model-side inputs shared by every method and metric."""

    model: Any
    tokenizer: Any
    setup: TrainingSetup
    ctx: MethodContext
    queries: list[EncodedQuery]
    """Encoded selected queries, in the order of ``records``."""
    records: list[dict]
    """The selected benchmark query records."""
    retrain_root: Path
    """Where retrained models are cached (``<benchmark>/retrains``)."""

    @property
    def query_ids(self) -> list[str]:
        return [str(r["id"]) for r in self.records]


@dataclass(frozen=True)
class FamilySettings:
    """The per-family settings of :class:`bgotrace.eval.runner.EvalOptions`."""

    doc_reduce: str
    tail_patch: inf.TailPatchConfig
    leave_k_out: inf.LeaveKOutConfig
    lds: inf.LDSConfig
    progress: bool = False


def round_robin(records: list[dict], n: int | None) -> list[dict]:
    """At most n records, taking query kinds in turn (by id within a kind), input order kept."""
    if n is None or n >= len(records):
        return records
    by_kind: dict[str, list[dict]] = {}
    for r in sorted(records, key=lambda r: str(r["id"])):
        by_kind.setdefault(str(r.get("kind", "")), []).append(r)
    queues = [by_kind[k] for k in sorted(by_kind)]
    picked = [q[i] for i in range(max(map(len, queues))) for q in queues if i < len(q)]
    chosen = {id(r) for r in picked[:n]}
    return [r for r in records if id(r) in chosen]


def run_families(
    metrics: Sequence[str],
    eligible: Mapping[str, list[int]],
    inputs: EvalInputs,
    scores: Mapping[str, np.ndarray],
    settings: FamilySettings,
    collector: Collector,
) -> dict[str, float]:
    """Compute each requested family for every method; returns wall seconds per family
    (and ``retrains_trained``, the retrains this call had to run)."""
    seconds: dict[str, float] = {}
    retrains = None
    if "leave-k-out" in metrics or "lds" in metrics:
        units = inputs.ctx.cache.units
        retrains = RetrainCache(
            inputs.retrain_root, inputs.setup, inputs.tokenizer, units["unit_id"].tolist(),
            units["source"].tolist(), progress=settings.progress,
        )  # fmt: skip
    for metric in metrics:
        t0 = time.perf_counter()
        idx = eligible[metric]
        if metric in ("fact", "source"):
            ranking(metric, idx, inputs, scores, settings, collector)
        elif metric == "tail-patch":
            tail_patch(idx, inputs, scores, settings, collector)
        elif metric == "hubs":
            hubs(idx, inputs, scores, collector)
        elif metric == "leave-k-out":
            assert retrains is not None
            kind = settings.leave_k_out.query_kind
            pool = [
                inputs.records[i]
                for i in idx
                if kind is None or inputs.records[i].get("kind") == kind
            ]
            chosen = {id(r) for r in round_robin(pool, settings.leave_k_out.max_queries)}
            lko_idx = [i for i in idx if id(inputs.records[i]) in chosen]
            leave_k_out(lko_idx, inputs, scores, retrains, settings, collector)
        else:
            assert retrains is not None
            lds(idx, inputs, scores, retrains, settings, collector)
        seconds[metric] = round(time.perf_counter() - t0, 3)
    if retrains is not None:
        seconds["retrains_trained"] = retrains.trained
    return seconds


def ranking(
    metric: str,
    idx: list[int],
    inputs: EvalInputs,
    scores: Mapping[str, np.ndarray],
    settings: FamilySettings,
    collector: Collector,
) -> None:
    """Fact tracing or source attribution of every method (pure, no model needed)."""
    units = inputs.ctx.cache.units
    records = [inputs.records[i] for i in idx]
    for method, s in scores.items():
        if metric == "fact":
            table = fact_tracing(s[idx], units, records, reduce=settings.doc_reduce)
        else:
            table = source_attribution(s[idx], units, records)
        collector.add_long(metric, method, table)


def tail_patch(
    idx: list[int],
    inputs: EvalInputs,
    scores: Mapping[str, np.ndarray],
    settings: FamilySettings,
    collector: Collector,
) -> None:
    """Tail-patch rows of every method, then the random-k control (method-independent)."""
    cfg = settings.tail_patch
    adam = None
    if cfg.optimizer == "adam":
        names = [n for n, _ in inputs.model.named_parameters()]
        path = inputs.setup.model_dir / "optimizer_state.safetensors"
        adam = inf.load_adam_state(path, names, inputs.ctx.torch_device)
    queries = [inputs.queries[i] for i in idx]
    patcher = inf.TailPatcher(inputs.model, inputs.ctx.cache, queries, cfg, adam)
    qids = [inputs.query_ids[i] for i in idx]
    results = inf.tail_patch(patcher, {m: s[idx] for m, s in scores.items()}, qids)
    for method, result in results.items():
        for k in cfg.ks:
            top, rand = result.topk[:, :k].mean(1), result.random[:, :k].mean(1)
            summary = result.summary(k).difference
            collector.add("tail-patch", method, f"tail_patch@{k}", qids, top, unit="nats")
            name = f"tail_patch_vs_random@{k}"
            collector.add(
                "tail-patch", method, name, qids, top - rand, unit="nats", summary=summary
            )
    control = next(iter(results.values())).random  # the same for every method: one row
    for k in cfg.ks:
        mean = control[:, :k].mean(1)
        collector.add("tail-patch", "random-k", f"tail_patch@{k}", qids, mean, unit="nats")
    if cfg.reference and cfg.optimizer != "adamw-fresh":
        reference_tail_patch(queries, qids, inputs, scores, idx, cfg, collector)


def reference_tail_patch(
    queries: list[EncodedQuery],
    qids: list[str],
    inputs: EvalInputs,
    scores: Mapping[str, np.ndarray],
    idx: list[int],
    cfg: inf.TailPatchConfig,
    collector: Collector,
) -> None:
    """``tail_patch_ref@k``: the reference scripts' |Δp|/p × 100 (one fresh AdamW step)."""
    ref_cfg = inf.TailPatchConfig(ks=cfg.ks, optimizer="adamw-fresh", seed=cfg.seed)
    patcher = inf.TailPatcher(inputs.model, inputs.ctx.cache, queries, ref_cfg)
    results = inf.tail_patch(patcher, {m: s[idx] for m, s in scores.items()}, qids)
    unit = "% |Δp|/p"
    for method, result in results.items():
        top, rand = relative_change_percent(result.topk), relative_change_percent(result.random)
        for k in cfg.ks:
            name = f"tail_patch_ref@{k}"
            collector.add("tail-patch", method, name, qids, top[:, :k].mean(1), unit=unit)
    rand = relative_change_percent(next(iter(results.values())).random)
    for k in cfg.ks:
        mean = rand[:, :k].mean(1)
        collector.add("tail-patch", "random-k", f"tail_patch_ref@{k}", qids, mean, unit=unit)


def hubs(
    idx: list[int],
    inputs: EvalInputs,
    scores: Mapping[str, np.ndarray],
    collector: Collector,
) -> None:
    """Hub diagnostic of every method (:mod:`bgotrace.eval.hubs`); no ground truth needed."""
    cache, ctx = inputs.ctx.cache, inputs.ctx
    sums, counts = unit_loss_sums(
        inputs.model, cache, np.arange(len(cache)), [None],
        batch_size=ctx.batch_size, pad_id=ctx.pad_id, device=ctx.torch_device,
    )  # fmt: skip
    base_loss = sums[0] / np.maximum(counts, 1)  # θ0 mean token loss per unit
    groups = [query_group(inputs.records[i]) for i in idx]
    qids = [inputs.query_ids[i] for i in idx]
    one = f"one value over {len(set(groups))} query groups"
    for method, s in scores.items():
        diag = hub_diagnostics(s[idx], groups, cache.lengths, base_loss)
        for name, unit in (("hub_share", "fraction of groups"), ("hub_units", "units")):
            value = diag[name]  # one number for the whole query set: no interval (lo = hi)
            summary = MetricSummary(value, value, value, len(set(groups)))
            collector.add_summary("hubs", method, name, summary, interval=one, unit=unit)
        for name, values in (("corr_length", cache.lengths), ("corr_base_loss", base_loss)):
            rhos = spearman_rows(s[idx], values.astype(np.float64))
            collector.add("hubs", method, name, qids, rhos, unit="Spearman ρ")


def leave_k_out(
    idx: list[int],
    inputs: EvalInputs,
    scores: Mapping[str, np.ndarray],
    retrains: RetrainCache,
    settings: FamilySettings,
    collector: Collector,
) -> None:
    """Leave-k-out rows: each method's top-k beside random-k and no removal, paired seeds."""
    cfg = settings.leave_k_out
    queries = [inputs.queries[i] for i in idx]
    qids = [inputs.query_ids[i] for i in idx]
    n_units = len(inputs.ctx.cache)
    full = inf.removal_losses(retrains, queries, inf.no_removals(len(idx), cfg), cfg.seeds)
    random_sets = inf.random_k_removals(n_units, qids, cfg)
    random = inf.removal_losses(retrains, queries, random_sets, cfg.seeds)
    for method, s in scores.items():
        removed = inf.top_k_removals(s[idx], qids, cfg)
        top = inf.removal_losses(retrains, queries, removed, cfg.seeds)
        collector.add_leave_k_out(method, qids, top, random, full)
    collector.add_leave_k_out_controls(qids, random, full)


def lds(
    idx: list[int],
    inputs: EvalInputs,
    scores: Mapping[str, np.ndarray],
    retrains: RetrainCache,
    settings: FamilySettings,
    collector: Collector,
) -> None:
    """LDS of every method over subset retrains shared by all methods and queries."""
    masks = inf.lds_subsets(len(inputs.ctx.cache), settings.lds)
    queries = [inputs.queries[i] for i in idx]
    losses = inf.lds_losses(retrains, masks, queries)  # (m, q)
    qids = [inputs.query_ids[i] for i in idx]
    for method, s in scores.items():
        collector.add("lds", method, "lds", qids, inf.lds_values(masks, s[idx], losses))
