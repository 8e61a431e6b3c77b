"""The amortized-sweep benchmark on one GPU: bf16 sweep, float32 losses, SDPA attention.

    python benchmarks/gpu_sweep.py                 # one CUDA GPU, < 5 min (prints a table)
    python benchmarks/gpu_sweep.py --record        # ... and appends it to RESULTS.md
    python benchmarks/gpu_sweep.py --device cpu --tiny   # smoke test of the script itself

A randomly initialised GPT-2-small-shaped model (12 layers, width 768, vocabulary 50,257,
so the LM head costs about five blocks) in bfloat16 with ``attn_implementation="sdpa"``;
losses are accumulated in float32 (the chunked head casts each chunk's logits). Measured
side by side, on 4,096 synthetic units of 128 tokens:

1. one full-model query end to end vs two plain bf16 inference passes (its physical limit);
2. 16 queries with ``--params last:2`` in one sweep vs 16 full-model single-query runs
   (one measured, times 16), cold and with a warm trunk cache.
"""

from __future__ import annotations

import argparse
import copy
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from bench_amortized import corpus, plain_pass, queries
from results_log import publish
from transformers import GPT2Config, GPT2LMHeadModel

import bgotrace
from bgotrace.cache import TokenCache
from bgotrace.runtime.progress import set_progress
from bgotrace.train.tokenizer import train_tokenizer

BATCH = 64


def sync_timed(fn, device: torch.device) -> float:
    """Seconds of ``fn()``, with the GPU's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def build_model(tiny: bool, device: torch.device) -> torch.nn.Module:
    shape = (
        dict(n_embd=64, n_layer=4, n_head=4) if tiny else dict(n_embd=768, n_layer=12, n_head=12)
    )
    config = GPT2Config(vocab_size=50257, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, **shape)  # fmt: skip
    torch.manual_seed(0)
    model = GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")
    return model.to(device).eval()  # float32 master weights: the perturbation runs in them


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny model and corpus (smoke test)")
    parser.add_argument("--record", action="store_true", help="append the table to RESULTS.md")
    args = parser.parse_args()
    device = torch.device(args.device)
    set_progress(False)
    docs = corpus(40 if args.tiny else 1400)
    tok = train_tokenizer([d.text for d in docs], vocab_size=512)
    model = build_model(args.tiny, device)
    cache_dir = Path(tempfile.mkdtemp(prefix="bgotrace-gpu-")) / "cache"

    def run(qs, params="all", **scoring):
        config = {
            "corpus": {"max_length": 128, "cache_dir": str(cache_dir)},
            "perturb": {"params": params},
            "scoring": {"dtype": "bfloat16", "batch_size": BATCH, "queries_per_sweep": 16,
                        **scoring},
            "output": {"top_tokens": 3},
        }  # fmt: skip
        bgotrace.attribute(model, tok, docs, queries=qs, config=config)

    run(queries(1))  # warm-up: token cache, kernels
    cache = TokenCache(cache_dir)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)  # what the sweep runs in
    limit = sync_timed(lambda: (plain_pass(bf16, cache, BATCH), plain_pass(bf16, cache, BATCH)),
                       device)  # fmt: skip
    full = sync_timed(lambda: run(queries(1)), device)
    shared = sync_timed(lambda: run(queries(16), "last:2"), device)
    run(queries(1), "last:2", trunk_cache=True)  # builds the trunk cache
    warm = sync_timed(lambda: run(queries(16), "last:2", trunk_cache=True), device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    lines = [
        f"\n### Amortized BGO on {name} ({date.today()}, bf16 sweep, SDPA, float32 losses)\n",
        f"`python benchmarks/gpu_sweep.py{' --tiny' if args.tiny else ''}` — {len(cache)} units, "
        f"{int(cache.lengths.sum())} tokens, batch {BATCH}.\n",
        "| comparison | measured (s) | reference (s) | ratio |",
        "|---|---:|---:|---:|",
        f"| 1 full-model query vs 2 plain bf16 passes | {full:.2f} | {limit:.2f} | "
        f"{limit / full:.2f} |",
        f"| 16 queries last:2, one sweep vs 16 full runs | {shared:.2f} | {16 * full:.2f} | "
        f"{shared / (16 * full):.2f} |",
        f"| 16 queries last:2, warm trunk cache vs 16 full runs | {warm:.2f} | {16 * full:.2f} | "
        f"{warm / (16 * full):.2f} |",
    ]
    publish(lines, record=args.record)


if __name__ == "__main__":
    main()
