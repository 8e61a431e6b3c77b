"""An attribution run from config to ranked results: the stages, in order.

load model → load corpus → token cache → encode queries (all input checked before
anything is written) → run directory → parameter selection (+ Fisher) → perturb and
sweep → rank and aggregate → per-token changes of top units → outputs.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from bgotrace import __version__
from bgotrace.baselines import MethodContext, get_attributor
from bgotrace.bgo import SweepInputs, perturbation_method, resolve_method, run_bgo
from bgotrace.cache import TokenCache, get_token_cache
from bgotrace.cache.token_cache import default_cache_dir, requested_manifest
from bgotrace.config import AttributeConfig, CorpusSpec
from bgotrace.corpus import (
    ChunkingConfig,
    CorpusFields,
    CorpusFiles,
    Document,
)
from bgotrace.corpus.bos import resolve_bos
from bgotrace.devices import resolve_device, set_tf32
from bgotrace.errors import InputError
from bgotrace.modeling.loading import context_length, embedding_rows, load_model_and_tokenizer
from bgotrace.plan.fit import check_memory
from bgotrace.plausibility import check_query
from bgotrace.prefilter import plan_candidates
from bgotrace.query import EncodedQuery, Query, encode_query, load_queries, single_query
from bgotrace.ranking.aggregate import aggregate, unit_scores
from bgotrace.ranking.result import AttributionResult
from bgotrace.ranking.writers import save_result, selected_writers
from bgotrace.report import html as _report  # noqa: F401  (registers the report.html writer)
from bgotrace.score.store import RunStore
from bgotrace.spans import expand_all, group_size_for, nest_spans, span_columns

log = logging.getLogger(__name__)


@dataclass
class Inputs:
    """Everything loaded and checked before a run may write anything."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    cache: TokenCache
    queries: list[EncodedQuery]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def queries_from_spec(config: AttributeConfig) -> list[Query]:
    spec = config.query
    if spec.queries is not None:
        return load_queries(spec.queries, loss_on=spec.loss_on)
    chat = {"chat": spec.chat, "messages_file": spec.messages}
    return [single_query(spec.prompt, spec.completion, spec.loss_on, **chat)]


def load_inputs(
    config: AttributeConfig,
    *,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    documents: Sequence[Document] | None = None,
    queries: Sequence[Query] | None = None,
    rebuild_cache: bool = False,
) -> Inputs:
    """Load and validate the model, corpus, cache and queries (writes only the cache).

    The cheap checks come first: a bad query or corpus file is reported before a large model
    is loaded, and a query too long for the model before the corpus is tokenized.
    """
    resolve_method(config)  # an option the method ignores is refused before anything loads
    queries = list(queries) if queries is not None else queries_from_spec(config)
    if model is None and config.execution.device != "auto":  # one that is not here, before
        resolve_device(config.execution.device)  # the plan measures its memory
    if model is None and perturbation_method(config.method) is not None:  # before it loads
        check_memory(config, n_queries=len(queries))
    spec = config.corpus
    in_memory = documents is not None
    fields = CorpusFields(spec.text_field, spec.id_field, spec.source_field)
    # A corpus on disk is streamed into the token cache, never held whole.
    corpus = documents if documents is not None else CorpusFiles(spec.path, fields)
    if model is None or tokenizer is None:
        model, tokenizer = load_model_and_tokenizer(
            config.model.path,
            adapter=config.model.adapter,
            device=config.execution.device,
            dtype=config.model.dtype,
            trust_remote_code=config.model.trust_remote_code,
            merge_adapter=config.perturb.params != "adapter",  # --params adapter: kept unmerged
            attn_implementation=config.model.attn_implementation,
        )
    model.eval()  # scores must not depend on dropout masks
    context = context_length(model)
    bos_id = resolve_bos(tokenizer, spec.bos)  # text as the model saw it in training
    encoded = [encode_query(q, tokenizer, context, bos_id) for q in queries]
    # Resolved into the config, so config.yaml and summary.json replay the same units.
    spec.max_length = spec.unit_length(context)
    chunking = ChunkingConfig(
        max_length=spec.max_length, stride=spec.stride, bos_id=bos_id, unit_loss=spec.unit_loss
    )
    label = None if in_memory else Path(spec.path.split("::")[0]).name
    cache = get_token_cache(
        corpus, tokenizer, chunking, spec.cache_dir, label=label, rebuild=rebuild_cache,
        verify=spec.verify_cache, shard_tokens=spec.shard_tokens,
    )  # fmt: skip
    _check_vocabulary(model, cache, encoded, config.model.path)
    encoded = expand_all(encoded, tokenizer, config.query.spans)  # spans follow their query
    return Inputs(model, tokenizer, cache, encoded)


