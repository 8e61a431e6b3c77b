"""The normaliser's pass in blocks: one ghost-norm check per pass against one per block.

    python benchmarks/bench_normaliser_blocks.py              # 600 documents, one thread
    python benchmarks/bench_normaliser_blocks.py --no-record  # print only

The normaliser computes its norms in blocks of ``--block-units`` units, each kept as soon as
it is done (resume) and, with ``--workers``, each a Ray task. Before each block it used to
check the batched ("ghost") norms of two units against the per-unit loop, a check whose
answer depends on the architecture only; now a pass checks once (a Ray worker once for its
life). This times, side by side in one process, on the same cache and model (a 4-layer
width-128 GPT-2, random init, 128-token units, reduce=sum):

- ``per pass``: :func:`cached_sensitivity` on a fresh store, as a run calls it;
- ``per block``: the same call with the blocks computed as before (:func:`_each_checks`, the
  former body of ``sensitivity._computed_blocks`` for a pass in this process:
  :func:`unit_gradient_norms` without a plan, so each block checks itself);

for blocks of 2 (the dist tests' size), 64 and 1,024 (the default) units, each pair timed
``--rounds`` times in alternating order; the median CPU seconds and their ratio are printed
and appended to RESULTS.md. The norms of the two ways are compared too (they must be equal).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_normaliser import setup
from results_log import publish

from bgotrace.cache import get_token_cache
from bgotrace.corpus import ChunkingConfig
from bgotrace.perturb import sensitivity
from bgotrace.perturb.sensitivity import cached_sensitivity, unit_gradient_norms

CPU = torch.device("cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-record", action="store_true", help="print only (smoke runs)")
    args = parser.parse_args()
    docs, tokenizer, model = setup(args.docs, threads=1)
    root = Path(tempfile.mkdtemp(prefix="bgotrace-normaliser-blocks-"))
    cache = get_token_cache(docs, tokenizer, ChunkingConfig(max_length=128), root)
    names = [n for n, _ in model.named_parameters()]

    def per_pass(block_units: int) -> np.ndarray:
        shutil.rmtree(root / "sensitivity", ignore_errors=True)  # a fresh store each time
        return cached_sensitivity(
            model, cache, names, reduce="sum", device=CPU, block_units=block_units
        )

    def per_block(block_units: int) -> np.ndarray:
        now = sensitivity._computed_blocks
        sensitivity._computed_blocks = _each_checks
        try:
            return per_pass(block_units)
        finally:
            sensitivity._computed_blocks = now

    rows = []
    for block_units in (2, 64, 1024):
        seconds: dict[str, list[float]] = {"pass": [], "block": []}
        norms = {}
        for r in range(args.rounds):
            order = (("pass", per_pass), ("block", per_block))
            for key, fn in order if r % 2 == 0 else order[::-1]:
                start = time.process_time()
                norms[key] = fn(block_units)
                seconds[key].append(time.process_time() - start)
        diff = float(np.max(np.abs(norms["pass"] / norms["block"] - 1)))
        once, each = statistics.median(seconds["pass"]), statistics.median(seconds["block"])
        rows.append(
            f"| {block_units:,} | {each:.2f} | {once:.2f} | {once / each:.3f} | {diff:.0e} |"
        )
    shutil.rmtree(root, ignore_errors=True)
    publish(
        [
            f"\n### The normaliser in blocks: one ghost-norm check per pass vs per block "
            f"({len(cache):,} units, {int(cache.lengths.sum()):,} tokens, 1 thread)\n",
            f"`python benchmarks/bench_normaliser_blocks.py --docs {args.docs} --rounds "
            f"{args.rounds}`; 4-layer width-128 GPT-2, all parameters; median CPU seconds of "
            f"{args.rounds} alternating rounds.\n",
            "| block units | one check per block (before) | one check per pass (now) | "
            "now / before | largest relative difference of the norms |",
            "|---:|---:|---:|---:|---:|",
            *rows,
        ],
        record=not args.no_record,
    )


def _each_checks(model, units, names, device, blocks, batching, workers, advance=None):
    """``sensitivity._computed_blocks`` as it was for a pass in this process: every block
    through :func:`unit_gradient_norms` without a plan, which checks the ghost norms."""
    size, tokens = batching
    for k, block in enumerate(blocks):
        norms, _ = unit_gradient_norms(
            model, units, names, device, batch_size=size, indices=block, batch_tokens=tokens
        )
        yield k, norms


if __name__ == "__main__":
    main()
