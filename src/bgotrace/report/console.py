"""The rich tables the CLI prints: one line per row, readable at 80 columns.

Every text cell is a single line cut with an ellipsis to what the terminal leaves
after the numbers; ids and sources are capped so a long one cannot push the text out.
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bgotrace.ranking.result import AttributionResult
from bgotrace.ranking.writers import selected_writers
from bgotrace.report.compare import Comparison, finite

ID_WIDTH = 18
"""Widest unit/document id shown (longer ones end in …)."""
SOURCE_WIDTH = 12


def _flat(text: str) -> str:
    return escape(" ".join(str(text).split()))


def _table(title: str) -> Table:
    return Table(title=title, expand=True, pad_edge=False, show_edge=False, title_justify="left")


def _cut(table: Table, name: str, width: int | None = None, ratio: int | None = None) -> None:
    """A one-line column: text beyond its width ends in an ellipsis instead of wrapping."""
    table.add_column(name, no_wrap=True, overflow="ellipsis", max_width=width, ratio=ratio)


def _num(table: Table, name: str) -> None:
    table.add_column(name, justify="right", no_wrap=True)


def unit_table(result: AttributionResult, query_id: str, k: int, title: str = "") -> Table:
    top = result.top(k, query_id=query_id)
    table = _table(
        title or f"Top {len(top)} units for query {query_id!r} (score in {result.score_unit})"
    )
    _num(table, "rank")
    _num(table, "score")
    _cut(table, "unit", ID_WIDTH)
    _cut(table, "source", SOURCE_WIDTH)
    _cut(table, "text", ratio=1)
    for r in top.itertuples():
        table.add_row(
            str(r.rank),
            f"{r.score:+.4f}",
            _flat(r.unit_id),
            _flat(r.source),
            _flat(result.snippets.get(str(r.unit_id), "")),
        )
    return table


def group_table(result: AttributionResult, query_id: str, granularity: str, k: int) -> Table:
    """Top documents or sources of one query."""
    top = result.top(k, query_id=query_id, granularity=granularity)
    key = "doc_id" if granularity == "document" else "source"
    table = _table(
        f"Top {len(top)} {granularity}s for query {query_id!r} (score in {result.score_unit})"
    )
    _num(table, "rank")
    _cut(table, granularity, ratio=1)
    for col in ("sum", "mean", "units"):
        _num(table, col)
    for r in top.itertuples():
        table.add_row(
            str(r.rank),
            _flat(getattr(r, key)),
            f"{r.score_sum:+.4f}",
            f"{r.score_mean:+.5f}",
            str(r.n_units),
        )
    return table


def result_table(result: AttributionResult, query_id: str, granularity: str, k: int) -> Table:
    """Top-k rows of one query at one granularity, with text snippets for units."""
    if granularity == "unit":
        return unit_table(result, query_id, k)
    return group_table(result, query_id, granularity, k)


def span_table(result: AttributionResult, query_id: str, k: int = 3) -> Table | None:
    """One line per span of the completion: its text and its best units (None without spans)."""
    spans = result.spans(query_id)
    if spans.empty:
        return None
    table = _table(f"Spans of query {query_id!r}: each span's top {k} units")
    _num(table, "span")
    _cut(table, "text", ratio=1)
    _cut(table, "top units", ratio=1)
    for s in spans.itertuples():
        top = result.top(k, query_id=s.query_id)["unit_id"]
        table.add_row(str(s.span_id), _flat(s.span_text), _flat(", ".join(map(str, top))))
    return table


def comparison_table(comparison: Comparison, label_a: str, label_b: str) -> Table:
    """Run A's and run B's top lists side by side, with their agreement in the title."""
    c = comparison
    title = (
        f"Query {c.query_id!r}: overlap@{c.k} {c.overlap:.2f} · Spearman {finite(c.spearman)} "
        f"over {c.n_common} units"
    )
    table = _table(title)
    _num(table, "rank")
    _cut(table, f"A: {label_a}", ratio=1)
    _num(table, "score A")
    _cut(table, f"B: {label_b}", ratio=1)
    _num(table, "score B")
    top_b = set(c.top_b["unit_id"])
    top_a = set(c.top_a["unit_id"])
    for i in range(max(len(c.top_a), len(c.top_b))):
        a = c.top_a.iloc[i] if i < len(c.top_a) else None
        b = c.top_b.iloc[i] if i < len(c.top_b) else None
        table.add_row(
            str(i + 1),
            _marked(a, top_b),
            f"{a['score']:+.4f}" if a is not None else "",
            _marked(b, top_a),
            f"{b['score']:+.4f}" if b is not None else "",
        )
    return table


def _marked(row, other: set) -> str:
    """The unit id, starred when the other run's top list holds it too."""
    if row is None:
        return ""
    star = "* " if row["unit_id"] in other else "  "
    return star + _flat(row["unit_id"])


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
        spans = span_table(result, query_id)
        if spans is not None:
            console.print(spans)
    if out is not None:
        formats = ((result.summary.get("config") or {}).get("output") or {}).get("formats", "")
        extra = [w.filename for w in selected_writers(formats or "") if not w.default]
        files = ", ".join(["scores.parquet", "summary.json", "report.html", *extra])
        console.print(f"Results written to [bold]{escape(out)}[/bold] ({escape(files)}).")
