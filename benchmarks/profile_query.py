"""Where one full-model BGO query's time goes, beside its physical limit (cProfile).

    OMP_NUM_THREADS=1 python benchmarks/profile_query.py                   # ~3 min, 1 core
    OMP_NUM_THREADS=1 python benchmarks/profile_query.py --unit-length 32  # the earlier setting

The 12x128 model and corpus of ``bench_amortized.py`` (the same ``--unit-length``, default 128);
one warm-up run builds the caches, then one query is profiled and the two plain inference
passes are timed. Prints the ratio and the cumulative times of the stages (sweep,
perturbation, the rest); records nothing.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from pathlib import Path

import bench_amortized as ba
import torch

import bgotrace
from bgotrace.cache import TokenCache
from bgotrace.report.progress import set_progress
from bgotrace.train.tokenizer import train_tokenizer

STAGES = "sweep_blocks|perturb_group|top_token_changes|_assemble|_summary"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unit-length", type=int, default=ba.UNIT_LENGTH)
    parser.add_argument("--docs", type=int, default=300, help="documents (300: >= 1,000 units)")
    args = parser.parse_args()
    set_progress(False)
    torch.manual_seed(0)
    docs = ba.corpus(args.docs, unit_length=args.unit_length)
    tok = train_tokenizer([d.text for d in docs], vocab_size=512)
    model = ba.build_model("12x128", args.unit_length)
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


if __name__ == "__main__":
    main()
