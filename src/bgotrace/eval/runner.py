"""``run_eval``: every requested method × metric on a benchmark, written as tables and a plot.

Python (CPU; a tiny benchmark and model run in seconds)::

    from bgotrace.eval.runner import run_eval
    run_eval("bench/default", "bench/default/model", ["bgo", "bm25"], ["fact", "source"],
             split="test", out="runs/eval")

CLI: ``bgotrace eval --bench DIR --model DIR --methods bgo,bm25 --metrics fact,lds --out DIR``.

Order: names and options checked → benchmark loaded (other versions refused) → queries of
the split selected and checked against the ground truth each metric needs → model, token
cache (the chunking the model was trained with, from its ``train_config.json``) → each
method prepared once and scores all queries → metrics → ``results.csv``, ``results.md``,
``per_query.parquet``, ``results.png``, ``scores.npz`` and ``eval.json`` (command, seeds,
options, wall times) in ``out`` (see :mod:`bgotrace.eval.report`).
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bgotrace import __version__
from bgotrace.baselines import Attributor, MethodContext, available_methods, get_attributor
from bgotrace.cache import get_token_cache, tokenizer_fingerprint
from bgotrace.cache.fingerprint import canonical_json, sha256_text
from bgotrace.config import build_section
from bgotrace.errors import ConfigError, InputError
from bgotrace.eval import influence as inf
from bgotrace.eval.benchmark import Benchmark, load_benchmark
from bgotrace.eval.collect import Collector
from bgotrace.eval.families import EvalInputs, FamilySettings, round_robin, run_families
from bgotrace.eval.ranking_metrics import DOC_REDUCTIONS
from bgotrace.eval.report import check_out_dir, write_outputs
from bgotrace.eval.retrain import TrainingSetup, read_training_setup
from bgotrace.modeling.loading import context_length, load_model_and_tokenizer
from bgotrace.query import EncodedQuery, Query, encode_query

log = logging.getLogger(__name__)

METRICS = ("fact", "source", "tail-patch", "leave-k-out", "lds", "hubs")
SPLITS = ("validation", "test", "all")
NEEDS = {
    "fact": "fact queries with 'relevant_doc_ids'",
    "source": "style queries (kind 'style') with a 'true_source'",
}


@dataclass
class EvalOptions:
    """Everything about an evaluation besides what is evaluated (saved in ``eval.json``)."""

    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Options per method name, e.g. ``{"bgo": {"lr": 1e-3}}``."""
    method_seed: int = 0
    """Seed of the methods' random choices (random scores, projections, Fisher sample)."""
    device: str = "cpu"
    """Device of the model, the methods and tail-patch: cpu | cuda[:N] | auto."""
    retrain_device: str | None = None
    """Device of retrains; None = the one recorded in the model's train_config.json."""
    params: str = "all"
    """Parameters the gradient methods and BGO use: all | last:N | regex:PATTERN."""
    batch_size: int = 16
    """Units per forward pass in methods that batch units."""
    doc_reduce: str = "max"
    """Unit → document aggregation for fact tracing: max | sum."""
    max_queries: int | None = None
    """Use at most this many queries of the split (round-robin over kinds); None = all."""
    tail_patch: inf.TailPatchConfig = field(default_factory=inf.TailPatchConfig)
    leave_k_out: inf.LeaveKOutConfig = field(default_factory=inf.LeaveKOutConfig)
    lds: inf.LDSConfig = field(default_factory=inf.LDSConfig)
    progress: bool = False
    """Show progress bars of retrains."""

    def __post_init__(self) -> None:
        if self.doc_reduce not in DOC_REDUCTIONS:
            raise ConfigError(f"doc_reduce={self.doc_reduce!r} is unknown: use max or sum.")
        if self.max_queries is not None and self.max_queries < 1:
            raise ConfigError("max_queries must be >= 1, or None for all queries.")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalOptions:
        """Build from plain values; ``tail_patch``/``leave_k_out``/``lds`` may be dicts."""
        sections = {"tail_patch": inf.TailPatchConfig, "leave_k_out": inf.LeaveKOutConfig}
        sections["lds"] = inf.LDSConfig
        values = dict(data)
        for name, section in sections.items():
            raw = values.get(name)
            if isinstance(raw, Mapping):
                tuples = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
                values[name] = build_section(section, tuples, name)
        return build_section(cls, values, "eval options")


