"""BGO sensitivity sweep on the validation queries of a benchmark (fact + source metrics).

    bgotrace bench build --out /work/bench/cpu --bench-preset cpu --preset test --epochs 8 \\
        --model-out /work/bench/cpu/model-test
    python benchmarks/bgo_sensitivity.py --bench /work/bench/cpu --model /work/bench/cpu/model-test

Varies one thing at a time around the current default (optimizer and preconditioner, lr,
steps, reduce, score variant), ranks the settings by the mean of fact MRR and source
precision@10 on the **validation** split, and appends the table to benchmarks/RESULTS.md.
The best setting is then confirmed on the test split with ``--confirm KEY=VALUE ...``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
from results_log import publish

from bgotrace.errors import NonFiniteLossError
from bgotrace.eval.runner import run_eval

DEFAULT: dict[str, Any] = {
    "optimizer": "adam",
    "lr": 1e-4,
    "steps": 10,
    "reduce": "mean",
    "score": "bidirectional",
    "normalize": "none",  # the default until issue 9's sweep (below) made it "sensitivity"
}
VARIANTS: list[dict[str, Any]] = [
    {},
    {"lr": 1e-3},
    {"lr": 1e-5},
    {"steps": 1},
    {"steps": 3},
    {"optimizer": "sgd", "lr": 1e-1},
    {"optimizer": "fisher", "lr": 1e-4},
    {"optimizer": "fisher", "lr": 1e-2},
    {"reduce": "sum"},
    {"score": "ascent"},
    {"score": "descent"},
    {"score": "abs"},
    # combinations of the best single changes of a first pass
    {"lr": 1e-2},
    {"lr": 1e-3, "reduce": "sum"},
    {"lr": 1e-3, "score": "ascent"},
    {"optimizer": "fisher", "lr": 1e-3},
    {"optimizer": "fisher", "lr": 1e-4, "reduce": "sum"},
]
CALIBRATION_BASE: dict[str, Any] = {**DEFAULT, "reduce": "sum"}
"""The shipped default that issue 9's grid varies (Adam, lr 1e-4, K = 10, sum)."""
CALIBRATION_VARIANTS: list[dict[str, Any]] = [
    {},
    {"lr": "auto", "lr_target": 0.3},
    {"lr": "auto", "lr_target": 1.0},
    {"lr": "auto", "lr_target": 3.0},
    {"lr": "auto", "lr_criterion": "radius", "lr_target": 3e-3},
    {"lr": "auto", "lr_criterion": "radius", "lr_target": 1e-2},
    {"lr": "auto", "lr_criterion": "radius", "lr_target": 3e-2},
    {"optimizer": "fisher"},
    {"optimizer": "fisher", "fisher_damping": 0.1},
    {"optimizer": "fisher", "fisher_damping": 1.0},
    {"optimizer": "fisher", "lr": "auto", "lr_target": 1.0},
    {"optimizer": "fisher", "fisher_damping": 0.1, "lr": "auto", "lr_target": 1.0},
]
"""``--grid calibration``: --lr auto targets, damped Fisher (on top of CALIBRATION_BASE)."""
NORMALIZE_VARIANTS: list[dict[str, Any]] = [
    {},
    {"normalize": "sensitivity"},
    {"optimizer": "fisher", "lr": "auto", "lr_target": 1.0},
    {"optimizer": "fisher", "lr": "auto", "lr_target": 1.0, "normalize": "sensitivity"},
    {"optimizer": "fisher", "lr": "auto", "lr_target": 2.0},
    {"optimizer": "fisher", "lr": "auto", "lr_target": 3.0},
    {"lr": "auto", "lr_target": 3.0, "normalize": "sensitivity"},
    {"optimizer": "fisher", "normalize": "sensitivity"},
]
"""``--grid normalize``: the second round (sensitivity normalisation, Fisher + auto targets)."""
GRADNORM_VARIANTS: list[dict[str, Any]] = [
    {"normalize": "sensitivity"},
    {"optimizer": "fisher", "lr": "auto", "lr_target": 2.0, "normalize": "sensitivity"},
    {"optimizer": "fisher", "lr": "auto", "lr_target": 2.0, "fisher_damping": 0.1},
    {"optimizer": "fisher", "lr": "auto", "lr_target": 1.5},
    {"optimizer": "fisher", "lr": "auto", "lr_target": 2.0, "score": "ascent"},
]
"""``--grid gradnorm``: the third round, after s(z) became the exact gradient norm."""
FINAL_VARIANTS: list[dict[str, Any]] = [
    {"normalize": "sensitivity", "lr": "auto", "lr_target": 3.0},
    {"normalize": "sensitivity", "lr": "auto", "lr_target": 1.0},
    {"normalize": "sensitivity", "lr": "auto", "lr_criterion": "radius", "lr_target": 1e-2},
    {"normalize": "sensitivity", "score": "ascent"},
    {"normalize": "sensitivity", "reduce": "mean"},
]
"""``--grid final``: the fourth round, around the best of the third (normalize=sensitivity)."""
GRIDS = {
    "defaults": (DEFAULT, VARIANTS),
    "calibration": (CALIBRATION_BASE, CALIBRATION_VARIANTS),
    "normalize": (CALIBRATION_BASE, NORMALIZE_VARIANTS),
    "gradnorm": (CALIBRATION_BASE, GRADNORM_VARIANTS),
    "final": (CALIBRATION_BASE, FINAL_VARIANTS),
}
METRICS = (
    "mrr",
    "recall@10",
    "precision@10",
    "source_rank",
    "tail_patch_vs_random@10",
    "tail_patch_ref@10",
    "hub_share",
    "corr_length",
)
FAMILIES = ["fact", "source", "tail-patch", "hubs"]


