"""The rich table of top results printed by the CLI."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bgotrace.ranking.result import AttributionResult

SNIPPET_CHARS = 90


def _snippet(text: str) -> str:
    flat = " ".join(text.split())
    return escape(flat if len(flat) <= SNIPPET_CHARS else flat[: SNIPPET_CHARS - 1] + "…")


def result_table(result: AttributionResult, query_id: str, granularity: str, k: int) -> Table:
    """Top-k rows of one query at one granularity, with text snippets for units."""
    top = result.top(k, query_id=query_id, granularity=granularity)
    table = Table(title=f"Top {len(top)} {granularity}s for query {query_id!r} (score in nats)")
    table.add_column("rank", justify="right")
    if granularity == "unit":
        table.add_column("score", justify="right")
        for col in ("unit", "source", "text"):
            table.add_column(col, overflow="fold")
        for r in top.itertuples():
            snippet = _snippet(result.snippets.get(str(r.unit_id), ""))
            table.add_row(
                str(r.rank),
                f"{r.score:+.4f}",
                escape(str(r.unit_id)),
                escape(str(r.source)),
                snippet,
            )
        return table
    key = "doc_id" if granularity == "document" else "source"
    for col in (key, "score_sum", "score_mean", "units"):
        table.add_column(col, justify="right" if col != key else "left")
    for r in top.itertuples():
        table.add_row(
            str(r.rank),
            escape(str(getattr(r, key))),
            f"{r.score_sum:+.4f}",
            f"{r.score_mean:+.5f}",
            str(r.n_units),
        )
    return table


def print_result(
    result: AttributionResult,
    *,
    granularity: str,
    k: int,
    out: str | None,
    console: Console | None = None,
) -> None:
    console = console or Console()
    for query_id in result.query_ids:
        console.print(result_table(result, query_id, granularity, k))
    if out is not None:
        console.print(
            f"Results written to [bold]{escape(out)}[/bold] (scores.parquet, summary.json)."
        )
