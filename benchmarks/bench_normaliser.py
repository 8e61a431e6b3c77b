"""The ``--normalize`` pass (per-unit gradient norms) against one warm full-model query.

    python benchmarks/bench_normaliser.py                 # ~6,000 units, one thread
    python benchmarks/bench_normaliser.py --docs 300      # quicker, smaller corpus

A 4-layer width-128 GPT-2 (random init; vocabulary 2,048) over a synthetic corpus cut into
128-token units, on one thread, side by side in one run:
1. one warm full query: ``--normalize none`` with the token cache built, all parameters
   perturbed (defaults: Adam, K = 10 steps), the corpus swept once;
2. the batched normaliser (:func:`unit_gradient_norms`, ghost norms, batches of 16);
3. the old per-unit loop (:func:`unit_gradient_norms_loop`) on ``--loop-units`` units,
   scaled to the corpus (it costs the same per unit of a given length; the sample is every
   k-th unit, so its lengths are the corpus's).
Printed and appended to benchmarks/RESULTS.md: seconds and the ratios normaliser / query
(target ≤ 0.75, issue 14) and loop / batched, with the largest relative difference of the two
on the sampled units.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_sweep import WORDS, corpus
from results_log import publish
from transformers import GPT2Config, GPT2LMHeadModel

import bgotrace
from bgotrace.cache import get_token_cache
from bgotrace.corpus import ChunkingConfig
from bgotrace.perturb.sensitivity import unit_gradient_norms, unit_gradient_norms_loop
from bgotrace.runtime.progress import set_progress
from bgotrace.train.tokenizer import train_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=6000, help="documents (~1 unit each)")
    parser.add_argument("--loop-units", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-record", action="store_true", help="print only (smoke runs)")
    args = parser.parse_args()
    set_progress(False)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    docs = corpus(args.docs)
    tokenizer = train_tokenizer([d.text for d in docs], vocab_size=2048)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=128, n_layer=4, n_head=4)
    ).eval()
    root = Path(tempfile.mkdtemp(prefix="bgotrace-normaliser-"))
    config = {
        "corpus": {"max_length": 128, "cache_dir": str(root)},
        "scoring": {"normalize": "none"},
        "output": {"top_tokens": 0},
    }
    prompt, completion = " ".join(WORDS[:4]), " " + " ".join(WORDS[4:8])

    def query() -> None:
        bgotrace.attribute(
            model, tokenizer, docs, prompt=prompt, completion=completion, config=config
        )

    query()  # warm: token cache built, code paths loaded
    t0 = time.perf_counter()
    query()
    t_query = time.perf_counter() - t0
    cache = get_token_cache(docs, tokenizer, ChunkingConfig(max_length=128), root)
    names = [n for n, _ in model.named_parameters()]
    cpu = torch.device("cpu")
    t0 = time.perf_counter()
    fast, _ = unit_gradient_norms(model, cache, names, cpu, batch_size=16)
    t_fast = time.perf_counter() - t0
    sample = np.arange(0, len(cache), max(1, len(cache) // args.loop_units))
    t0 = time.perf_counter()
    slow = unit_gradient_norms_loop(model, cache, names, cpu, sample)
    t_loop = (time.perf_counter() - t0) * len(cache) / len(sample)
    diff = float(np.max(np.abs(fast[sample] / slow - 1)))
    report(args, len(cache), int(cache.lengths.sum()), t_query, t_fast, t_loop, diff)


def report(args, units: int, tokens: int, t_query: float, t_fast: float, t_loop: float,
           diff: float) -> None:  # fmt: skip
    lines = [
        f"\n### Normaliser vs one warm full query ({units:,} units, {tokens:,} tokens, "
        f"{args.threads} thread(s))\n",
        f"`python benchmarks/bench_normaliser.py --docs {args.docs} --threads {args.threads}`; "
        "4-layer width-128 GPT-2, all parameters, reduce=sum.\n",
        "| stage | seconds | / warm query |",
        "|---|---:|---:|",
        f"| one warm full query (`--normalize none`, K = 10) | {t_query:.1f} | 1.00 |",
        f"| normaliser, batched ghost norms (batch 16) | {t_fast:.1f} | {t_fast / t_query:.2f} |",
        f"| normaliser, old per-unit loop (scaled from {args.loop_units} units) | {t_loop:.1f} "
        f"| {t_loop / t_query:.2f} |",
        f"\nLoop / batched: {t_loop / t_fast:.1f}×; largest relative difference of the two "
        f"norms on the sampled units: {diff:.1e}.",
    ]
    publish(lines, record=not args.no_record)


if __name__ == "__main__":
    main()
