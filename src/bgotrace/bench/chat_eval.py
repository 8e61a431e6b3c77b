"""``bench run`` on a chat benchmark: every method on both fine-tunes, ranked over SFT data.

For each fine-tune (``full``: every weight; ``lora``: the adapter kept unmerged over the
base, ``--params adapter`` for BGO and the gradient methods) the methods rank the SFT
conversations; the queries are that fine-tune's own greedy answers to held-out prompts
(conversation queries, loss on the answer). The metrics are the text benchmark's
(:mod:`bgotrace.eval.families`): fact MRR / recall@10 over SFT conversations, source
precision@10 (the persona), tail-patch; leave-k-out and LDS would retrain the SFT and are
not offered. Results go to ``<out>/<variant>/`` in the evaluation's format
(:mod:`bgotrace.eval.report`), and ``<out>/results.md`` holds both side by side.

**Units.** Each SFT conversation is one unit (an SFT corpus, :mod:`bgotrace.corpus`):
rendered with the chat template and tokenized as the fine-tune saw it (one BOS from the
template, no EOS added), its loss on the assistant tokens only, as fine-tuning had it
(``unit_loss="all"``: every token).
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bgotrace import __version__
from bgotrace.baselines import MethodContext
from bgotrace.bench.chat_build import VARIANTS, load_chat_manifest
from bgotrace.cache import get_token_cache, tokenizer_fingerprint
from bgotrace.cache.fingerprint import canonical_json, sha256_text
from bgotrace.corpus import ChunkingConfig, Document, documents_from_records
from bgotrace.errors import ConfigError, InputError
from bgotrace.eval.benchmark import Benchmark
from bgotrace.eval.collect import Collector
from bgotrace.eval.families import EvalInputs, FamilySettings, run_families
from bgotrace.eval.report import check_out_dir, family_table, write_outputs
from bgotrace.eval.retrain import TrainingSetup
from bgotrace.eval.runner import (
    EvalOptions,
    EvalResult,
    build_methods,
    check_names,
    eligible_queries,
    score_methods,
    select_queries,
)
from bgotrace.modeling.loading import context_length, load_model_and_tokenizer
from bgotrace.query import Query, encode_query
from bgotrace.train import TrainConfig

CHAT_METRICS = ("fact", "source", "tail-patch", "hubs")
"""Metrics of the chat benchmark (no retraining metrics)."""


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def sft_documents(root: Path) -> list[Document]:
    """The SFT conversations as corpus documents (the persona as source): the token cache
    renders them with the chat template and keeps their assistant-only loss masks."""
    return documents_from_records(_read_jsonl(root / "sft.jsonl"))


def _check_metrics(metrics: Sequence[str]) -> list[str]:
    chosen = list(CHAT_METRICS[:3]) if list(metrics) == ["all"] else list(metrics)
    unknown = [m for m in chosen if m not in CHAT_METRICS]
    if unknown:
        raise ConfigError(
            f"Metric {unknown[0]!r} is not available on a chat benchmark (it would retrain the "
            f"fine-tune): use {', '.join(CHAT_METRICS)}."
        )
    return chosen


def _variant_options(
    opts: EvalOptions, root: Path, variant: str, methods: list[str]
) -> EvalOptions:
    """LoRA: the adapter's weights are the parameters (unless --option params=... says
    otherwise), and TrackStar reads the adapter's AdamW moments."""
    if variant != "lora":
        return opts
    per_method = {k: dict(v) for k, v in opts.method_options.items()}
    if "trackstar" in methods:
        state = str(root / "lora" / "optimizer_state.safetensors")
        per_method.setdefault("trackstar", {}).setdefault("optimizer_state", state)
    params = "adapter" if opts.params == "all" else opts.params
    return dataclasses.replace(opts, params=params, method_options=per_method)


def _load(
    root: Path, variant: str, records: list[dict], opts: EvalOptions, unit_loss: str
) -> EvalInputs:
    """The fine-tune, the token cache of the SFT conversations, the encoded queries."""
    model_dir, adapter = (
        (root / "base", root / "lora") if variant == "lora" else (root / variant, None)
    )
    model, tokenizer = load_model_and_tokenizer(
        model_dir, adapter=adapter, merge_adapter=False, device=opts.device
    )
    limit = context_length(model)
    documents = sft_documents(root)
    chunking = ChunkingConfig(max_length=limit or 1 << 20, unit_loss=unit_loss)
    key = sha256_text(tokenizer_fingerprint(tokenizer), canonical_json(chunking.to_dict()))
    cache = get_token_cache(documents, tokenizer, chunking, root / ".cache" / f"tokens-{key[:12]}",
                            progress=False)  # fmt: skip
    if len(cache) != len(documents):
        raise InputError(f"Chat benchmark {root}: an SFT conversation does not fit one unit.")
    ctx = MethodContext(model, tokenizer, cache, seed=opts.method_seed, params=opts.params,
                        batch_size=opts.batch_size)  # fmt: skip
    queries = [
        encode_query(Query.chat(str(r["id"]), r["messages"], r["loss_on"]), tokenizer, limit)
        for r in records
    ]
    setup = TrainingSetup(model_dir, TrainConfig(), chunking, 1, documents, replays_base=False)
    return EvalInputs(model, tokenizer, setup, ctx, queries, records, root / "retrains")