def evaluate(
    bench: str,
    model: str,
    split: str,
    change: dict[str, Any],
    max_q: int | None,
    base: dict[str, Any] = DEFAULT,
):
    options = {"method_options": {"bgo": {**base, **change}}, "max_queries": max_q}
    t0 = time.perf_counter()
    try:
        result = run_eval(bench, model, ["bgo"], FAMILIES, split=split, options=options)
        row = {m: result.value("bgo", m) for m in METRICS}
    except NonFiniteLossError:  # a setting that diverges is a result too
        row = dict.fromkeys(METRICS, float("nan"))
    row["seconds"] = time.perf_counter() - t0
    print(describe(change), row, flush=True)
    return row


def describe(change: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in change.items()) or "default"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--max-queries", type=int, default=None)
    parser.add_argument("--confirm", nargs="*", help="KEY=VALUE of a setting to run on test")
    parser.add_argument(
        "--grid",
        choices=tuple(GRIDS),
        default="defaults",
        help="defaults: the first sweep; calibration / normalize: issue 9's two rounds",
    )
    args = parser.parse_args()
    base, variants = GRIDS[args.grid]
    if args.confirm is not None:
        change = {k: _value(v) for k, v in (kv.split("=", 1) for kv in args.confirm)}
        rows = [
            (f"test: {describe(c)}", evaluate(args.bench, args.model, "test", c, None, base))
            for c in ({}, change)
        ]
    else:
        rows = [
            (
                describe(c),
                evaluate(args.bench, args.model, "validation", c, args.max_queries, base),
            )
            for c in variants
        ]
        rows.sort(key=lambda r: -np.nan_to_num(r[1]["mrr"] + r[1]["precision@10"], nan=-1.0))
    write(rows, args)


def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def write(rows: list[tuple[str, dict[str, float]]], args: argparse.Namespace) -> None:
    split = "test" if args.confirm is not None else "validation"
    lines = [
        f"\n### BGO sensitivity ({split} split, `{args.bench}`, grid {args.grid})\n",
        "| setting | fact MRR | fact recall@10 | source precision@10 | true-source rank "
        "| tail-patch@10 − random | tail-patch ref@10 (%) | hub share | ρ(score, length) | s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['mrr']:.3f} | {r['recall@10']:.3f} | "
            f"{r['precision@10']:.3f} | {r['source_rank']:.2f} | "
            f"{r['tail_patch_vs_random@10']:.3f} | {r['tail_patch_ref@10']:.2f} | "
            f"{r['hub_share']:.2f} | {r['corr_length']:.2f} | {r['seconds']:.0f} |"
        )
    publish(lines)


if __name__ == "__main__":
    main()
