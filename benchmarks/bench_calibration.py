"""Cost of ``--lr auto``: the per-query search against one corpus pass, side by side.

    OMP_NUM_THREADS=1 python benchmarks/bench_calibration.py --bench /work/bench/cpu \\
        --model /work/bench/cpu/model-test [--split validation] [--limit N] [--publish]

Any benchmark built by ``bgotrace bench build`` works (``--bench DIR --model DIR``, e.g.
/work/bench/default with its base model). For each query of the split: the calibration's
wall time, trials and query forward passes, the time of the fixed-lr perturbation (K steps
each way), and one corpus pass under one state (the unit of the target: the search should
cost <= 20% of one pass). The engine reuses the search's chosen ascent (K steps, K + 1
forwards), so the extra cost of ``--lr auto`` is the search minus that ascent ("extra",
prorated by forward passes). Each setting also runs with every trial taken to K steps
(``early_abort=False``, the reference): the chosen η must be the same for every query
("same η"), and its passes show what stopping overshoots early saves. Also checks that the
search never diverges and how often it reached its target.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from results_log import publish

from bgotrace.cache import get_token_cache
from bgotrace.config import PerturbConfig
from bgotrace.corpus import ChunkingConfig, CorpusFields, load_documents
from bgotrace.modeling.loading import context_length, load_model_and_tokenizer
from bgotrace.perturb.calibrate import calibrate_lr
from bgotrace.perturb.fisher import cached_fisher
from bgotrace.perturb.steps import ASCENT, DESCENT, perturb
from bgotrace.query import Query, encode_query
from bgotrace.score.sweep import unit_loss_sums

SETTINGS = (
    {"optimizer": "fisher", "lr_criterion": "loss", "lr_target": 2.0},
    {"optimizer": "adam", "lr_criterion": "loss", "lr_target": 3.0},
    {"optimizer": "adam", "lr_criterion": "loss", "lr_target": 1.0},
    {"optimizer": "adam", "lr_criterion": "radius", "lr_target": 1e-2},
)


def corpus_pass_seconds(model, cache, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        unit_loss_sums(
            model, cache, np.arange(len(cache)), [None], batch_size=16, pad_id=0,
            device=torch.device("cpu"),
        )  # fmt: skip
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--split", default="validation")
    parser.add_argument("--limit", type=int, default=None, help="first N queries of the split")
    parser.add_argument("--unit-length", type=int, default=128, help="tokens per corpus unit")
    parser.add_argument(
        "--no-reference", action="store_true", help="skip the full-trial reference (half the time)"
    )
    parser.add_argument("--publish", action="store_true", help="append to RESULTS.md")
    args = parser.parse_args()
    model, tok = load_model_and_tokenizer(args.model, device="cpu")
    docs = load_documents(str(Path(args.bench) / "corpus.jsonl"), CorpusFields())
    cache = get_token_cache(
        docs,
        tok,
        ChunkingConfig(max_length=args.unit_length),
        Path(args.bench) / f"cache-calibration-{args.unit_length}",
    )
    names = [n for n, _ in model.named_parameters()]
    records = [json.loads(line) for line in open(Path(args.bench) / "queries.jsonl")]
    records = [r for r in records if r["split"] == args.split][: args.limit]
    max_length = context_length(model) or args.unit_length  # queries may be longer than units
    queries = [
        encode_query(Query(r["id"], r["prompt"], r["completion"], r["loss_on"]), tok, max_length)
        for r in records
    ]
    one_pass = corpus_pass_seconds(model, cache)
    fixed = PerturbConfig()
    t0 = time.perf_counter()
    for q in queries:
        for d in (ASCENT, DESCENT):
            perturb(model, q, names, fixed, d, n_units=len(cache))
    fixed_s = (time.perf_counter() - t0) / len(queries)
    fisher = cached_fisher(model, cache, names, n_samples=256, seed=0, device=torch.device("cpu"))
    lines = [
        f"\n### --lr auto cost ({args.split} split, {len(queries)} queries, `{args.model}`)\n",
        f"One corpus pass under one state ({len(cache)} units): {one_pass:.2f} s; "
        f"fixed-lr perturbation (K = {fixed.steps} each way): {fixed_s:.3f} s per query.\n",
        "| optimizer, criterion, target | trials (mean) | query passes (full trials) "
        "| search s / query | search / corpus pass | extra / corpus pass | same η "
        "| reached | diverged |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for setting in SETTINGS:
        cfg = PerturbConfig(lr="auto", **setting)
        f = fisher if cfg.optimizer == "fisher" else None
        runs = {
            abort: [
                calibrate_lr(model, q, names, cfg, n_units=len(cache), fisher=f, early_abort=abort)
                for q in queries
            ]
            for abort in ((True,) if args.no_reference else (False, True))
        }
        lines.append(_row(cfg, runs[True], runs.get(False), one_pass))
    publish(lines, record=args.publish)
    # the machine's load can change while the searches run: say how much the unit moved
    again = corpus_pass_seconds(model, cache)
    print(f"(one corpus pass re-timed after the searches: {again:.2f} s)")


def _row(cfg: PerturbConfig, cals: list, full: list | None, one_pass: float) -> str:
    """One table row: the search as the engine runs it, against the full-trial reference."""
    secs = float(np.mean([c.seconds for c in cals]))
    passes = np.array([c.query_steps for c in cals], dtype=float)
    # The engine does not redo the chosen ascent (K steps + the final forward), and its descent
    # starts from the search's θ0 loss and gradient (one more pass saved).
    reused = cfg.steps + 2
    extra = secs * float(np.mean(np.maximum(passes - reused, 0) / passes))
    if full is None:
        same, full_passes = "–", "–"
    else:
        same = f"{sum(c.lr == r.lr for c, r in zip(cals, full, strict=True))}/{len(cals)}"
        full_passes = f"{np.mean([r.query_steps for r in full]):.1f}"
    diverged = sum(not np.isfinite(c.achieved) for c in cals)
    return (
        f"| {cfg.optimizer}, {cfg.lr_criterion} {cfg.lr_target:g} "
        f"| {np.mean([len(c.trials) for c in cals]):.2f} "
        f"| {passes.mean():.1f} ({full_passes}) | {secs:.3f} "
        f"| {secs / one_pass:.2f} | {extra / one_pass:.2f} | {same} "
        f"| {sum(c.reached for c in cals)}/{len(cals)} | {diverged} |"
    )


if __name__ == "__main__":
    main()
