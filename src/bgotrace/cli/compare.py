"""``bgotrace compare``: two runs side by side (overlap@k, Spearman over units, top lists).

Example (BGO against a baseline on the same corpus and query)::

    bgotrace attribute --config runs/q1/config.yaml --method bm25 --out runs/q1-bm25
    bgotrace compare runs/q1 runs/q1-bm25 --k 10
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from bgotrace.errors import InputError
from bgotrace.ranking.result import AttributionResult
from bgotrace.report.compare import compare_results, method_label
from bgotrace.report.console import comparison_table


def compare(
    run_a: Annotated[Path, typer.Argument(help="First run directory (A).")],
    run_b: Annotated[Path, typer.Argument(help="Second run directory (B).")],
    k: Annotated[int, typer.Option(help="Size of the top lists compared.")] = 10,
    query: Annotated[
        str | None, typer.Option(help="Query id to compare (default: every shared one).")
    ] = None,
    query_b: Annotated[
        str | None,
        typer.Option(help="B's query id to compare with A's --query, where the ids differ."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the metrics as JSON instead of tables.")
    ] = False,
) -> None:
    """Compare two runs' rankings: overlap of the top-k units and Spearman over all units."""
    if k < 1:
        raise InputError(f"--k must be >= 1, got {k}.")
    a, b = AttributionResult.load(run_a), AttributionResult.load(run_b)
    comparisons = compare_results(a, b, k=k, query_id=query, query_b=query_b)
    if as_json:
        print(json.dumps([c.to_dict() for c in comparisons], indent=2))
        return
    console = Console()
    console.print(f"A = {run_a} ({method_label(a)})\nB = {run_b} ({method_label(b)})", markup=False)
    for c in comparisons:
        console.print(
            comparison_table(c, str(a.summary.get("method")), str(b.summary.get("method")))
        )
    console.print("* = also in the other run's top list", style="dim")
