"""A self-contained HTML report of a run: the query and its spans, top units with
per-token colouring, documents, sources, figures, and the config that replays it.

Every training text goes through Jinja2's autoescaping: a corpus can hold any
markup, and a report must never execute it. The page also carries a Content Security
Policy that allows no script and no network at all, so even a template mistake could
not run a corpus's markup or fetch anything.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from jinja2 import Environment, PackageLoader, select_autoescape

from bgotrace.ranking.result import AttributionResult, register_notebook_view
from bgotrace.ranking.writers import Writer, register_writer
from bgotrace.report import figures
from bgotrace.variants import get_variant, variant_names

MAX_FIGURE_QUERIES = 20
"""Queries that get figures; later ones keep their tables (figures cost ~0.1 s each)."""


@cache
def environment() -> Environment:
    return Environment(
        loader=PackageLoader("bgotrace.report", "templates"),
        autoescape=select_autoescape(["html", "j2"], default=True),
    )


def _colour(score: float, scale: float) -> str:
    """Green for tokens that support the query, red for opposing ones."""
    alpha = min(abs(score) / scale, 1.0) * 0.6 if scale > 0 else 0.0
    rgb = "40,160,60" if score >= 0 else "210,50,50"
    return f"rgba({rgb},{alpha:.3f})"


def _token_cells(row: dict[str, Any]) -> list[dict[str, str]]:
    """Each token with its colour; an SFT conversation unit's tokens outside its loss
    (``token_in_loss``: the non-assistant turns) stay uncoloured and out of the scale."""
    scores = [0.0, *row["token_scores"]]  # the first token is not predicted
    in_loss = row.get("token_in_loss") or [True] * len(scores)
    coloured = [s for s, m in zip(scores, in_loss, strict=True) if m] or [0.0]
    # A high quantile, not the max: the first predicted tokens of a unit often carry a
    # large change that would leave every other token uncoloured.
    scale = float(np.quantile(np.abs(coloured), 0.95)) if len(scores) > 1 else 0.0
    return [
        {"text": t, "colour": _colour(s, scale), "title": f"{s:+.5f} nats"}
        if m
        else {"text": t, "colour": "transparent", "title": "not in the unit's loss"}
        for t, s, m in zip(row["tokens"], scores, in_loss, strict=True)
    ]


def _turn_groups(row: dict[str, Any], cells: list[dict[str, str]]) -> list[dict[str, Any]]:
    """The cells of an SFT conversation unit grouped by turn, each with its index and role
    ([] for a plain-text unit)."""
    groups: list[dict[str, Any]] = []
    if "token_turns" not in row:
        return groups
    for cell, turn, role in zip(cells, row["token_turns"], row["token_roles"], strict=True):
        if not groups or groups[-1]["turn"] != turn:
            groups.append({"turn": turn, "role": role, "tokens": []})
        groups[-1]["tokens"].append(cell)
    return groups


def _unit_view(row: Any, tokens: dict[str, Any] | None, snippet: str) -> dict[str, Any]:
    cells = _token_cells(tokens) if tokens is not None else None
    return {
        "rank": row.rank,
        "score": row.score,
        "unit_id": row.unit_id,
        "doc_id": row.doc_id,
        "source": row.source,
        "turns": getattr(row, "turns", ""),
        "snippet": snippet,
        "tokens": cells,
        "turn_groups": _turn_groups(tokens, cells) if tokens and cells else [],
    }


def _unit_rows(result: AttributionResult, qid: str, k: int) -> list[dict[str, Any]]:
    tokens = {r["unit_id"]: r for r in result.top_tokens if r["query_id"] == qid}
    return [
        _unit_view(r, tokens.get(r.unit_id), result.snippets.get(str(r.unit_id), ""))
        for r in result.top(k, query_id=qid).itertuples()
    ]


def _span_views(
    result: AttributionResult, query: dict[str, Any], k: int, anchor: str
) -> list[dict[str, Any]]:
    return [
        {
            **span,
            "anchor": f"{anchor}-s{span['span_id']}",
            "units": _unit_rows(result, span["query_id"], k),
        }
        for span in query.get("spans", [])
    ]


def _figures(result: AttributionResult, query: dict[str, Any], shown: list[float]) -> dict:
    qid = query["query_id"]
    rows = result.scores[result.scores["query_id"] == qid]
    positive = rows[rows["score"] > 0].groupby("source")["score"].sum()
    out = {
        "distribution": figures.score_distribution(
            rows["score"].to_numpy(), shown, result.score_unit
        )
    }
    if len(positive):
        out["sources"] = figures.source_shares(positive)
    trajectories = query.get("loss_trajectories") or {}
    if trajectories:
        spans = [s.get("loss_trajectories") or {} for s in query.get("spans", [])]
        out["trajectories"] = figures.loss_trajectories(trajectories, spans)
    return out


def _query_view(
    result: AttributionResult, query: dict[str, Any], k: int, index: int
) -> dict[str, Any]:
    qid, anchor = query["query_id"], f"q{index}"
    units = _unit_rows(result, qid, k)
    spans = _span_views(result, query, k, anchor)
    best = {r["unit_id"]: r.get("best_span") for r in query.get("top_unit_spans", [])}
    by_id = {s["span_id"]: s for s in spans}
    for u in units:
        u["best_span"] = by_id.get(best.get(u["unit_id"]))
    traj = query.get("loss_trajectories") or {}
    return {
        **query,
        "anchor": anchor,
        "units": units,
        "span_views": spans,
        "documents": result.by_document(qid).head(k).to_dict("records"),
        "sources": result.by_source(qid).to_dict("records"),
        "descent": _first_last(traj.get("descent")),
        "ascent": _first_last(traj.get("ascent")),
        "calibration_text": calibration_text(query.get("calibration")),
        "linearity_text": linearity_text(query.get("linearity")),
        "figures": _figures(result, query, [u["score"] for u in units])
        if index < MAX_FIGURE_QUERIES
        else {},
    }


def linearity_text(linearity: Any) -> str:
    """One line from a query's first-order check (empty when it was not computed)."""
    if not isinstance(linearity, dict) or linearity.get("spearman") is None:
        return ""
    return (
        f"Spearman {linearity['spearman']:.3f}, top-10 overlap "
        f"{linearity['top10_overlap']:.2f} with the first-order control ∇L(z;θ0)·(θ−−θ+) on "
        f"{linearity['n_sample']} sampled units (1.0 and 1.0: the finite steps changed nothing)"
    )


