"""The result of an attribution run: data, and how to read a run directory back.

The result imports no view: the files of a run are written by the registered writers
(``bgotrace.ranking.writers``) and its notebook view is registered by ``bgotrace.report``
(:func:`register_notebook_view`), so the data model never depends on how it is shown.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from bgotrace.errors import InputError
from bgotrace.ranking.aggregate import RANK_KEY
from bgotrace.score.store import SUMMARY
from bgotrace.variants import get_variant, variant_names

TABLES = {"unit": "scores", "document": "documents", "source": "sources"}
_GROUP_KEY = {"unit": "unit_id", "document": "doc_id", "source": "source"}
_NOTEBOOK_VIEW: list[Callable[[AttributionResult], str]] = []


def score_unit(summary: dict[str, Any]) -> str:
    """The unit of the ranked score of a run with this ``summary.json``.

    BGO's raw score is a loss change in nats (per unit with reduce=sum, per token with
    mean); ``normalize=sensitivity`` divides it by the unit's gradient norm; a baseline's
    score is in that method's own units.
    """
    method = summary.get("method", "bgo")
    if method not in ("bgo", "untrac-inv", "bgo-linear"):  # the perturbation methods: nats
        return f"{method} score units"
    scoring = (summary.get("config") or {}).get("scoring") or {}
    name = scoring.get("score", "bidirectional")
    # A run of a variant registered in another session still loads; its unit is unknown here.
    unit = get_variant(name).unit if name in variant_names() else f"{name} score units"
    per = f"{unit}/token" if scoring.get("reduce") == "mean" else unit
    if scoring.get("normalize", "none") == "sensitivity":
        return f"{per} per unit of ‖∇L(z)‖"
    if scoring.get("normalize", "none") == "damped":
        return f"{per} per unit of ‖∇L(z)‖ + λ·median"
    return per


def register_notebook_view(render: Callable[[AttributionResult], str]) -> None:
    """Make ``render`` the HTML a notebook shows for a result (``bgotrace.report`` sets it)."""
    _NOTEBOOK_VIEW[:] = [render]


@dataclass
class AttributionResult:
    """Ranked scores of every unit, document and source for each query.

    Scores are signed: high = the unit supports the query. Their unit depends on the
    method and the scoring options (:attr:`score_unit`; see ``summary["config"]["scoring"]``).
    """

    scores: pd.DataFrame
    """One row per (query, unit): query_id, unit_id, doc_id, source, score, rank, losses."""
    documents: pd.DataFrame
    """One row per (query, document): score_sum, score_mean, n_units, rank (by sum)."""
    sources: pd.DataFrame
    """One row per (query, source): score_sum, score_mean, n_units, rank (by mean)."""
    top_tokens: list[dict[str, Any]] = field(default_factory=list)
    """Per-token score of each query's top units."""
    summary: dict[str, Any] = field(default_factory=dict)
    """Config, seed, corpus size, query loss trajectories, timings."""
    snippets: dict[str, str] = field(default_factory=dict)
    """Text of the top units, by unit_id."""

    @property
    def score_unit(self) -> str:
        """What a unit's score is measured in, for labels (tables, report, figures)."""
        return score_unit(self.summary)

    @property
    def query_ids(self) -> list[str]:
        """Ids of the whole-completion queries (their spans' ids are in :meth:`spans`)."""
        whole = self.scores
        if "span_id" in whole.columns:
            whole = whole[whole["span_id"] < 0]
        return list(dict.fromkeys(whole["query_id"]))

    def _resolve(self, query_id: str | None) -> str:
        if query_id is None:
            if len(self.query_ids) > 1:
                raise InputError(
                    f"This result holds {len(self.query_ids)} queries: pass query_id=... "
                    f"(one of {', '.join(self.query_ids[:5])})."
                )
            return self.query_ids[0]
        if query_id not in set(self.scores["query_id"]):
            raise InputError(f"No query {query_id!r} in this result: use one of {self.query_ids}.")
        return query_id

    def _pick(self, table: pd.DataFrame, query_id: str | None) -> pd.DataFrame:
        return table[table["query_id"] == self._resolve(query_id)]

    def spans(self, query_id: str | None = None) -> pd.DataFrame:
        """The spans of a query's completion (run with ``--spans``): one row per span.

        Columns: span_id, query_id (the span's own id in every table), span_start,
        span_end (characters of the completion) and span_text. Empty without spans.
        """
        qid = self._resolve(query_id)
        cols = ["span_id", "query_id", "span_start", "span_end", "span_text"]
        if "span_id" not in self.scores.columns:
            return pd.DataFrame(columns=cols)
        rows = self.scores[(self.scores["parent_query_id"] == qid) & (self.scores["span_id"] >= 0)]
        return rows[cols].drop_duplicates("span_id").sort_values("span_id").reset_index(drop=True)

    def span_support(self, query_id: str | None = None, k: int = 10) -> pd.DataFrame:
        """For each of a query's top-k units, the span of the completion it supports most.

        Columns: unit_id, rank, score (whole completion), best_span (span_id), best_span_score,
        and span_scores (the unit's score for each span, in span order).
        """
        top = self.top(k, query_id)
        spans = self.spans(query_id)
        if spans.empty:
            return top[["unit_id", "rank", "score"]].assign(best_span=None, best_span_score=None)
        rows = self.scores[self.scores["query_id"].isin(spans["query_id"])]
        table = rows.pivot_table(index="unit_id", columns="span_id", values="score", sort=True)
        per_unit = table.reindex(top["unit_id"])  # (k, n_spans)
        return pd.DataFrame(
            {
                "unit_id": top["unit_id"],
                "rank": top["rank"],
                "score": top["score"],
                "best_span": [int(per_unit.columns[i]) for i in per_unit.to_numpy().argmax(axis=1)],
                "best_span_score": per_unit.max(axis=1).to_numpy(),
                "span_scores": [list(map(float, r)) for r in per_unit.to_numpy()],
            }
        )

    def top(
        self, k: int = 10, query_id: str | None = None, granularity: str = "unit"
    ) -> pd.DataFrame:
        """The k highest-ranked units, documents or sources of one query."""
        if granularity not in TABLES:
            raise InputError(
                f"granularity={granularity!r} is unknown: use unit, document or source."
            )
        table = self._pick(getattr(self, TABLES[granularity]), query_id)
        # A prefiltered run (--candidates) leaves non-candidates unscored (NaN): they are in
        # the tables, never in a top-k list.
        scored = table[table[RANK_KEY.get(_GROUP_KEY[granularity], "score")].notna()]
        return scored.sort_values("rank").head(k).reset_index(drop=True)

    def by_source(self, query_id: str | None = None) -> pd.DataFrame:
        """Source-level scores of one query, best first."""
        return self._pick(self.sources, query_id).sort_values("rank").reset_index(drop=True)

    def by_document(self, query_id: str | None = None) -> pd.DataFrame:
        """Document-level scores of one query, best first."""
        return self._pick(self.documents, query_id).sort_values("rank").reset_index(drop=True)

    def _repr_html_(self) -> str | None:
        """Compact view in Jupyter, by the registered notebook view (None: the plain repr)."""
        return _NOTEBOOK_VIEW[0](self) if _NOTEBOOK_VIEW else None

    def to_pandas(self) -> pd.DataFrame:
        """All unit scores of all queries."""
        return self.scores

    @classmethod
    def load(cls, run_dir: str | Path) -> AttributionResult:
        """Read a complete run directory back."""
        root = Path(run_dir)
        if not (root / SUMMARY).is_file():
            raise InputError(
                f"{root} is not a complete run (no {SUMMARY}): rerun it, or continue it "
                "with --resume."
            )
        tables = {n: pd.read_parquet(root / f"{n}.parquet") for n in TABLES.values()}
        top_tokens = [
            json.loads(line)
            for line in (root / "top_tokens.jsonl").read_text().splitlines()
            if line.strip()
        ]
        return cls(
            **tables,
            top_tokens=top_tokens,
            summary=json.loads((root / SUMMARY).read_text()),
            snippets=json.loads((root / "snippets.json").read_text()),
        )
