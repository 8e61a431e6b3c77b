"""Cost of ``--lr auto``: the per-query search against one corpus pass, side by side.

    python benchmarks/bench_calibration.py --bench /work/bench/cpu \\
        --model /work/bench/cpu/model-test [--split validation] [--publish]

For each query of the split: the calibration's wall time and trials, the time of the fixed-lr
perturbation (K steps each way), and one corpus pass under one state (the unit of the target:
the search should cost <= 20% of one pass). The engine reuses the search's best ascent, so the
extra cost of ``--lr auto`` is the search minus one ascent ("extra" column). Also checks, for
each setting, that the search never diverges and how often it reached its target.
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
from bgotrace.modeling.loading import load_model_and_tokenizer
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
    parser.add_argument("--publish", action="store_true", help="append to RESULTS.md")
    args = parser.parse_args()
    model, tok = load_model_and_tokenizer(args.model, device="cpu")
    docs = load_documents(str(Path(args.bench) / "corpus.jsonl"), CorpusFields())
    cache = get_token_cache(
        docs, tok, ChunkingConfig(max_length=128), Path(args.bench) / "cache-calibration"
    )
    names = [n for n, _ in model.named_parameters()]
    records = [json.loads(line) for line in open(Path(args.bench) / "queries.jsonl")]
    records = [r for r in records if r["split"] == args.split]
    queries = [
        encode_query(Query(r["id"], r["prompt"], r["completion"], r["loss_on"]), tok, 128)
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
        f"fixed-lr perturbation (K = 10 each way): {fixed_s:.3f} s per query.\n",
        "| optimizer, criterion, target | trials (mean) | search s / query "
        "| search / corpus pass | extra / corpus pass | reached | diverged |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for setting in SETTINGS:
        cfg = PerturbConfig(lr="auto", **setting)
        f = fisher if cfg.optimizer == "fisher" else None
        cals = [calibrate_lr(model, q, names, cfg, n_units=len(cache), fisher=f) for q in queries]
        secs = float(np.mean([c.seconds for c in cals]))
        extra = secs * float(np.mean([(len(c.trials) - 1) / len(c.trials) for c in cals]))
        diverged = sum(not np.isfinite(c.achieved) for c in cals)
        lines.append(
            f"| {cfg.optimizer}, {cfg.lr_criterion} {cfg.lr_target:g} "
            f"| {np.mean([len(c.trials) for c in cals]):.1f} | {secs:.3f} "
            f"| {secs / one_pass:.2f} | {extra / one_pass:.2f} "
            f"| {sum(c.reached for c in cals)}/{len(cals)} | {diverged} |"
        )
    publish(lines, record=args.publish)


if __name__ == "__main__":
    main()
