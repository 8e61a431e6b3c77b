"""``bgotrace attribute``: rank the training data behind a text.

Example (CPU)::

    bgotrace attribute --model MODEL_DIR --corpus corpus.jsonl \\
        --prompt "The capital of Zorbania is" --completion " Quexton." --out runs/q1
    bgotrace attribute --config runs/q1/config.yaml          # replay
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer

from bgotrace.config import (
    METHODS,
    SECTIONS,
    AttributeConfig,
    CorpusSpec,
    ModelSpec,
    OutputSpec,
    PerturbConfig,
    QuerySpec,
    ScoreConfig,
    help_of,
)
from bgotrace.errors import ConfigError
from bgotrace.pipeline import load_inputs, run_attribution
from bgotrace.report.console import print_result
from bgotrace.runtime.progress import set_progress


def _opt(section: type, name: str, flag: str | None = None) -> Any:
    flag = flag or "--" + name.replace("_", "-")
    return typer.Option(flag, help=help_of(section, name), show_default=False)


def attribute(
    model: Annotated[str | None, _opt(ModelSpec, "path", "--model")] = None,
    corpus: Annotated[str | None, _opt(CorpusSpec, "path", "--corpus")] = None,
    prompt: Annotated[str | None, _opt(QuerySpec, "prompt")] = None,
    completion: Annotated[str | None, _opt(QuerySpec, "completion")] = None,
    queries: Annotated[str | None, _opt(QuerySpec, "queries")] = None,
    chat: Annotated[str | None, _opt(QuerySpec, "chat")] = None,
    messages: Annotated[str | None, _opt(QuerySpec, "messages")] = None,
    out: Annotated[str | None, _opt(OutputSpec, "out")] = None,
    config: Annotated[
        Path | None, typer.Option(help="Replay a run's config.yaml; other flags override it.")
    ] = None,
    loss_on: Annotated[str | None, _opt(QuerySpec, "loss_on")] = None,
    spans: Annotated[str | None, _opt(QuerySpec, "spans")] = None,
    adapter: Annotated[str | None, _opt(ModelSpec, "adapter")] = None,
    device: Annotated[str | None, _opt(ModelSpec, "device")] = None,
    trust_remote_code: Annotated[bool | None, _opt(ModelSpec, "trust_remote_code")] = None,
    text_field: Annotated[str | None, _opt(CorpusSpec, "text_field")] = None,
    id_field: Annotated[str | None, _opt(CorpusSpec, "id_field")] = None,
    source_field: Annotated[str | None, _opt(CorpusSpec, "source_field")] = None,
    max_length: Annotated[int | None, _opt(CorpusSpec, "max_length")] = None,
    stride: Annotated[int | None, _opt(CorpusSpec, "stride")] = None,
    bos: Annotated[str | None, _opt(CorpusSpec, "bos")] = None,
    cache_dir: Annotated[str | None, _opt(CorpusSpec, "cache_dir")] = None,
    optimizer: Annotated[str | None, _opt(PerturbConfig, "optimizer")] = None,
    lr: Annotated[str | None, _opt(PerturbConfig, "lr")] = None,
    lr_target: Annotated[float | None, _opt(PerturbConfig, "lr_target")] = None,
    lr_criterion: Annotated[str | None, _opt(PerturbConfig, "lr_criterion")] = None,
    steps: Annotated[int | None, _opt(PerturbConfig, "steps")] = None,
    params: Annotated[str | None, _opt(PerturbConfig, "params")] = None,
    max_grad_norm: Annotated[float | None, _opt(PerturbConfig, "max_grad_norm")] = None,
    fisher_samples: Annotated[int | None, _opt(PerturbConfig, "fisher_samples")] = None,
    fisher_damping: Annotated[float | None, _opt(PerturbConfig, "fisher_damping")] = None,
    score: Annotated[str | None, _opt(ScoreConfig, "score")] = None,
    reduce: Annotated[str | None, _opt(ScoreConfig, "reduce")] = None,
    normalize: Annotated[str | None, _opt(ScoreConfig, "normalize")] = None,
    batch_size: Annotated[int | None, _opt(ScoreConfig, "batch_size")] = None,
    dtype: Annotated[str | None, _opt(ScoreConfig, "dtype")] = None,
    block_units: Annotated[int | None, _opt(ScoreConfig, "block_units")] = None,
    queries_per_sweep: Annotated[int | None, _opt(ScoreConfig, "queries_per_sweep")] = None,
    workers: Annotated[int | None, _opt(ScoreConfig, "workers")] = None,
    ray_address: Annotated[str | None, _opt(ScoreConfig, "ray_address")] = None,
    cpus_per_worker: Annotated[float | None, _opt(ScoreConfig, "cpus_per_worker")] = None,
    gpus_per_worker: Annotated[float | None, _opt(ScoreConfig, "gpus_per_worker")] = None,
    ship_cache: Annotated[str | None, _opt(ScoreConfig, "ship_cache")] = None,
    block_attempts: Annotated[int | None, _opt(ScoreConfig, "block_attempts")] = None,
    ray_timeout: Annotated[float | None, _opt(ScoreConfig, "ray_timeout")] = None,
    trunk_cache: Annotated[bool | None, _opt(ScoreConfig, "trunk_cache")] = None,
    trunk_cache_dtype: Annotated[str | None, _opt(ScoreConfig, "trunk_cache_dtype")] = None,
    candidates: Annotated[str | None, _opt(ScoreConfig, "candidates")] = None,
    prefilter: Annotated[str | None, _opt(ScoreConfig, "prefilter")] = None,
    top_k: Annotated[int | None, _opt(OutputSpec, "top_k")] = None,
    granularity: Annotated[str | None, _opt(OutputSpec, "granularity")] = None,
    top_tokens: Annotated[int | None, _opt(OutputSpec, "top_tokens")] = None,
    formats: Annotated[str | None, _opt(OutputSpec, "formats")] = None,
    method: Annotated[
        str | None,
        typer.Option(help="bgo (default) or a baseline: " + ", ".join(METHODS[1:]) + "."),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of every random choice (Fisher sample).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run directory.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run in --out.")] = False,
    rebuild_cache: Annotated[
        bool, typer.Option(help="Rebuild a token cache made with other settings.")
    ] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Rank the training units, documents and sources that support a model's text (BGO)."""
    values = dict(locals())
    set_progress(not quiet)
    cfg = build_config(values)
    inputs = load_inputs(cfg, rebuild_cache=rebuild_cache)
    result = run_attribution(cfg, inputs, overwrite=overwrite, resume=resume)
    print_result(result, granularity=cfg.output.granularity, k=cfg.output.top_k, out=cfg.output.out)