def _record(root: Path, manifest: dict, variant: str, loaded: EvalInputs, opts: EvalOptions,
            names: tuple[list[str], list[str]], split: str, eligible: Mapping[str, list[int]],
            notes: list[str], wall: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """What ``eval.json`` holds: enough to replay and audit the run."""
    digest = sha256_text(canonical_json(manifest["sha256"]))
    model = {"dir": f"{root / variant}" + (f" (adapter over {root / 'base'})" if variant == "lora"
                                          else ""), "params": opts.params}  # fmt: skip
    return {
        "bgotrace_version": __version__,
        "benchmark": {"root": str(root), "format_version": manifest["format_version"],
                      "content_sha256": digest, "seed": manifest["config"]["seed"]},
        "model": model, "variant": variant, "split": split, "methods": names[0],
        "metrics": names[1], "seeds": {"methods": opts.method_seed,
                                       "tail_patch_random_units": opts.tail_patch.seed},
        "options": dataclasses.asdict(opts),
        "queries": {"selected": len(loaded.records), **{m: len(v) for m, v in eligible.items()}},
        "notes": notes, "wall_time_s": wall,
    }  # fmt: skip


def evaluate_variant(
    root: Path,
    variant: str,
    methods: Sequence[str],
    metrics: Sequence[str],
    *,
    split: str,
    options: EvalOptions,
    command: str,
    unit_loss: str = "assistant",
) -> EvalResult:
    """Every method × metric on one fine-tune over the queries of ``split``; ``unit_loss``:
    what a unit's loss covers (``assistant``, as fine-tuned, or ``all`` of its tokens)."""
    started = time.perf_counter()
    manifest = load_chat_manifest(root)
    names = check_names(methods, ["fact"])[0], _check_metrics(metrics)
    opts = _variant_options(options, root, variant, names[0])
    queries = _read_jsonl(root / f"queries-{variant}.jsonl")
    bench = Benchmark(root, [], queries, manifest)
    records = select_queries(bench, split, opts.max_queries)
    eligible, notes = eligible_queries(records, names[1], split)
    attributors = build_methods(names[0], names[1], opts)
    loaded = _load(root, variant, records, opts, unit_loss)
    scores, method_seconds = score_methods(attributors, loaded.ctx, loaded.queries)
    collector = Collector(loaded.query_ids)
    settings = FamilySettings(opts.doc_reduce, opts.tail_patch, opts.leave_k_out, opts.lds)
    metric_seconds = run_families(names[1], eligible, loaded, scores, settings, collector)
    wall = {"methods": method_seconds, "metrics": metric_seconds,
            "total": round(time.perf_counter() - started, 3)}  # fmt: skip
    record = _record(root, manifest, variant, loaded, opts, names, split, eligible, notes, wall)
    record["command"], record["unit_loss"] = command, unit_loss
    return EvalResult(collector.table(), collector.per_query(), scores, collector.query_ids, record)


def run_chat_bench(
    bench_dir: str | Path,
    out: str | Path,
    *,
    methods: Sequence[str] = ("all",),
    metrics: Sequence[str] = ("all",),
    split: str = "test",
    variants: Sequence[str] = VARIANTS,
    options: EvalOptions | Mapping[str, Any] | None = None,
    overwrite: bool = False,
    command: str | None = None,
    unit_loss: str = "assistant",
) -> dict[str, EvalResult]:
    """Evaluate both fine-tunes; ``<out>/<variant>/`` per fine-tune, ``<out>/results.md``."""
    root, out = Path(bench_dir), Path(out)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ConfigError(f"Unknown fine-tune {unknown}: use {', '.join(VARIANTS)}.")
    opts = options if isinstance(options, EvalOptions) else EvalOptions.from_dict(options or {})
    check_out_dir(out, overwrite)
    command = command or shlex.join(sys.argv)
    results = {}
    for variant in variants:
        result = evaluate_variant(root, variant, methods, metrics, split=split, options=opts,
                                  command=command, unit_loss=unit_loss)  # fmt: skip
        result.out = write_outputs(out / variant, result, overwrite=True)
        results[variant] = result
    (out / "results.md").write_text(side_by_side(results, command), encoding="utf-8")
    return results


def side_by_side(results: Mapping[str, EvalResult], command: str) -> str:
    """One markdown file: per metric family, a table per fine-tune."""
    parts = ["# Chat benchmark results\n", f"- command: `{command}`\n"]
    for variant, result in results.items():
        rec = result.record
        what = f"params {rec['model']['params']}; unit loss {rec['unit_loss']}"
        parts.append(f"## {variant} fine-tune ({what}; split {rec['split']}; "
                     f"queries {rec['queries']})\n")  # fmt: skip
        for family in CHAT_METRICS:
            if (result.table["family"] == family).any():
                parts.append(f"### {family}\n\n{family_table(result.table, family)}")
        parts.append(f"wall time: {rec['wall_time_s']['total']:.0f} s\n")
    return "\n".join(parts)
