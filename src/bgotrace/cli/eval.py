"""``bgotrace eval``: score attribution methods against a benchmark's ground truth.

CPU example (seconds on a ``--quick`` benchmark)::

    bgotrace eval --bench bench/quick --model bench/quick/model --methods bgo,bm25 \\
        --metrics fact,source,tail-patch,leave-k-out,lds --split test --out runs/eval

Options not exposed as flags go through ``--option KEY=VALUE`` (repeatable; values are
JSON, anything else is a string): ``bgo.lr=1e-3`` sets a method option,
``tail_patch.optimizer=adam``, ``leave_k_out.max_queries=4`` or ``lds.n_subsets=64`` a
metric option, ``doc_reduce=sum`` an evaluation option (fields of
:class:`bgotrace.eval.runner.EvalOptions`).
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from rich.console import Console

from bgotrace.errors import ConfigError
from bgotrace.eval.report import family_table
from bgotrace.eval.runner import METRICS, EvalResult, run_eval
from bgotrace.runtime.progress import set_progress

OptionPairs = Annotated[
    list[str] | None,
    typer.Option("--option", help="KEY=VALUE, e.g. bgo.lr=1e-3 (repeatable).", show_default=False),
]
"""The repeatable ``--option KEY=VALUE`` of ``eval`` and ``bench run``."""

SECTIONS = ("tail_patch", "leave_k_out", "lds")


def split_list(text: str, what: str) -> list[str]:
    """``"a, b"`` → ``["a", "b"]``; an empty list is an error naming ``what``."""
    items = [part.strip() for part in text.split(",") if part.strip()]
    if not items:
        raise ConfigError(f"--{what} is empty: give a comma-separated list.")
    return items


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in split_list(text, what))
    except ValueError:
        raise ConfigError(f"--{what} must be comma-separated integers, got {text!r}.") from None


def parse_value(raw: str) -> Any:
    """A JSON value (``1e-3``, ``true``, ``[1, 5]``, ``null``), else the raw string."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``["bgo.lr=1e-3", "lds.n_subsets=8", "doc_reduce=sum"]`` → nested option dict."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--option {pair!r} is not KEY=VALUE: e.g. --option bgo.lr=1e-3.")
        value = parse_value(raw)
        head, dot, rest = key.strip().partition(".")
        if not dot:
            options[head] = value
        elif head in SECTIONS:
            options.setdefault(head, {})[rest] = value
        else:  # a method name
            options.setdefault("method_options", {}).setdefault(head, {})[rest] = value
    return options


def merge_flags(options: dict[str, Any], **flags: Any) -> dict[str, Any]:
    """Add the dedicated flags (``section__field`` or ``field``) that were given."""
    for name, value in flags.items():
        if value is None:
            continue
        section, _, field = name.partition("__")
        if field:
            options.setdefault(section, {})[field] = value
        else:
            options[section] = value
    return options


def print_result(result: EvalResult) -> None:
    """The per-family tables on stdout, and where the files went on stderr."""
    for family in METRICS:  # plain echo: a rich console would wrap the wide tables
        if (result.table["family"] == family).any():
            typer.echo(f"## {family}\n\n{family_table(result.table, family)}")
    errors = Console(stderr=True)
    for note in result.record["notes"]:
        errors.print(f"note: {note}", markup=False)
    if result.out is not None:
        errors.print(f"wrote results to [bold]{result.out}")


def eval_command(
    bench: Annotated[str, typer.Option(help="Benchmark directory (`bgotrace bench build`).")],
    model: Annotated[str, typer.Option(help="Model directory trained on the benchmark corpus.")],
    out: Annotated[
        str | None, typer.Option(help="Directory for results.{csv,md,png}, per_query.parquet.")
    ] = None,
    methods: Annotated[str, typer.Option(help="Comma-separated methods, or all.")] = "all",
    metrics: Annotated[
        str, typer.Option(help=f"Comma-separated metrics from {', '.join(METRICS)}, or all.")
    ] = "all",
    split: Annotated[str, typer.Option(help="Queries: validation, test or all.")] = "test",
    seeds: Annotated[str, typer.Option(help="Leave-k-out retraining seeds.")] = "0,1,2",
    max_queries: Annotated[
        int | None, typer.Option(help="Use at most this many queries.", show_default=False)
    ] = None,
    tail_patch_k: Annotated[
        str | None, typer.Option(help="Tail-patch k values (default 1,5,10).", show_default=False)
    ] = None,
    tail_patch_lr: Annotated[
        float | None,
        typer.Option(help="Tail-patch step size (default sgd 1e-2).", show_default=False),
    ] = None,
    lko_k: Annotated[
        int | None,
        typer.Option(help="Units removed in leave-k-out (default 10).", show_default=False),
    ] = None,
    lko_queries: Annotated[
        int | None, typer.Option(help="Leave-k-out queries (default 8).", show_default=False)
    ] = None,
    lds_subsets: Annotated[
        int | None,
        typer.Option(help="LDS subsets, one retrain each (default 32).", show_default=False),
    ] = None,
    option: OptionPairs = None,
    device: Annotated[str, typer.Option(help="cpu, cuda[:N] or auto.")] = "cpu",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out directory.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Evaluate attribution methods on a benchmark: fact, source, tail-patch, leave-k-out, LDS."""
    set_progress(not quiet)
    options = merge_flags(
        parse_options(option or []), device=device, max_queries=max_queries,
        progress=not quiet, tail_patch__lr=tail_patch_lr, leave_k_out__k=lko_k,
        leave_k_out__max_queries=lko_queries, lds__n_subsets=lds_subsets,
        tail_patch__ks=parse_ints(tail_patch_k, "tail-patch-k") if tail_patch_k else None,
    )  # fmt: skip
    result = run_eval(
        bench, model, split_list(methods, "methods"), split_list(metrics, "metrics"),
        split=split, seeds=parse_ints(seeds, "seeds"), out=out, options=options,
        overwrite=overwrite, command=shlex.join(["bgotrace", *sys.argv[1:]]),
    )  # fmt: skip
    print_result(result)
