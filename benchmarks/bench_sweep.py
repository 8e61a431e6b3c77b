"""Sweep throughput ratios, measured side by side in one run on this machine.

    python benchmarks/bench_sweep.py            # ~1-2 min on 2 CPU cores
    python benchmarks/bench_sweep.py --quick    # seconds, smaller corpus

Prints and appends to benchmarks/RESULTS.md:
1. shared sweep: 4 queries evaluated in one corpus pass vs. one pass per query;
2. batching: length-bucketed batches of 16 units vs. one unit per forward;
3. restricted perturbation: perturbing the last block only vs. all parameters.
Ratios, not absolute times, are the result: these machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import platform
import random
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
from results_log import publish
from transformers import GPT2Config, GPT2LMHeadModel

import bgotrace
from bgotrace.corpus import Document
from bgotrace.query import Query
from bgotrace.runtime.progress import set_progress
from bgotrace.train.tokenizer import train_tokenizer

WORDS = (
    "river mountain forest capital language model token gradient query corpus data "
    "attribution city sea island winter summer light dark stone glass paper ink"
).split()


def corpus(n_docs: int, seed: int = 0) -> list[Document]:
    rng = random.Random(seed)
    return [
        Document(f"d{i}", " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 160))), "syn")
        for i in range(n_docs)
    ]


def timed(fn: Callable[[], object], repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    set_progress(False)
    torch.manual_seed(0)
    docs = corpus(60 if args.quick else 300)
    tokenizer = train_tokenizer([d.text for d in docs], vocab_size=512)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=128, n_layer=4, n_head=4)
    ).eval()
    queries = [
        Query(f"q{i}", " ".join(WORDS[i : i + 4]), " " + " ".join(WORDS[i + 4 : i + 8]))
        for i in range(4)
    ]
    cache = Path(tempfile.mkdtemp(prefix="bgotrace-bench-"))  # fresh: never a stale cache

    def run(n_queries: int = 4, **sections: dict) -> None:
        config = {
            "corpus": {"max_length": 128, "cache_dir": str(cache)},
            "perturb": {"steps": 2},
            "output": {"top_tokens": 0},
        }
        for k, v in sections.items():
            config.setdefault(k, {}).update(v)
        bgotrace.attribute(model, tokenizer, docs, queries=queries[:n_queries], config=config)

    run(1)  # warm-up: builds the token cache
    rows = []
    shared = timed(lambda: run(scoring={"queries_per_sweep": 4}))
    separate = timed(lambda: run(scoring={"queries_per_sweep": 1}))
    rows.append(("4 queries: one shared sweep vs one sweep each", shared, separate))
    batched = timed(lambda: run(1, scoring={"batch_size": 16}))
    single = timed(lambda: run(1, scoring={"batch_size": 1}))
    rows.append(("1 query: batch 16 (length-bucketed) vs batch 1", batched, single))
    last = timed(lambda: run(1, perturb={"params": "last:1", "steps": 10}))
    full = timed(lambda: run(1, perturb={"params": "all", "steps": 10}))
    rows.append(("1 query, K=10: perturb last block vs all parameters", last, full))
    report(rows, n_docs=len(docs), quick=args.quick)


def report(rows: list[tuple[str, float, float]], n_docs: int, quick: bool) -> None:
    lines = [
        f"\n### Sweep throughput ({date.today()}, {platform.machine()}, "
        f"{torch.get_num_threads()} threads, {n_docs} docs{', quick' if quick else ''})\n",
        "| comparison | new (s) | old (s) | speed-up |",
        "|---|---:|---:|---:|",
    ]
    for name, new, old in rows:
        lines.append(f"| {name} | {new:.2f} | {old:.2f} | {old / new:.2f}x |")
    publish(lines)


if __name__ == "__main__":
    main()
