"""Where BGO's finite steps pay over its first-order control (issue 15 item 3), from eval runs.

    bgotrace eval --bench B --model B/model --methods bgo,bgo-linear,fisher-graddot \\
        --metrics fact,source,tail-patch,hubs --split validation --out RUN [--option ...]
    python benchmarks/finite_steps.py RUN [RUN ...]

For each ``bgotrace eval`` output directory, prints per metric the mean of each method and
the paired differences over the same queries, BGO − bgo-linear (what the finite steps buy
over the exact linearisation of the same perturbation) and BGO − fisher-graddot (over the
Fisher-preconditioned gradient dot product), each with a 95% bootstrap CI. A difference whose
interval excludes 0 is marked ``*``. Records nothing: paste the tables into RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from bgotrace.eval.metrics import bootstrap_ci

METRICS = {
    ("fact", "mrr"): "fact MRR",
    ("fact", "recall@10"): "fact recall@10",
    ("source", "precision@10"): "source P@10",
    ("tail-patch", "tail_patch_vs_random@10"): "tail-patch vs random @10 (nats)",
    ("tail-patch", "tail_patch_ref@10"): "tail-patch ref @10 (%)",
    ("lds", "lds"): "LDS (Spearman)",
}
CONTROLS = ("bgo-linear", "fisher-graddot")


def _values(table: pd.DataFrame, family: str, metric: str, method: str) -> pd.Series:
    rows = table[(table.family == family) & (table.metric == metric) & (table.method == method)]
    return rows.set_index("query_id")["value"].dropna()


def _diff(a: pd.Series, b: pd.Series) -> str:
    both = a.index.intersection(b.index)
    if len(both) == 0:
        return "–"
    ci = bootstrap_ci((a[both] - b[both]).to_numpy())
    mark = "*" if ci.lo > 0 or ci.hi < 0 else ""
    return f"{ci.mean:+.3f} [{ci.lo:+.3f}, {ci.hi:+.3f}]{mark}"


def table_for(run: Path) -> list[str]:
    per_query = pd.read_parquet(run / "per_query.parquet")
    meta = json.loads((run / "eval.json").read_text()) if (run / "eval.json").exists() else {}
    lines = [
        f"\n`{run}` ({meta.get('split', '?')} split)\n",
        "| metric | bgo | bgo-linear | fisher-graddot | bgo − bgo-linear | bgo − fisher-graddot |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for (family, metric), label in METRICS.items():
        bgo = _values(per_query, family, metric, "bgo")
        if bgo.empty:
            continue
        controls = [_values(per_query, family, metric, m) for m in CONTROLS]
        means = [f"{v.mean():.3f}" if len(v) else "–" for v in (bgo, *controls)]
        lines.append(f"| {label} | " + " | ".join(means + [_diff(bgo, c) for c in controls]) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    for run in parser.parse_args().runs:
        print("\n".join(table_for(run)))


if __name__ == "__main__":
    main()
