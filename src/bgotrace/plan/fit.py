"""Refuse a run that cannot fit, before its weights are loaded, and say what would fit.

``attribute`` calls :func:`check_memory` first; the options it suggests are computed, not
guessed: each alternative config is planned in turn and the first that fits is named.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

from bgotrace.config import AttributeConfig
from bgotrace.devices import parse_size
from bgotrace.errors import BgotraceError
from bgotrace.plan.estimate import Plan, meta_model, plan_run
from bgotrace.plan.shape import MetaModel

log = logging.getLogger(__name__)


class InsufficientMemoryError(BgotraceError):
    """The run's estimated peak memory exceeds what its device has."""


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def human(n: int) -> str:
    """Bytes in GiB, MiB or KiB, whichever keeps one decimal meaningful."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def _with(config: AttributeConfig, section: str, **values: object) -> AttributeConfig:
    return dataclasses.replace(
        config, **{section: dataclasses.replace(getattr(config, section), **values)}
    )


def _alternatives(config: AttributeConfig, plan: Plan) -> Iterator[tuple[str, AttributeConfig]]:
    """Single changes first (fewer queries per sweep, smaller batches, fewer blocks, half
    precision), then half precision combined with each of the others."""
    q, b = plan.run.queries_per_sweep, plan.run.batch_size
    changes = [
        ("scoring", "queries_per_sweep", n, f"--queries-per-sweep {n}")
        for n in sorted({max(1, q // 2**k) for k in range(1, 6)} - {q}, reverse=True)
    ]
    tokens = config.scoring.batch_tokens  # when set, it sizes the batches, not --batch-size
    name, now, least = (
        ("batch_tokens", tokens, plan.run.unit_length) if tokens else ("batch_size", b, 1)
    )
    changes += [
        ("scoring", name, n, f"--{name.replace('_', '-')} {n}")
        for n in sorted({max(least, now // 2**k) for k in range(1, 5)} - {now}, reverse=True)
    ]
    changes += [
        ("perturb", "params", f"last:{n}", f"--params last:{n}")
        for n in range(plan.model.layers - 1, 0, -1)
    ]
    for section, name, value, flags in changes:
        yield flags, _with(config, section, **{name: value})
    if config.model.dtype != "float32":
        return
    half = _with(_with(config, "model", dtype="bfloat16"), "scoring", dtype="bfloat16")
    yield "--model-dtype bfloat16 --dtype bfloat16", half
    for section, name, value, flags in changes:
        yield (
            f"--model-dtype bfloat16 --dtype bfloat16 {flags}",
            _with(half, section, **{name: value}),
        )


def fitting_options(
    config: AttributeConfig, plan: Plan, meta: MetaModel, n_queries: int | None
) -> str | None:
    """The first alternative of :func:`_alternatives` whose plan fits, as flags."""
    for flags, changed in _alternatives(config, plan):
        try:
            other = plan_run(
                changed, n_queries=n_queries, device_memory=plan.device_memory, meta=meta
            )
        except BgotraceError:  # e.g. last:N on a model without numbered blocks
            continue
        if other.fits:
            return flags
    return None


def check_memory(config: AttributeConfig, n_queries: int | None = None) -> Plan | None:
    """The run's plan; raises :class:`InsufficientMemoryError` when it does not fit.

    None when the model's config cannot be planned (a missing or damaged directory, an
    architecture that is not a causal LM, a selection that matches nothing): the loader that
    runs next reports those with its own, more specific message.
    """
    budget = config.execution.device_memory
    try:
        meta = meta_model(config)
        meta.shape(config.perturb.params)
    except (BgotraceError, ValueError, OSError) as err:
        log.info("memory plan skipped: %s", err)
        return None
    plan = plan_run(
        config, n_queries=n_queries, meta=meta,
        device_memory=parse_size(budget) if budget is not None else None,
    )  # fmt: skip
    if plan.fits:
        return plan
    peak = max(plan.stages, key=lambda s: s.device_bytes).name
    fix = fitting_options(config, plan, meta, n_queries)
    advice = f"pass {fix}" if fix else "no smaller setting found: use a device with more memory"
    raise InsufficientMemoryError(
        f"This run needs about {human(plan.needed_bytes)} on {plan.device} (largest stage: "
        f"{peak}) but the device has {human(plan.device_memory)}: {advice} "
        "(`bgotrace plan` shows every stage; --device-memory overrides the device's size)."
    )
