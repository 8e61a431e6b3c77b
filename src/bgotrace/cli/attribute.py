"""``bgotrace attribute``: rank the training data behind a text.

Example (CPU)::

    bgotrace attribute --model MODEL_DIR --corpus corpus.jsonl \\
        --prompt "The capital of Zorbania is" --completion " Quexton." --out runs/q1
    bgotrace attribute --config runs/q1/config.yaml          # replay

Every config field is an option (``bgotrace.cli.options`` derives them from
``bgotrace.config.SECTIONS``); this module holds only the options that are not config fields.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer

from bgotrace.cli.options import config_options, with_config_options
from bgotrace.config import METHODS, SECTIONS, AttributeConfig
from bgotrace.errors import ConfigError
from bgotrace.pipeline import load_inputs, run_attribution
from bgotrace.report.console import print_result
from bgotrace.runtime.progress import set_progress


@with_config_options
def attribute(
    config: Annotated[
        Path | None, typer.Option(help="Replay a run's config.yaml; other flags override it.")
    ] = None,
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
    **options: Any,
) -> None:
    """Rank the training units, documents and sources that support a model's text (BGO)."""
    set_progress(not quiet)
    cfg = build_config({"config": config, "method": method, "seed": seed, **options})
    inputs = load_inputs(cfg, rebuild_cache=rebuild_cache)
    result = run_attribution(cfg, inputs, overwrite=overwrite, resume=resume)
    print_result(result, granularity=cfg.output.granularity, k=cfg.output.top_k, out=cfg.output.out)


def section_of() -> dict[str, tuple[str | None, str]]:
    """Option name → (config section, or None for the top level; field), from the config now."""
    top: dict[str, tuple[str | None, str]] = {"seed": (None, "seed"), "method": (None, "method")}
    return top | {o.name: (o.section, o.field) for o in config_options()}


SECTION_OF = section_of()
"""Option name → (config section or None for top level, field): every option is a config field."""

_YAML_ONLY = {
    f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)
    if not f.metadata.get("cli", True)
}  # fmt: skip
"""Fields set in config.yaml only (``cli=False``, no flag): optimizer internals few users change."""


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
    """Config file (if any) overridden by every flag given on the command line.

    ``values``: option name → value, None where the option was not given (``--config``
    under ``config``); the names are those of :func:`section_of`.
    """
    data: dict[str, Any] = (
        AttributeConfig.load(values["config"]).to_dict() if values.get("config") else {}
    )
    keys = section_of()
    given = {k: v for k, v in values.items() if k in keys and v is not None}
    if given.get("prompt") is not None or given.get("completion") is not None:
        data.get("query", {}).pop("queries", None)
    if given.get("queries") is not None:
        for key in ("prompt", "completion"):
            data.get("query", {}).pop(key, None)
    _replace_chat_query(data.get("query", {}), given)
    for key, value in given.items():
        section, name = keys[key]
        if section is None:
            data[name] = value
        else:
            data.setdefault(section, {})[name] = value
    for required, flag in (("model", "--model"), ("corpus", "--corpus")):
        if "path" not in data.get(required, {}):
            raise ConfigError(f"{flag} is missing: pass it, or --config RUN/config.yaml.")
    data.setdefault("query", {})
    return AttributeConfig.from_dict(data)
