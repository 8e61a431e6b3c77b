"""The ``--normalize`` pass (per-unit gradient norms) against one warm full-model query.

    python benchmarks/bench_normaliser.py                 # ~6,000 units, one thread
    python benchmarks/bench_normaliser.py --docs 300      # quicker, smaller corpus

A 4-layer width-128 GPT-2 (random init; vocabulary 2,048) over a synthetic corpus cut into
128-token units, on one thread, side by side in one run:
1. one warm full query: ``--normalize none`` with the token cache built, all parameters
   perturbed (defaults: Adam, K = 10 steps), the corpus swept once;
2. the batched normaliser over the whole corpus (:func:`unit_gradient_norms`, ghost norms,
   batches of 16);
3. the normaliser over ``--candidates`` (a seeded random sample of that fraction of the
   units stands for a prefilter's candidates: the cost depends on their number and
   lengths only) through the per-unit store (:func:`unit_normalizers`, as a
   ``--candidates`` run calls it): a first run on a fresh store (the candidates + the
   reference sample of the median), then a later run with other candidates (the
   reference sample is stored: only the new candidates);
4. the normaliser in bfloat16 (the sweep dtype of ``--dtype bfloat16``) on the first
   candidates, timed against float32 on the same units, with the Spearman correlation of
   the two (what bfloat16 buys is a GPU's; a CPU may well be slower in it);
5. the old per-unit loop (:func:`unit_gradient_norms_loop`) on ``--loop-units`` units,
   scaled to the corpus (it costs the same per unit of a given length; the sample is every
   k-th unit, so its lengths are the corpus's).
Printed and appended to benchmarks/RESULTS.md: wall and CPU seconds (this process; one torch
thread, so the CPU time hardly moves with the load of other processes, the wall time does) and
the ratios normaliser / query (target ≤ 0.75, issue 14), with the load average over the run.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from bench_sweep import WORDS, corpus
from results_log import publish
from scipy.stats import spearmanr
from transformers import GPT2Config, GPT2LMHeadModel

import bgotrace
from bgotrace.cache import get_token_cache
from bgotrace.config import ScoreConfig
from bgotrace.corpus import ChunkingConfig
from bgotrace.perturb.sensitivity import (
    reference_units,
    unit_gradient_norms,
    unit_gradient_norms_loop,
    unit_normalizers,
)
from bgotrace.runtime.progress import set_progress
from bgotrace.train.tokenizer import train_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=6000, help="documents (~1 unit each)")
    parser.add_argument("--candidates", type=float, default=0.1, help="fraction of the units")
    parser.add_argument("--loop-units", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-record", action="store_true", help="print only (smoke runs)")
    args = parser.parse_args()
    docs, tokenizer, model = setup(args.docs, args.threads)
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

    load = [os.getloadavg()[0]]
    query()  # warm: token cache built, code paths loaded
    rows = {"query": _seconds(query)}  # stage → (wall seconds, this process's CPU seconds)
    cache = get_token_cache(docs, tokenizer, ChunkingConfig(max_length=128), root)
    names = [n for n, _ in model.named_parameters()]
    cpu = torch.device("cpu")
    out: dict[str, np.ndarray] = {}

    def norms(key: str, m: torch.nn.Module, indices: np.ndarray | None = None) -> None:
        rows[key] = _seconds(
            lambda: out.update({key: unit_gradient_norms(m, cache, names, cpu, indices=indices)[0]})
        )

    norms("full", model)
    load.append(os.getloadavg()[0])
    first, later = _candidate_sets(len(cache), args.candidates)
    scoring = ScoreConfig(normalize="sensitivity", batch_size=16)
    for key, chosen in (("first", first), ("later", later)):  # as a --candidates run calls it
        rows[key] = _seconds(
            lambda chosen=chosen: unit_normalizers(
                model, cache, names, scoring, cpu, indices=chosen
            )
        )
    norms("bf16", copy.deepcopy(model).to(torch.bfloat16), first)
    norms("fp32_same", model, first)
    rho = float(spearmanr(out["bf16"], out["fp32_same"]).statistic)
    sample = np.arange(0, len(cache), max(1, len(cache) // args.loop_units))
    t_loop = _seconds(
        lambda: out.update(loop=unit_gradient_norms_loop(model, cache, names, cpu, sample))
    )
    rows["loop"] = (t_loop[0] * len(cache) / len(sample), t_loop[1] * len(cache) / len(sample))
    load.append(os.getloadavg()[0])
    diff = float(np.max(np.abs(out["full"][sample] / out["loop"] - 1)))
    report(args, (len(cache), int(cache.lengths.sum()), len(first)), rows, rho, diff, load)


def setup(n_docs: int, threads: int) -> tuple[list, object, torch.nn.Module]:
    """The normaliser benchmarks' corpus, tokenizer and model: ``n_docs`` synthetic documents,
    a 2,048-token BPE trained on them, a random 4-layer width-128 GPT-2 (seed 0); torch on
    ``threads`` threads, progress bars off."""
    set_progress(False)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    docs = corpus(n_docs)
    tokenizer = train_tokenizer([d.text for d in docs], vocab_size=2048)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=128, n_layer=4, n_head=4)
    ).eval()
    return docs, tokenizer, model


def _seconds(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall, CPU) seconds of ``fn()``: with one torch thread the CPU time of this process
    hardly moves with the load other processes put on the machine; the wall time does."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _candidate_sets(n: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint seeded samples of ``fraction`` of the units: two runs' candidates."""
    m = max(1, round(fraction * n))
    order = np.random.default_rng(0).permutation(n)
    return np.sort(order[:m]), np.sort(order[m : 2 * m])