_YAML_ONLY = {"adam_beta1", "adam_beta2", "adam_eps", "fisher_eps"}
"""Fields set in config.yaml only (no flag): optimizer internals few users change."""

SECTION_OF: dict[str, tuple[str | None, str]] = {
    "model": ("model", "path"),  # --model and --corpus are the sections' paths
    "corpus": ("corpus", "path"),
    "seed": (None, "seed"),
    "method": (None, "method"),
    **{
        f.name: (section, f.name)
        for section, cls in SECTIONS.items()
        for f in dataclasses.fields(cls)
        if f.name != "path" and f.name not in _YAML_ONLY
    },
}
"""Flag name → (config section or None for top level, field): every option is a config field."""


def _replace_chat_query(query: dict[str, Any], given: dict[str, Any]) -> None:
    """A query given on the command line replaces the config file's other kinds of query."""
    kinds = {"prompt": ("chat", "messages"), "chat": ("prompt", "messages", "queries")}
    kinds |= {"messages": ("prompt", "completion", "chat", "queries")}
    kinds |= {"queries": ("chat", "messages")}
    for flag, replaced in kinds.items():
        if given.get(flag) is not None:
            for key in replaced:
                query.pop(key, None)


def build_config(values: dict[str, Any]) -> AttributeConfig:
    """Config file (if any) overridden by every flag given on the command line."""
    data: dict[str, Any] = (
        AttributeConfig.load(values["config"]).to_dict() if values["config"] else {}
    )
    given = {k: v for k, v in values.items() if k in SECTION_OF and v is not None}
    if given.get("prompt") is not None or given.get("completion") is not None:
        data.get("query", {}).pop("queries", None)
    if given.get("queries") is not None:
        for key in ("prompt", "completion"):
            data.get("query", {}).pop(key, None)
    _replace_chat_query(data.get("query", {}), given)
    for key, value in given.items():
        section, name = SECTION_OF[key]
        if section is None:
            data[name] = value
        else:
            data.setdefault(section, {})[name] = value
    for required, flag in (("model", "--model"), ("corpus", "--corpus")):
        if "path" not in data.get(required, {}):
            raise ConfigError(f"{flag} is missing: pass it, or --config RUN/config.yaml.")
    data.setdefault("query", {})
    return AttributeConfig.from_dict(data)
