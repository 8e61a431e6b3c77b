"""A self-contained HTML report of a run: top units with per-token colouring, sources.

Every training text goes through Jinja2's autoescaping: a corpus can hold any
markup, and a report must never execute it.
"""

from __future__ import annotations

from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from bgotrace.ranking.result import AttributionResult

FORMULAS = {
    "bidirectional": "L(z; θ−) − L(z; θ+)",
    "ascent": "L(z; θ−) − L(z; θ0)",
    "descent": "L(z; θ0) − L(z; θ+)",
    "abs": "|L(z; θ−) − L(z; θ+)|",
}


def _colour(score: float, scale: float) -> str:
    """Green for tokens that support the query, red for opposing ones."""
    alpha = min(abs(score) / scale, 1.0) * 0.6 if scale > 0 else 0.0
    rgb = "40,160,60" if score >= 0 else "210,50,50"
    return f"rgba({rgb},{alpha:.3f})"


def _token_cells(row: dict[str, Any]) -> list[dict[str, str]]:
    scores = [0.0, *row["token_scores"]]  # the first token is not predicted
    scale = max((abs(s) for s in scores), default=0.0)
    return [
        {"text": t, "colour": _colour(s, scale), "title": f"{s:+.5f} nats"}
        for t, s in zip(row["tokens"], scores, strict=True)
    ]


def _query_view(result: AttributionResult, query: dict[str, Any], k: int) -> dict[str, Any]:
    qid = query["query_id"]
    tokens = {r["unit_id"]: r for r in result.top_tokens if r["query_id"] == qid}
    units = [
        {
            "rank": r.rank,
            "score": r.score,
            "unit_id": r.unit_id,
            "source": r.source,
            "snippet": result.snippets.get(str(r.unit_id), ""),
            "tokens": _token_cells(tokens[r.unit_id]) if r.unit_id in tokens else None,
        }
        for r in result.top(k, query_id=qid).itertuples()
    ]
    traj = query.get("loss_trajectories", {})
    return {
        **query,
        "units": units,
        "sources": result.by_source(qid).to_dict("records"),
        "descent": _first_last(traj.get("descent")),
        "ascent": _first_last(traj.get("ascent")),
    }


def _first_last(trajectory: list[float] | None) -> str:
    return f"{trajectory[0]:.3f} → {trajectory[-1]:.3f}" if trajectory else "not computed"


def render_report(result: AttributionResult, queries: list[dict[str, Any]], k: int = 20) -> str:
    """HTML for a result; ``queries`` carry query_id, prompt, completion, loss_trajectories."""
    env = Environment(
        loader=PackageLoader("bgotrace.report", "templates"),
        autoescape=select_autoescape(["html", "j2"], default=True),
    )
    config = result.summary.get("config", {})
    return env.get_template("report.html.j2").render(
        summary=result.summary,
        config=config,
        score_formula=FORMULAS[config.get("scoring", {}).get("score", "bidirectional")],
        queries=[_query_view(result, q, k) for q in queries],
    )