@dataclass
class EvalResult:
    """What ``run_eval`` computed; ``out`` is None when nothing was written."""

    table: pd.DataFrame
    """One row per (method, metric): family, mean, lo, hi, n, n_nan, interval, unit."""
    per_query: pd.DataFrame
    """One row per (method, metric, query): the values the summaries are computed from."""
    scores: dict[str, np.ndarray]
    """Scores (q, n_units) of each method, rows in ``query_ids`` order."""
    query_ids: list[str]
    record: dict[str, Any]
    """Command, versions, seeds, options, eligible queries, notes and wall times."""
    out: Path | None = None

    def value(self, method: str, metric: str) -> float:
        """Mean of one table cell (KeyError if absent)."""
        rows = self.table[(self.table["method"] == method) & (self.table["metric"] == metric)]
        if rows.empty:
            raise KeyError((method, metric))
        return float(rows["mean"].iloc[0])


# --------------------------------------------------------------------------- checks


def check_names(methods: Sequence[str], metrics: Sequence[str]) -> tuple[list[str], list[str]]:
    """Expand ``all`` and refuse unknown or repeated names, listing the valid ones."""
    valid_methods = available_methods()
    methods = valid_methods if list(methods) == ["all"] else list(methods)
    metrics = list(METRICS) if list(metrics) == ["all"] else list(metrics)
    for kind, given, valid in (("method", methods, valid_methods), ("metric", metrics, METRICS)):
        if not given:
            raise ConfigError(f"No {kind} given: pass at least one of {', '.join(valid)}.")
        unknown = [n for n in given if n not in valid]
        if unknown:
            raise ConfigError(f"Unknown {kind} {unknown[0]!r}: use one of {', '.join(valid)}.")
        if len(set(given)) != len(given):
            raise ConfigError(f"A {kind} is named twice in {given}: name each once.")
    return methods, metrics


def select_queries(bench: Benchmark, split: str, max_queries: int | None) -> list[dict]:
    """The benchmark queries of ``split`` (``all`` = every query), capped by max_queries."""
    if split not in SPLITS:
        raise ConfigError(f"Unknown split {split!r}: use one of {', '.join(SPLITS)}.")
    records = [q for q in bench.queries if split == "all" or q.get("split") == split]
    if not records:
        raise InputError(
            f"Benchmark {bench.root} has no queries in split {split!r}: use --split all, "
            "or rebuild the benchmark with a validation_fraction that fills both splits."
        )
    return round_robin(records, max_queries)


def _has_truth(metric: str, record: Mapping[str, Any]) -> bool:
    if metric == "fact":
        return bool(record.get("relevant_doc_ids"))
    if metric == "source":
        return record.get("kind") == "style" and bool(record.get("true_source"))
    return True  # model-based metrics need only the prompt and completion


def eligible_queries(
    records: Sequence[Mapping[str, Any]], metrics: Sequence[str], split: str
) -> tuple[dict[str, list[int]], list[str]]:
    """Indices of the queries each metric can use, and notes on the skipped ones.

    A metric with no eligible query is an error naming the metric and the missing field.
    """
    eligible, notes = {}, []
    for metric in metrics:
        eligible[metric] = [i for i, r in enumerate(records) if _has_truth(metric, r)]
        skipped = len(records) - len(eligible[metric])
        if not eligible[metric]:
            raise InputError(
                f"Metric {metric!r} needs {NEEDS[metric]}, but none of the {len(records)} "
                f"queries of split {split!r} has them: drop {metric!r} from --metrics or "
                "use a benchmark with such queries."
            )
        if skipped:
            notes.append(f"{metric}: {skipped} queries skipped (not {NEEDS[metric]}).")
    return eligible, notes