def calibration_text(calibration: Any) -> str:
    """One line from a query's step-size calibration: its scalar fields (the trials stay in
    summary.json)."""
    if not isinstance(calibration, dict):
        return "" if calibration is None else str(calibration)
    parts = [
        f"{key} = {value:.3g}" if isinstance(value, float) else f"{key} = {value}"
        for key, value in calibration.items()
        if isinstance(value, (str, int, float, bool)) and key != "seconds"
    ]
    return " · ".join(parts)


def _first_last(trajectory: list[float] | None) -> str:
    return f"{trajectory[0]:.3f} → {trajectory[-1]:.3f}" if trajectory else "not computed"


def replay_command(config: dict[str, Any]) -> str:
    """The shell command that reruns a run from its directory."""
    out = (config.get("output") or {}).get("out")
    paths = [str((config.get(s) or {}).get("path", "")) for s in ("model", "corpus")]
    if out is None or any(p.startswith("<") for p in paths):
        return "(in-memory model, corpus or queries: rerun it through the Python API)"
    return f"bgotrace attribute --config {out}/config.yaml --overwrite"


def _queries_of(result: AttributionResult) -> list[dict[str, Any]]:
    queries = result.summary.get("queries")
    return list(queries) if queries else [{"query_id": q} for q in result.query_ids]


def _shown(config: dict[str, Any]) -> int:
    """Units per list: as many as the run kept text for (``max(top_k, top_tokens)``)."""
    output = config.get("output") or {}
    return max(int(output.get("top_k", 10)), int(output.get("top_tokens", 20)))


def render_report(
    result: AttributionResult, queries: list[dict[str, Any]] | None = None, k: int | None = None
) -> str:
    """HTML for a result; ``queries`` are summary entries (default: the result's summary).

    ``k`` units are listed per query and span (default: those whose text the run kept).
    """
    config = result.summary.get("config", {})
    queries = _queries_of(result) if queries is None else queries
    k = _shown(config) if k is None else k
    return (
        environment()
        .get_template("report.html.j2")
        .render(
            summary=result.summary,
            config=config,
            config_yaml=yaml.safe_dump(config, sort_keys=False) if config else "",
            command=replay_command(config),
            warnings=[str(w) for w in result.summary.get("warnings") or []],
            score_unit=result.score_unit,
            score_formula=score_formula(config),
            queries=[_query_view(result, q, k, i) for i, q in enumerate(queries)],
        )
    )


def score_formula(config: dict[str, Any]) -> str:
    """The run's score formula, from the variant registry (``bgotrace.variants``)."""
    name = (config.get("scoring") or {}).get("score", "bidirectional")
    # A run of a variant registered in another session still renders, under its name.
    return get_variant(name).formula if name in variant_names() else f"score variant {name}"


def write_report(result: AttributionResult, path: Path) -> None:
    """The ``report.html`` writer."""
    path.write_text(render_report(result), encoding="utf-8")


SNIPPET_CHARS = 120


def _compact_query(result: AttributionResult, query: dict[str, Any], k: int) -> dict[str, Any]:
    qid = query["query_id"]
    spans = {s["span_id"]: s.get("text", "") for s in query.get("spans", [])}
    best = {r["unit_id"]: r.get("best_span") for r in query.get("top_unit_spans", [])}
    units = []
    for r in result.top(k, query_id=qid).itertuples():
        text = " ".join(result.snippets.get(str(r.unit_id), "").split())
        span = best.get(r.unit_id)
        units.append(
            {
                "rank": r.rank,
                "score": r.score,
                "unit_id": r.unit_id,
                "source": r.source,
                "snippet": text[:SNIPPET_CHARS] + ("…" if len(text) > SNIPPET_CHARS else ""),
                "best_span": f"{span}: {spans.get(span, '').strip()}" if span is not None else "",
            }
        )
    return {
        **query,
        "spans": spans,
        "units": units,
        "sources": result.by_source(qid).head(3).to_dict("records"),
    }


def render_compact(result: AttributionResult, k: int = 5, max_queries: int = 5) -> str:
    """The notebook view: each query's top-k units and top sources in one small table."""
    queries = _queries_of(result)
    template = environment().get_template("notebook.html.j2")
    return template.render(
        method=result.summary.get("method", ""),
        score_unit=result.score_unit,
        n_units=(result.summary.get("corpus") or {}).get("n_units", ""),
        n_queries=len(queries),
        more=len(queries) > max_queries,
        queries=[_compact_query(result, q, k) for q in queries[:max_queries]],
    )


REPORT_WRITER = register_writer(Writer("html", "report.html", write_report))
register_notebook_view(render_compact)
