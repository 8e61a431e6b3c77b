"""Collects per-query metric values and their summaries into the two result tables.

``table()`` has one row per (method, metric) — family, mean, lo, hi, n, n_nan, interval,
unit — and ``per_query()`` one row per (method, metric, query) with the values the
summaries came from. Controls that do not depend on the method are rows of their own:
``random-k`` (k random units instead of the method's top k) and ``no-removal`` (the
retrain without any removal, whose seed-to-seed spread is the noise floor).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from bgotrace.eval.metrics import MetricSummary, bootstrap_ci, paired_difference_ci

BOOTSTRAP = "95% bootstrap over queries"
T_SEEDS = "95% t over seeds (paired)"

UNITS = {
    "recall@1": "fraction",
    "recall@10": "fraction",
    "mrr": "1/rank",
    "precision@10": "fraction",
    "source_rank": "rank (1 = best)",
    "lds": "Spearman ρ",
}
"""Units of the metrics whose unit is not given when they are added."""


class Collector:
    """Accumulates rows; ``query_ids`` are the ids of the selected queries, in order."""

    def __init__(self, query_ids: Sequence[str]) -> None:
        self.query_ids = list(query_ids)
        self._rows: list[dict] = []
        self._per_query: list[pd.DataFrame] = []

    def add_summary(
        self,
        family: str,
        method: str,
        metric: str,
        summary: MetricSummary,
        *,
        interval: str = BOOTSTRAP,
        unit: str = "",
    ) -> None:
        """One table row."""
        self._rows.append(
            {"family": family, "method": method, "metric": metric, "mean": summary.mean,
             "lo": summary.lo, "hi": summary.hi, "n": summary.n, "n_nan": summary.n_nan,
             "interval": interval, "unit": unit or UNITS.get(metric, "")}
        )  # fmt: skip

    def add(
        self,
        family: str,
        method: str,
        metric: str,
        query_ids: Sequence[str],
        values: np.ndarray | Sequence[float],
        *,
        unit: str = "",
        summary: MetricSummary | None = None,
    ) -> None:
        """Per-query values (q,) and their summary (bootstrap over queries unless given)."""
        values = np.asarray(values, dtype=np.float64)
        frame = pd.DataFrame({"query_id": list(query_ids), "value": values})
        frame.insert(0, "metric", metric)
        frame.insert(0, "method", method)
        frame.insert(0, "family", family)
        self._per_query.append(frame)
        self.add_summary(family, method, metric, summary or bootstrap_ci(values), unit=unit)

    def add_long(self, family: str, method: str, table: pd.DataFrame) -> None:
        """A long table (query_id, metric, value) holding several metrics."""
        for metric, group in table.groupby("metric", sort=False):
            self.add(family, method, str(metric), group["query_id"].tolist(), group["value"])

    def add_leave_k_out(
        self,
        method: str,
        query_ids: Sequence[str],
        top: np.ndarray,
        random: np.ndarray,
        full: np.ndarray,
    ) -> None:
        """Leave-k-out rows of a method from query losses (q, n_seeds) of the three retrains.

        ``lko_increase``: loss(top-k removed) − loss(nothing removed), seed mean per query;
        ``lko_vs_random``: loss(top-k removed) − loss(random-k removed), per query;
        ``lko_vs_random_seeds``: the same averaged over queries, paired by seed (t-interval).
        Nats per loss token; positive = removing the method's units hurts the query more.
        """
        unit = "nats/token"
        self.add("leave-k-out", method, "lko_increase", query_ids, (top - full).mean(1), unit=unit)
        diff = (top - random).mean(1)
        self.add("leave-k-out", method, "lko_vs_random", query_ids, diff, unit=unit)
        seeds = paired_difference_ci(top.mean(0), random.mean(0))
        self.add_summary(
            "leave-k-out", method, "lko_vs_random_seeds", seeds, interval=T_SEEDS, unit=unit
        )

    def add_leave_k_out_controls(
        self, query_ids: Sequence[str], random: np.ndarray, full: np.ndarray
    ) -> None:
        """``random-k``: loss increase from removing k random units; ``no-removal``: the
        standard deviation of the no-removal loss across seeds (the seed-noise floor)."""
        unit = "nats/token"
        increase = (random - full).mean(1)
        self.add("leave-k-out", "random-k", "lko_increase", query_ids, increase, unit=unit)
        spread = full.std(axis=1, ddof=1)
        self.add("leave-k-out", "no-removal", "lko_seed_sd", query_ids, spread, unit=unit)

    def table(self) -> pd.DataFrame:
        columns = ["family", "method", "metric", "mean", "lo", "hi", "n", "n_nan"]
        return pd.DataFrame(self._rows, columns=[*columns, "interval", "unit"])

    def per_query(self) -> pd.DataFrame:
        if not self._per_query:
            return pd.DataFrame(columns=["family", "method", "metric", "query_id", "value"])
        return pd.concat(self._per_query, ignore_index=True)
