"""Rankings of BGO with ``--model-dtype bfloat16`` against the float32 reference.

The same queries and corpus, BGO at the shipped defaults (Adam, K = 10, lr 1e-4,
sensitivity normaliser), once in float32 and once with the weights, the perturbation's
working copy and moments (``bgotrace.perturb.lowp``) and the sweep in bfloat16. Per query:
Spearman over units and top-10 overlap with the float32 ranking; and on both, fact MRR
(first relevant document, documents ranked by their best unit) and source precision@10.
CPU, one thread::

    bgotrace bench build --out /tmp/bench-cpu --bench-preset cpu --preset test
    OMP_NUM_THREADS=1 python benchmarks/model_dtype.py --bench /tmp/bench-cpu \\
        --model /tmp/bench-cpu/model --queries 24 [--record]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from bgotrace.api import attribute
from bgotrace.query import Query


def _queries(bench: Path, n: int) -> tuple[list[Query], list[dict[str, Any]]]:
    rows = [json.loads(line) for line in (bench / "queries.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("split") == "validation"][:n]
    queries = [Query(r["id"], r["prompt"], r["completion"], loss_on=r["loss_on"]) for r in rows]
    return queries, rows


def _run(bench: Path, model: Path, queries: list[Query], dtype: str) -> tuple[pd.DataFrame, float]:
    config = {"model": {"dtype": dtype}, "scoring": {"dtype": dtype},
              "execution": {"device": "cpu"}}  # fmt: skip
    started = time.perf_counter()
    result = attribute(str(model), None, str(bench / "corpus.jsonl"), queries=queries,
                       config=config)  # fmt: skip
    return result.scores, time.perf_counter() - started


def _quality(scores: pd.DataFrame, row: dict[str, Any]) -> dict[str, float]:
    mine = scores[scores["query_id"] == row["id"]].sort_values("score", ascending=False)
    out = {"source_p@10": float((mine["source"].head(10) == row["true_source"]).mean())}
    if row["kind"] == "fact":
        docs = mine.groupby("doc_id")["score"].max().sort_values(ascending=False)
        ranks = [i + 1 for i, d in enumerate(docs.index) if d in set(row["relevant_doc_ids"])]
        out["fact_mrr"] = 1.0 / ranks[0] if ranks else 0.0
    return out


def compare(reference: pd.DataFrame, other: pd.DataFrame, rows: list[dict]) -> pd.DataFrame:
    table = []
    for row in rows:
        ref = reference[reference["query_id"] == row["id"]].set_index("unit_id")["score"]
        oth = other[other["query_id"] == row["id"]].set_index("unit_id")["score"]
        ref, oth = ref.align(oth)
        top_ref, top_oth = set(ref.nlargest(10).index), set(oth.nlargest(10).index)
        q32, q16 = _quality(reference, row), _quality(other, row)
        table.append({
            "query": row["id"], "kind": row["kind"],
            "spearman": float(spearmanr(ref, oth).statistic),
            "top10_overlap": len(top_ref & top_oth) / 10,
            **{f"{k} float32": v for k, v in q32.items()},
            **{f"{k} bfloat16": v for k, v in q16.items()},
        })  # fmt: skip
    return pd.DataFrame(table)


def _ci(values: np.ndarray, draws: int = 10_000) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean over queries (seeded)."""
    rng = np.random.default_rng(0)
    means = values[rng.integers(0, len(values), (draws, len(values)))].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def _summary(table: pd.DataFrame, seconds: dict[str, float], command: str) -> str:
    cols = [c for c in table.columns if c not in ("query", "kind")]
    lines = [f"`{command}`", "", "| measure | mean [95% CI] | min | n |", "|---|---|---|---|"]
    for c in cols:
        values = table[c].dropna().to_numpy()
        lo, hi = _ci(values)
        lines.append(f"| {c} | {values.mean():.3f} [{lo:.3f}, {hi:.3f}] | {values.min():.3f} "
                     f"| {len(values)} |")  # fmt: skip
    for metric in ("fact_mrr", "source_p@10"):
        pair = table[[f"{metric} bfloat16", f"{metric} float32"]].dropna().to_numpy()
        lo, hi = _ci(pair[:, 0] - pair[:, 1])
        diff = float((pair[:, 0] - pair[:, 1]).mean())
        lines.append(f"| {metric} bfloat16 − float32 (paired) | {diff:+.3f} [{lo:+.3f}, "
                     f"{hi:+.3f}] | | {len(pair)} |")  # fmt: skip
    times = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
    lines += ["", f"wall time (attribute call, one thread): {times}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--bench", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--queries", type=int, default=24)
    parser.add_argument("--record", action="store_true", help="Append to RESULTS.md.")
    args = parser.parse_args()
    queries, rows = _queries(args.bench, args.queries)
    ref, t32 = _run(args.bench, args.model, queries, "float32")
    half, t16 = _run(args.bench, args.model, queries, "bfloat16")
    table = compare(ref, half, rows)
    command = (f"OMP_NUM_THREADS=1 python benchmarks/model_dtype.py --bench {args.bench} "
               f"--model {args.model} --queries {args.queries}")  # fmt: skip
    text = _summary(table, {"float32": t32, "bfloat16": t16}, command)
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    print(text)
    if args.record:
        with Path(__file__).with_name("RESULTS.md").open("a", encoding="utf-8") as f:
            f.write("\n## --model-dtype bfloat16 vs float32: ranking agreement (issue 14)\n\n"
                    f"{text}\n")  # fmt: skip


if __name__ == "__main__":
    main()
