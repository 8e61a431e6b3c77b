"""Does grouping queries into one sweep cost anything? cProfile by CPU time (issue 18).

    OMP_NUM_THREADS=1 python benchmarks/profile_grouping.py --n-docs 40     # ~6 min, 1 core

The same 16 full-model queries in one call, 16 per sweep and 1 per sweep, taken in turn twice
(``bench_amortized``'s random-init GPT-2 12 x 128 and corpus, 128-token units, warm caches,
``--top-tokens 0``, first-order check off). Prints each call's CPU seconds, then the functions
whose cumulative CPU time grows most from 1 per sweep to 16 per sweep (second round).
Records nothing.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from pathlib import Path

import bench_amortized as ba

import bgotrace


def profiled(fn) -> tuple[float, dict[str, float]]:
    """CPU seconds of ``fn()`` and each function's cumulative CPU seconds in it."""
    profile = cProfile.Profile(time.process_time)
    start = time.process_time()
    profile.runcall(fn)
    seconds = time.process_time() - start
    cumulative: dict[str, float] = {}
    for (file, line, name), row in pstats.Stats(profile).stats.items():  # type: ignore[attr-defined]
        key = f"{Path(file).name}:{line}({name})"
        cumulative[key] = cumulative.get(key, 0.0) + row[3]
    return seconds, cumulative


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-docs", type=int, default=40)
    parser.add_argument("--unit-length", type=int, default=128)
    parser.add_argument("--top", type=int, default=20, help="functions printed")
    args = parser.parse_args()
    docs, tok, model = ba.random_setup(args.n_docs, args.unit_length)
    cache = Path(tempfile.mkdtemp(prefix="bgotrace-grouping-"))

    def call(per_sweep: int):
        cfg = ba.config(cache, "all", args.unit_length, queries_per_sweep=per_sweep)
        cfg["output"]["top_tokens"] = 0
        return lambda: bgotrace.attribute(model, tok, docs, queries=ba.queries(16), config=cfg)

    call(1)()  # warm-up: token cache
    runs: dict[int, list[tuple[float, dict[str, float]]]] = {1: [], 16: []}
    for _ in range(2):
        for per_sweep in (1, 16):
            runs[per_sweep].append(profiled(call(per_sweep)))
            print(f"16 queries, {per_sweep} per sweep: {runs[per_sweep][-1][0]:.2f} CPU s")
    one, sixteen = runs[1][-1][1], runs[16][-1][1]
    rows = sorted(sixteen, key=lambda k: sixteen[k] - one.get(k, 0.0), reverse=True)
    print(f"\n{'function':<70} {'1/sweep':>9} {'16/sweep':>9} {'growth':>8}")
    for key in rows[: args.top]:
        a, b = one.get(key, 0.0), sixteen[key]
        print(f"{key[:70]:<70} {a:9.2f} {b:9.2f} {b - a:+8.2f}")


if __name__ == "__main__":
    main()