def report(args, sizes: tuple[int, int, int], rows: dict[str, tuple[float, float]], rho: float,
           diff: float,
           load: list[float]) -> None:  # fmt: skip
    units, tokens, m = sizes
    sample = reference_units(units).size
    q = rows["query"]

    def row(label: str, key: str) -> str:
        (wall, cpu), ratios = rows[key], (rows[key][0] / q[0], rows[key][1] / q[1])
        return f"| {label} | {wall:.1f} | {cpu:.1f} | {ratios[0]:.2f} | {ratios[1]:.2f} |"

    lines = [
        f"\n### Normaliser vs one warm full query ({units:,} units, {tokens:,} tokens, "
        f"{args.threads} thread(s))\n",
        f"`python benchmarks/bench_normaliser.py --docs {args.docs} --candidates "
        f"{args.candidates} --loop-units {args.loop_units} --threads {args.threads}`; 4-layer "
        "width-128 GPT-2, all parameters, reduce=sum; load average (1 min) at the start / after "
        f"the full normaliser / at the end: {' / '.join(f'{x:.1f}' for x in load)}.\n",
        "| stage | wall s | CPU s | / warm query (wall) | / warm query (CPU) |",
        "|---|---:|---:|---:|---:|",
        row("one warm full query (`--normalize none`, K = 10)", "query"),
        row("normaliser, whole corpus, float32 (ghost norms, batch 16)", "full"),
        row(
            f"normaliser, {m} candidates ({args.candidates:.0%}), first run on a fresh store: "
            f"+ the {sample}-unit reference sample",
            "first",
        ),  # fmt: skip
        row(f"normaliser, {m} other candidates, a later run (reference sample stored)", "later"),
        row(f"normaliser in bfloat16, the first {m} candidates", "bf16"),
        row(f"normaliser in float32, the same {m} units", "fp32_same"),
        row(f"old per-unit loop, whole corpus (scaled from {args.loop_units} units)", "loop"),
        f"\nbfloat16 vs float32 norms of those {m} units: Spearman {rho:.4f}. Loop / batched: "
        f"{rows['loop'][1] / rows['full'][1]:.1f}× (CPU); largest relative difference of the "
        f"two norms on the sampled units: {diff:.1e}.",
    ]
    publish(lines, record=not args.no_record)


if __name__ == "__main__":
    main()
