"""``bgotrace report``: re-render a run's HTML report from its files (no model needed).

Example::

    bgotrace report runs/q1                      # rewrites runs/q1/report.html
    bgotrace report runs/q1 --out q1.html --top-k 50
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from bgotrace.errors import InputError
from bgotrace.ranking.result import AttributionResult
from bgotrace.report.console import print_result
from bgotrace.report.html import render_report
from bgotrace.score.store import RunStore


def report(
    run: Annotated[Path, typer.Argument(help="A complete run directory (holds summary.json).")],
    out: Annotated[
        Path | None, typer.Option(help="HTML file to write (default: RUN/report.html).")
    ] = None,
    top_k: Annotated[
        int | None,
        typer.Option(help="Units listed per query and span (default: those the run kept text of)."),
    ] = None,
    show: Annotated[bool, typer.Option(help="Also print the top-10 table.")] = True,
) -> None:
    """Re-render a run's report.html from scores.parquet, top_tokens.jsonl and summary.json."""
    if top_k is not None and top_k < 1:
        raise InputError(f"--top-k must be >= 1, got {top_k}.")
    result = AttributionResult.load(run)
    html = render_report(result, k=top_k)
    target = out or run / "report.html"
    if out is None:
        RunStore(run).write_text("report.html", html)  # atomic: a reader never sees half
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(html, encoding="utf-8")
    console = Console()
    if show:
        print_result(result, granularity="unit", k=10, out=None, console=console)
    console.print(f"Report written to [bold]{escape(str(target))}[/bold].")
