"""A sweep group's states bound once for all its blocks, against once per block.

    python benchmarks/bench_group_binding.py              # 60 documents, one thread, ~8 min
    python benchmarks/bench_group_binding.py --no-record  # print only

The sweep evaluates each state through a structural copy of the model with the state's
values bound (``modeling.bind``). An executor used to bind every state again for every block
of ``--block-units`` units; it now binds a group once (``score.sweep.bind_group``) and every
block reuses it. This times, side by side in one process, on the same cache and model
(``bench_amortized``'s random-init GPT-2, 12 blocks x width 128, 128-token units) and 8
states (4 queries' θ+ and θ−: every parameter moved by a small random step):

- ``per block``: :func:`compute_block` of every block given the raw states (it binds them
  itself: the executors' code before this change);
- ``per group``: :func:`bind_group` once, then :func:`compute_block` of every block given
  the bound group (what :class:`LocalExecutor` and the Ray workers do now);

for blocks of 4, 32 and 1,024 (the default) units, each pair timed ``--rounds`` times in
alternating order; prints the median CPU seconds and their ratio, and appends them to
RESULTS.md. The loss sums of the two ways are compared too (they must be equal).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import bench_amortized as ba
import numpy as np
import torch
from results_log import publish

from bgotrace.cache import get_token_cache
from bgotrace.corpus import ChunkingConfig
from bgotrace.score.executor import Block, compute_block
from bgotrace.score.sweep import bind_group

CPU = torch.device("cpu")
STATES = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-record", action="store_true", help="print only (smoke runs)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    docs, tok, model = ba.random_setup(args.docs, 128)
    cache = get_token_cache(
        docs, tok, ChunkingConfig(max_length=128), Path(tempfile.mkdtemp(prefix="bgotrace-bind-"))
    )
    generator = torch.Generator().manual_seed(0)
    states = [
        {n: p.detach() + 1e-3 * torch.randn(p.shape, generator=generator)
         for n, p in model.named_parameters()}
        for _ in range(STATES)
    ]  # fmt: skip

    def sweep(block_units: int, bind_once: bool) -> np.ndarray:
        blocks = [
            Block(i, start, min(start + block_units, len(cache)))
            for i, start in enumerate(range(0, len(cache), block_units))
        ]
        given = bind_group(model, states) if bind_once else states
        parts = [
            compute_block(model, cache, b, given, batch_size=ba.BATCH, pad_id=0, device=CPU)[1]
            for b in blocks
        ]
        return np.concatenate(parts, axis=1)

    rows = []
    for block_units in (4, 32, 1024):
        seconds: dict[bool, list[float]] = {False: [], True: []}
        sums: dict[bool, np.ndarray] = {}
        for r in range(args.rounds):
            for once in (False, True) if r % 2 == 0 else (True, False):
                start = time.process_time()
                sums[once] = sweep(block_units, once)
                seconds[once].append(time.process_time() - start)
        before, now = (statistics.median(seconds[k]) for k in (False, True))
        same = float(np.max(np.abs(sums[True] - sums[False])))
        rows.append((block_units, -(-len(cache) // block_units), before, now, same))
        print(f"{block_units} units per block: {before:.2f} s -> {now:.2f} s ({now / before:.3f})")
    report(args, len(cache), int(cache.lengths.sum()), rows)


def report(args: argparse.Namespace, n_units: int, n_tokens: int, rows: list[tuple]) -> None:
    lines = [
        f"\n### A group's states bound once vs once per block ({n_units} units, {n_tokens:,} "
        f"tokens, {STATES} states, 1 thread)\n",
        f"`python benchmarks/bench_group_binding.py --docs {args.docs} --rounds {args.rounds}`; "
        "random GPT-2 12 x 128, every parameter perturbed; median CPU seconds of "
        f"{args.rounds} alternating rounds.\n",
        "| block units | blocks | bound per block (before) | bound per group (now) | now / before "
        "| largest difference of the loss sums |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for block_units, blocks, before, now, same in rows:
        lines.append(
            f"| {block_units:,} | {blocks} | {before:.2f} | {now:.2f} | {now / before:.3f} "
            f"| {same:.0e} |"
        )
    publish(lines, record=not args.no_record)


if __name__ == "__main__":
    main()