def run_attribution(
    config: AttributeConfig,
    inputs: Inputs,
    *,
    overwrite: bool = False,
    resume: bool = False,
) -> AttributionResult:
    """Score, rank and (when ``config.output.out`` is set) write a run directory."""
    seed_everything(config.seed)
    set_tf32(next(inputs.model.parameters()).device, config.execution.tf32)
    started = time.time()
    config = resolve_method(config)  # untrac-inv's pinned score is what config.yaml records
    writers = selected_writers(config.output.formats)  # an unknown one fails before the sweep
    store = None
    if config.output.out is not None:
        store = RunStore.open(config.output.out, overwrite=overwrite, resume=resume)
        store.check_config(config)
    if perturbation_method(config.method) is not None:
        result, details = _run_bgo(config, inputs, store)
    else:
        result, details = _run_method(config, inputs)
    result.summary = _summary(config, inputs, result, details, time.time() - started)
    if store is not None:
        save_result(result, store, writers)
    return result


def _run_bgo(
    config: AttributeConfig, inputs: Inputs, store: RunStore | None
) -> tuple[AttributionResult, dict[str, Any]]:
    """A perturbation method (``bgo``, ``untrac-inv``…) through the one BGO path."""
    per_sweep = group_size_for(inputs.queries, config.scoring.queries_per_sweep)
    plan = plan_candidates(
        config.scoring, _method_context(config, inputs), inputs.queries, per_sweep
    )
    run = run_bgo(
        _sweep_inputs(config, inputs), inputs.queries, method=config.method, store=store,
        plan=plan, top_tokens=config.output.top_tokens, tokenizer=inputs.tokenizer,
    )  # fmt: skip
    units = inputs.cache.units
    per_query = [
        unit_scores(units, q.query.query.query_id, q.scores, q.counts, q.losses, q.candidate)
        for q in run.queries
    ]
    details = {
        **run.details,
        "loss_trajectories": [q.trajectories for q in run.queries],
        "calibrations": [q.calibration for q in run.queries],
        "linearities": [q.linearity for q in run.queries],
    }
    top_tokens = [row for q in run.queries for row in q.top_tokens]
    return _assemble(config, inputs, per_query, top_tokens), details


def _run_method(config: AttributeConfig, inputs: Inputs) -> tuple[AttributionResult, dict]:
    """A baseline from ``bgotrace.baselines``, ranked and written exactly like BGO."""
    method = get_attributor(config.method)
    ctx = _method_context(config, inputs)
    method.prepare(ctx)
    scores = method.score(inputs.queries)  # (n_queries, n_units)
    n_tokens = inputs.cache.loss_counts  # predicted tokens in each unit's loss
    per_query = [
        unit_scores(inputs.cache.units, q.query.query_id, scores[i], n_tokens)
        for i, q in enumerate(inputs.queries)
    ]
    return _assemble(config, inputs, per_query, []), {"device": str(ctx.device)}


def _method_context(config: AttributeConfig, inputs: Inputs) -> MethodContext:
    """The context of a baseline, or of the prefilter of a BGO run."""
    return MethodContext(
        inputs.model,
        inputs.tokenizer,
        inputs.cache,
        seed=config.seed,
        params=config.perturb.params,
        batch_size=config.scoring.batch_size,
    )


def _sweep_inputs(config: AttributeConfig, inputs: Inputs) -> SweepInputs:
    return SweepInputs(
        inputs.model, inputs.cache, config.perturb, config.scoring,
        pad_id=int(inputs.tokenizer.pad_token_id or 0), seed=config.seed,
        execution=config.execution,
    )  # fmt: skip


