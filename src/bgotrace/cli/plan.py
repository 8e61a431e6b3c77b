"""``bgotrace plan``: the memory and time an attribution run would need, before it runs.

Takes the options of ``bgotrace attribute`` and reads only the model's ``config.json``
(no weights, no corpus, no query needed)::

    bgotrace plan --model MODEL_DIR --params all --model-dtype bfloat16 --dtype bfloat16
    bgotrace plan --model MODEL_DIR --device cuda --device-memory 80GiB --json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from bgotrace.cli.attribute import build_config
from bgotrace.cli.options import with_config_options
from bgotrace.config import AttributeConfig
from bgotrace.devices import parse_size
from bgotrace.plan.estimate import Plan, meta_model, plan_run
from bgotrace.plan.fit import fitting_options, human
from bgotrace.plan.memory import RUNTIME_BYTES

_NO_CORPUS = "(no corpus: the plan does not read it)"


def _count_queries(config: AttributeConfig) -> int | None:
    """Queries of the run (each line of a --queries file), None when unknown."""
    if config.query.queries is None:
        return 1
    path = Path(config.query.queries)
    if not path.is_file():
        return None
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def _placeholders(values: dict[str, Any]) -> dict[str, Any]:
    """A corpus and a query where none is given: the plan reads neither."""
    if values.get("config") is None:
        values["corpus"] = values.get("corpus") or _NO_CORPUS
        query_keys = ("prompt", "completion", "queries", "chat", "messages")
        if all(values.get(k) is None for k in query_keys):
            values["completion"] = " "
    return values


def _table(plan: Plan, fix: str | None) -> str:
    m, r = plan.model, plan.run
    lines = [
        f"parameters {m.n_params:,} ({m.n_selected:,} perturbed); model {r.model_bytes} bytes "
        f"and sweep {r.sweep_bytes} bytes per weight; {r.queries_per_sweep} queries x "
        f"{r.states_per_query} states per sweep; batch {r.batch_size} x {r.unit_length} tokens",
        f"{'stage':<14}{'device':>12}{'host':>12}   hours per 1e9 tokens (ESTIMATED)",
    ]
    for s in plan.stages:
        hours = "" if s.hours_per_1e9_tokens is None else f"{s.hours_per_1e9_tokens:.3g}"
        lines.append(f"{s.name:<14}{human(s.device_bytes):>12}{human(s.host_bytes):>12}   {hours}")
        parts = ", ".join(f"{k} {human(v)}" for k, v in s.device_parts.items() if v)
        lines.append(f"{'':<14}{parts}")
    verdict = "fits" if plan.fits else "does NOT fit"
    lines.append(
        f"peak: device {human(plan.peak_device_bytes)}, host {human(plan.peak_host_bytes)}; "
        f"{verdict} in {human(plan.device_memory)} ({plan.device})"
    )
    stage_part = "host column"
    if plan.device == "cpu":
        stage_part = "host and device columns (on cpu the device is the host)"
    lines.append(
        f"host peak = runtime {human(RUNTIME_BYTES)} + token cache pages "
        f"{human(plan.cache_pages_bytes)} + the largest stage's {stage_part}"
    )
    if not plan.fits:
        lines.append(f"would fit: {fix}" if fix else "no smaller setting found")
    return "\n".join(lines)


@with_config_options
def plan(
    config: Annotated[
        Path | None, typer.Option(help="Plan a run's config.yaml; other flags override it.")
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the plan as JSON (peak_device_bytes, ...).")
    ] = False,
    **options: Any,
) -> None:
    """Estimate each stage's peak device and host memory, and the time per 1e9 tokens."""
    cfg = build_config(_placeholders({"config": config, **options}))
    budget = cfg.execution.device_memory
    meta = meta_model(cfg)
    n_queries = _count_queries(cfg)
    result = plan_run(
        cfg,
        n_queries=n_queries,
        meta=meta,
        device_memory=parse_size(budget) if budget is not None else None,
    )
    fix = None if result.fits else fitting_options(cfg, result, meta, n_queries)
    if json_out:
        print(json.dumps({**result.to_dict(), "would_fit_with": fix}, indent=2))
    else:
        print(_table(result, fix))