def _check_method_options(options: EvalOptions, methods: Sequence[str]) -> None:
    extra = sorted(set(options.method_options) - set(methods))
    if extra:
        raise ConfigError(
            f"Options given for method(s) {extra} that are not evaluated: add them to "
            f"--methods or drop their options."
        )


# --------------------------------------------------------------------------- scoring


def build_methods(
    methods: Sequence[str], metrics: Sequence[str], options: EvalOptions
) -> dict[str, Attributor]:
    """Unprepared attributors with their options; LDS refuses unsigned scores up front."""
    built = {m: get_attributor(m, **options.method_options.get(m, {})) for m in methods}
    if "lds" in metrics:
        for method in built.values():
            reason = inf.unsigned_reason(method)
            if reason:
                raise ConfigError(
                    f"LDS sums unit scores, so it needs signed, additive scores, but {reason}: "
                    "use a signed variant (e.g. score=bidirectional) or drop lds from --metrics."
                )
            reason = inf.unscored_reason(method)
            if reason:
                raise ConfigError(
                    f"LDS sums the scores of every unit of random half-subsets of the corpus, "
                    f"but {reason}: drop the candidates option for LDS or drop lds from "
                    "--metrics."
                )
    return built


def score_methods(
    methods: Mapping[str, Attributor], ctx: MethodContext, queries: Sequence[EncodedQuery]
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, float]]]:
    """Prepare each method once and score every query: scores and wall seconds per method."""
    scores, seconds = {}, {}
    for name, method in methods.items():
        t0 = time.perf_counter()
        method.prepare(ctx)
        t1 = time.perf_counter()
        scores[name] = method.score(list(queries))
        t2 = time.perf_counter()
        seconds[name] = {"prepare_s": round(t1 - t0, 3), "score_s": round(t2 - t1, 3)}
        log.info("%s: prepared in %.1fs, scored in %.1fs", name, t1 - t0, t2 - t1)
    return scores, seconds


# --------------------------------------------------------------------------- run


def _load(
    bench: Benchmark, model_dir: str | Path, records: list[dict], options: EvalOptions
) -> EvalInputs:
    """Model, training setup, token cache (training chunking) and encoded queries."""
    model, tokenizer = load_model_and_tokenizer(model_dir, device=options.device)
    setup = read_training_setup(model_dir, bench, device=options.retrain_device)
    key = sha256_text(tokenizer_fingerprint(tokenizer), canonical_json(setup.chunking.to_dict()))
    cache_dir = bench.root / ".cache" / f"tokens-{key[:12]}"
    documents = setup.documents[: len(bench.documents)]  # the benchmark's own, no copies
    cache = get_token_cache(documents, tokenizer, setup.chunking, cache_dir, progress=False)
    ctx = MethodContext(
        model, tokenizer, cache, seed=options.method_seed, params=options.params,
        batch_size=options.batch_size,
    )  # fmt: skip
    limit = context_length(model)
    # Queries carry the BOS exactly when the training units did (the recorded chunking),
    # so a query is read as the model read its training text.
    bos_id = setup.chunking.bos_id
    queries = [encode_query(_as_query(r), tokenizer, limit, bos_id) for r in records]
    return EvalInputs(model, tokenizer, setup, ctx, queries, records, bench.root / "retrains")


def _as_query(record: Mapping[str, Any]) -> Query:
    return Query(
        str(record["id"]), record["prompt"], record["completion"],
        loss_on=record.get("loss_on", "completion"),
    )  # fmt: skip