def _assemble(
    config: AttributeConfig,
    inputs: Inputs,
    per_query: list[pd.DataFrame],
    top_tokens: list[dict[str, Any]],
) -> AttributionResult:
    per_query = [span_columns(f, q) for f, q in zip(per_query, inputs.queries, strict=True)]
    scores = pd.concat(per_query, ignore_index=True)
    shown = max(config.output.top_k, config.output.top_tokens)
    snippets = {
        str(r.unit_id): inputs.cache.unit_text(int(r.unit_index))
        for ranked in per_query
        for r in ranked.head(shown).itertuples()
    }
    return AttributionResult(
        scores=scores,
        documents=aggregate(scores, "doc_id"),
        sources=aggregate(scores, "source"),
        top_tokens=top_tokens,
        snippets=snippets,
    )


def _top_unit_ids(scores: pd.DataFrame, k: int) -> dict[str, list[str]]:
    """Each query's ``k`` best scored unit ids (as ``result.top(k, query_id)``), in one pass
    over the scores instead of one filter of every query's rows per query."""
    best = scores[scores["score"].notna() & (scores["rank"] <= k)]
    best = best.sort_values(["query_id", "rank"], kind="stable")
    return {str(q): g["unit_id"].tolist() for q, g in best.groupby("query_id", sort=False)}


def _summary(
    config: AttributeConfig,
    inputs: Inputs,
    result: AttributionResult,
    details: dict[str, Any],
    seconds: float,
) -> dict:
    trajectories = details.pop("loss_trajectories", [{}] * len(inputs.queries))
    calibrations = details.pop("calibrations", [None] * len(inputs.queries))
    linearities = details.pop("linearities", [None] * len(inputs.queries))
    checks = [check_query(inputs.model, q) for q in inputs.queries]  # would it write them?
    tops = _top_unit_ids(result.scores, 5)
    return {
        "bgotrace_version": __version__,
        "torch_version": torch.__version__,
        "method": config.method,
        "config": config.to_dict(),
        "seed": config.seed,
        "corpus": {k: inputs.cache.manifest.get(k) for k in ("n_documents", "n_units", "n_tokens")},
        **details,
        "queries": nest_spans(
            [
                {
                    "query_id": q.query.query_id,
                    "prompt": q.query.prompt,
                    "completion": q.query.completion,
                    "loss_on": q.query.loss_on,
                    **q.query.messages_record(),
                    "n_loss_tokens": q.n_loss_tokens,
                    "loss_trajectories": traj,
                    "calibration": cal,
                    "linearity": lin,
                    "model_check": check.to_dict(),
                    "top_units": tops.get(q.query.query_id, []),
                }
                for q, traj, cal, lin, check in zip(
                    inputs.queries, trajectories, calibrations, linearities, checks, strict=True
                )
            ],
            inputs.queries,
            result,
        ),
        "warnings": [c.warning for c in checks if c.warning],
        "seconds": round(seconds, 3),
    }


def _check_vocabulary(
    model: PreTrainedModel, cache: TokenCache, queries: Sequence[EncodedQuery], model_path: str
) -> None:
    """Refuse token ids the model has no embedding for (a tokenizer of another model).

    Checked before the sweep: the embedding lookup would otherwise fail deep inside the
    model with a bare IndexError.
    """
    rows = embedding_rows(model)
    top = max([cache.max_token_id, *(int(q.input_ids.max()) for q in queries)])
    if rows is not None and top >= rows:
        raise InputError(
            f"Token id {top} of the corpus or query is beyond the model's {rows} embedding "
            f"rows, so the tokenizer in {model_path} does not belong to this model: save the "
            "model's own tokenizer next to it (tokenizer.save_pretrained)."
        )


def in_memory_cache_dir(
    documents: Sequence[Document], tokenizer: PreTrainedTokenizerBase, spec: CorpusSpec
) -> Path:
    """Cache directory of an in-memory corpus given to the Python API (``load_inputs``' default).

    Keyed by corpus, tokenizer and chunking, so repeated calls on the same data reuse one
    cache instead of re-tokenizing, and a change of any of them gets a cache of its own.
    ``spec.max_length`` is taken as resolved (unset: the default length).
    """
    bos_id = resolve_bos(tokenizer, spec.bos)
    chunking = ChunkingConfig(
        spec.unit_length(None), spec.stride, bos_id=bos_id, unit_loss=spec.unit_loss
    )
    return default_cache_dir(requested_manifest(documents, tokenizer, chunking))
