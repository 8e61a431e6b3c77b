"""Writing an evaluation: tables, plot and run record, all-or-nothing.

Files in the output directory:

``results.csv``        one row per (method, metric): family, mean, lo, hi, n, n_nan, interval, unit
``results.md``         one method × metric table per metric family, cells ``mean [lo, hi]``
``per_query.parquet``  one row per (method, metric, query): the values behind each summary
``results.png``        the headline metric of each family, bars with 95% intervals
``scores.npz``         each method's scores (q, n_units) plus ``query_ids``
``eval.json``          command, versions, seeds, options, eligible queries, notes, wall times

Everything is written into ``<out>.part`` and renamed when complete.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from bgotrace.errors import RunDirectoryError

if TYPE_CHECKING:
    from bgotrace.eval.runner import EvalResult

FAMILIES = ("fact", "source", "tail-patch", "leave-k-out", "lds", "hubs")
HEADLINES = ("mrr", "recall@10", "precision@10", "tail_patch_vs_random@", "lko_vs_random", "lds")
"""Metrics shown in the plot (a trailing ``@`` matches the largest k)."""


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse an existing output directory unless ``overwrite``."""
    if out.exists() and not overwrite:
        raise RunDirectoryError(f"Output directory {out} exists: use --overwrite or another --out.")


def _cell(row: pd.Series) -> str:
    if not math.isfinite(row["mean"]):
        return "n/a"
    return f"{row['mean']:.3f} [{row['lo']:.3f}, {row['hi']:.3f}]"


def family_table(table: pd.DataFrame, family: str) -> str:
    """Markdown table of one family: methods as rows, metrics as columns."""
    rows = table[table["family"] == family]
    metrics = list(dict.fromkeys(rows["metric"]))
    methods = list(dict.fromkeys(rows["method"]))
    units = {m: rows.loc[rows["metric"] == m, "unit"].iloc[0] for m in metrics}
    lines = [
        "| method | " + " | ".join(f"{m} ({units[m]})" if units[m] else m for m in metrics) + " |",
        "|---|" + "---:|" * len(metrics),
    ]
    for method in methods:
        cells = []
        for metric in metrics:
            hit = rows[(rows["method"] == method) & (rows["metric"] == metric)]
            cells.append(_cell(hit.iloc[0]) if len(hit) else "")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    counts = ", ".join(f"{m} {int(rows.loc[rows['metric'] == m, 'n'].max())}" for m in metrics)
    intervals = ", ".join(sorted(set(rows["interval"])))
    return "\n".join(lines) + f"\n\nn (most per metric): {counts}; intervals: {intervals}.\n"


def results_markdown(table: pd.DataFrame, record: dict[str, Any]) -> str:
    """The whole ``results.md``: context, one table per family, notes and wall times."""
    bench = record["benchmark"]
    parts = [
        "# Evaluation results\n",
        f"- benchmark: `{bench['root']}` (format {bench['format_version']}, "
        f"sha256 {str(bench['content_sha256'])[:12]})",
        f"- model: `{record['model']['dir']}`; split: {record['split']}; "
        f"queries: {record['queries']}",
        f"- seeds: {json.dumps(record['seeds'])}",
        f"- command: `{record['command']}`\n",
    ]
    for family in FAMILIES:
        if (table["family"] == family).any():
            parts.append(f"## {family}\n\n{family_table(table, family)}")
    if record["notes"]:
        parts.append("## Notes\n\n" + "\n".join(f"- {n}" for n in record["notes"]) + "\n")
    parts.append(_timing_table(record["wall_time_s"]))
    return "\n".join(parts)


def _timing_table(wall: dict[str, Any]) -> str:
    lines = ["## Wall time (s)\n", "| method | prepare | score |", "|---|---:|---:|"]
    for method, t in wall["methods"].items():
        lines.append(f"| {method} | {t['prepare_s']:.1f} | {t['score_s']:.1f} |")
    metrics = ", ".join(f"{k} {v}" for k, v in wall["metrics"].items())
    return "\n".join(lines) + f"\n\nmetrics: {metrics}; total {wall['total']:.1f} s.\n"


def _headline_rows(table: pd.DataFrame) -> list[pd.DataFrame]:
    """One frame per plotted metric, in HEADLINES order (largest k for tail-patch)."""
    frames = []
    for name in HEADLINES:
        if name.endswith("@"):
            cands = [m for m in table["metric"].unique() if str(m).startswith(name)]
            name = max(cands, key=lambda m: int(str(m).rsplit("@", 1)[1]), default="")
        rows = table[table["metric"] == name]
        if len(rows):
            frames.append(rows)
    return frames


def plot_results(table: pd.DataFrame, path: Path) -> None:
    """Bar chart of the headline metrics with their intervals (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = _headline_rows(table)
    fig, axes = plt.subplots(1, max(1, len(frames)), figsize=(3.2 * max(1, len(frames)), 3.4))
    for ax, rows in zip(np.atleast_1d(axes), frames, strict=False):
        mean = rows["mean"].to_numpy(dtype=float)
        err = np.abs(
            np.vstack([mean - rows["lo"].to_numpy(float), rows["hi"].to_numpy(float) - mean])
        )
        ax.bar(range(len(rows)), np.nan_to_num(mean), yerr=np.nan_to_num(err), capsize=3)
        ax.set_xticks(range(len(rows)), rows["method"].tolist(), rotation=60, ha="right")
        ax.set_title(str(rows["metric"].iloc[0]), fontsize=9)
        ax.axhline(0.0, color="grey", linewidth=0.6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(out: Path, result: EvalResult, *, overwrite: bool = False) -> Path:
    """Write every output file into ``<out>.part``, then rename it to ``out``."""
    check_out_dir(out, overwrite)
    part = out.with_name(out.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    result.table.to_csv(part / "results.csv", index=False)
    (part / "results.md").write_text(results_markdown(result.table, result.record), "utf-8")
    result.per_query.to_parquet(part / "per_query.parquet", index=False)
    plot_results(result.table, part / "results.png")
    arrays: dict[str, Any] = {"query_ids": np.asarray(result.query_ids)}
    arrays |= {f"scores/{m}": s.astype(np.float32) for m, s in result.scores.items()}
    np.savez_compressed(part / "scores.npz", **arrays)
    text = json.dumps(result.record, indent=2, default=str) + "\n"
    (part / "eval.json").write_text(text, encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    part.rename(out)
    return out