def run_eval(
    benchmark_dir: str | Path,
    model_dir: str | Path,
    methods: Sequence[str],
    metrics: Sequence[str],
    *,
    split: str = "test",
    seeds: Sequence[int] = (0, 1, 2),
    out: str | Path | None = None,
    options: EvalOptions | Mapping[str, Any] | None = None,
    overwrite: bool = False,
    command: str | None = None,
) -> EvalResult:
    """Evaluate ``methods`` on ``metrics`` over the queries of ``split``.

    ``seeds`` are the retraining seeds of leave-k-out (paired across top-k, random-k and
    no-removal retrains). Every input is checked before anything slow runs.
    """
    started = time.perf_counter()
    opts = options if isinstance(options, EvalOptions) else EvalOptions.from_dict(options or {})
    opts = dataclasses.replace(
        opts, leave_k_out=dataclasses.replace(opts.leave_k_out, seeds=tuple(seeds))
    )
    methods, metrics = check_names(methods, metrics)
    _check_method_options(opts, methods)
    bench = load_benchmark(benchmark_dir)
    records = select_queries(bench, split, opts.max_queries)
    eligible, notes = eligible_queries(records, metrics, split)
    attributors = build_methods(methods, metrics, opts)
    if out is not None:
        check_out_dir(Path(out), overwrite)
    loaded = _load(bench, model_dir, records, opts)
    _check_cutoffs(metrics, opts, len(loaded.ctx.cache))
    scores, method_seconds = score_methods(attributors, loaded.ctx, loaded.queries)
    collector = Collector(loaded.query_ids)
    settings = FamilySettings(
        opts.doc_reduce, opts.tail_patch, opts.leave_k_out, opts.lds, opts.progress
    )
    metric_seconds = run_families(metrics, eligible, loaded, scores, settings, collector)
    wall = {"methods": method_seconds, "metrics": metric_seconds,
            "total": round(time.perf_counter() - started, 3)}  # fmt: skip
    record = _record(bench, loaded, opts, methods, metrics, split, eligible, notes, wall)
    record["command"] = command or shlex.join(sys.argv)
    result = EvalResult(
        collector.table(), collector.per_query(), scores, collector.query_ids, record
    )
    if out is not None:
        result.out = write_outputs(Path(out), result, overwrite=overwrite)
    return result


def _record(
    bench: Benchmark,
    loaded: EvalInputs,
    opts: EvalOptions,
    methods: list[str],
    metrics: list[str],
    split: str,
    eligible: Mapping[str, list[int]],
    notes: list[str],
    wall: dict[str, Any],
) -> dict[str, Any]:
    """What ``eval.json`` holds besides the command: enough to replay and audit the run."""
    setup = loaded.setup
    return {
        "bgotrace_version": __version__,
        "benchmark": {"root": str(bench.root), **_bench_id(bench)},
        "model": {"dir": str(setup.model_dir), "fact_repeats": setup.fact_repeats,
                  "train_config": dataclasses.asdict(setup.config)},
        "split": split, "methods": methods, "metrics": metrics,
        "seeds": _seeds(opts, setup), "options": dataclasses.asdict(opts),
        "queries": {"selected": len(loaded.records), **{m: len(v) for m, v in eligible.items()}},
        "notes": notes, "wall_time_s": wall,
    }  # fmt: skip


def _bench_id(bench: Benchmark) -> dict[str, Any]:
    return {k: bench.manifest.get(k) for k in ("format_version", "content_sha256", "seed")}


def _seeds(opts: EvalOptions, setup: TrainingSetup) -> dict[str, Any]:
    return {
        "leave_k_out_retrains": list(opts.leave_k_out.seeds),
        "leave_k_out_random_sets": opts.leave_k_out.seed,
        "lds_subsets": opts.lds.seed,
        "lds_retrains": setup.config.seed,
        "tail_patch_random_units": opts.tail_patch.seed,
        "methods": opts.method_seed,
        "bootstrap": 0,
        "base_model": setup.config.seed,
    }


def _check_cutoffs(metrics: Sequence[str], opts: EvalOptions, n_units: int) -> None:
    needed = {"tail-patch": max(opts.tail_patch.ks), "leave-k-out": opts.leave_k_out.k}
    for metric in metrics:
        if needed.get(metric, 0) > n_units:
            raise ConfigError(
                f"Metric {metric!r} needs {needed[metric]} units per query but the corpus has "
                f"{n_units}: lower its k or use a larger benchmark."
            )
