"""Where one full-model BGO query's time goes, beside its physical limit (cProfile).

    OMP_NUM_THREADS=1 python benchmarks/profile_query.py        # ~1 min, 1 core

The 12x128 model and corpus of ``bench_amortized.py``; one warm-up run builds the caches, then
one query is profiled and the two plain inference passes are timed. Prints the ratio and the
cumulative times of the stages (sweep, perturbation, the rest); records nothing.
"""

from __future__ import annotations

import cProfile
import pstats
import tempfile
import time
from pathlib import Path

import bench_amortized as ba
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import bgotrace
from bgotrace.cache import TokenCache
from bgotrace.report.progress import set_progress
from bgotrace.train.tokenizer import train_tokenizer

STAGES = "sweep_blocks|perturb_group|top_token_changes|_assemble|_summary"


def main() -> None:
    set_progress(False)
    torch.manual_seed(0)
    docs = ba.corpus(300)
    tok = train_tokenizer([d.text for d in docs], vocab_size=512)
    layers, width = ba.SHAPES["12x128"]
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=ba.VOCAB, n_positions=ba.MAX_LENGTH, n_embd=width, n_layer=layers,
                   n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    ).eval()  # fmt: skip
    cache = Path(tempfile.mkdtemp(prefix="bgotrace-profile-"))

    def run() -> None:
        bgotrace.attribute(model, tok, docs, queries=ba.queries(1), config=ba.config(cache))

    run()  # warm-up: token cache and the normaliser's gradient norms
    limit = ba.timed(lambda: [ba.plain_pass(model, TokenCache(cache)) for _ in range(2)])
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.runcall(run)
    query = time.perf_counter() - start
    print(f"query {query:.2f} s, 2 plain passes {limit:.2f} s, ratio {limit / query:.2f}")
    pstats.Stats(profile).sort_stats("cumulative").print_stats(STAGES)


if __name__ == "__main__":
    main()
