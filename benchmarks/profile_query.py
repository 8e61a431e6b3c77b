"""Where one full-model BGO query's time goes, beside its physical limit (cProfile).

    OMP_NUM_THREADS=1 python benchmarks/profile_query.py                   # ~3 min, 1 core
    OMP_NUM_THREADS=1 python benchmarks/profile_query.py --unit-length 32  # the earlier setting

The 12x128 model and corpus of ``bench_amortized.py`` (the same ``--unit-length``, default 128);
one warm-up run builds the caches, then one query is profiled and the two plain inference
passes are timed. Prints the ratio and the cumulative times of the stages (sweep,
perturbation, the rest), and the query's perturbation alone side by side: two ``perturb``
calls (descent, ascent) vs one ``perturb_pair`` (their shared first step once, as the sweep
runs it; best of 5, taken in turn); records nothing.
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
from bgotrace.cache import TokenCache
from bgotrace.config import PerturbConfig
from bgotrace.perturb.params import select_parameters
from bgotrace.perturb.steps import ASCENT, DESCENT, perturb, perturb_pair
from bgotrace.query import encode_query

STAGES = "sweep_blocks|perturb_group|top_token_changes|_assemble|_summary"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unit-length", type=int, default=ba.UNIT_LENGTH)
    parser.add_argument("--docs", type=int, default=300, help="documents (300: >= 1,000 units)")
    args = parser.parse_args()
    docs, tok, model = ba.random_setup(args.docs, args.unit_length)
    cache = Path(tempfile.mkdtemp(prefix="bgotrace-profile-"))
    cfg = ba.config(cache, unit_length=args.unit_length)

    def run() -> None:
        bgotrace.attribute(model, tok, docs, queries=ba.queries(1), config=cfg)

    run()  # warm-up: token cache and the normaliser's gradient norms
    limit = ba.timed(lambda: [ba.plain_pass(model, TokenCache(cache)) for _ in range(2)])
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.runcall(run)
    query = time.perf_counter() - start
    n_units = len(TokenCache(cache))
    print(f"{n_units} units of <= {args.unit_length} tokens: query {query:.2f} s, "
          f"2 plain passes {limit:.2f} s, ratio {limit / query:.2f}")  # fmt: skip
    pstats.Stats(profile).sort_stats("cumulative").print_stats(STAGES)
    perturbation_side_by_side(model, tok, args.unit_length, len(TokenCache(cache)))


def perturbation_side_by_side(model, tok, unit_length: int, n_units: int) -> None:
    """One query's perturbation (K = 10 Adam steps each way, every parameter)."""
    q = encode_query(ba.queries(1)[0], tok, unit_length)
    names, cfg = select_parameters(model, "all"), PerturbConfig()
    runs = {
        "2 x perturb": lambda: [
            perturb(model, q, names, cfg, d, n_units=n_units) for d in (DESCENT, ASCENT)
        ],
        "perturb_pair": lambda: perturb_pair(model, q, names, cfg, n_units=n_units),
    }
    best = ba.interleaved(runs, rounds=5)
    two, pair = best["2 x perturb"], best["perturb_pair"]
    print(f"perturbation of one query: 2 x perturb {two:.3f} s, perturb_pair {pair:.3f} s, "
          f"ratio {pair / two:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
