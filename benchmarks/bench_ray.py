"""Sweep throughput per Ray worker vs. this process, on the shipped demo model and corpus.

    OMP_NUM_THREADS=1 python benchmarks/bench_ray.py     # ~1-2 min on 2 CPU cores

Times the corpus sweep alone (no perturbation, no Ray start-up) under two states, the
cost of one query's θ+ and θ−: the local executor with one torch thread, then Ray with
1 and 2 workers of one CPU each (private local Ray instance; blocks read by path, then
shipped through the object store). Prints tokens/s (tokens × states per second) and the
achieved forward FLOP/s from the model's per-token forward FLOPs, and appends the table
to benchmarks/RESULTS.md. The machine is shared: the ratios are the result.
"""

from __future__ import annotations

import platform
import tempfile
import time
from datetime import date

import torch
from results_log import publish

from bgotrace.config import AttributeConfig
from bgotrace.demo import DEMO_MAX_LENGTH, demo_corpus_path, demo_model_path
from bgotrace.dist.ray_executor import RayExecutor, RayOptions
from bgotrace.pipeline import load_inputs
from bgotrace.runtime.progress import set_progress
from bgotrace.score.executor import Block, LocalExecutor

BLOCK_UNITS = 64
BATCH = 16


def forward_flops_per_token(model: torch.nn.Module) -> float:
    """2 × (weights touched per token): every matrix of the blocks plus the LM head."""
    cfg = model.config
    d, n_layer, vocab = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    inner = cfg.n_inner or 4 * d
    per_block = 4 * d * d + 2 * d * inner  # attention q,k,v,o + MLP in/out
    return 2.0 * (n_layer * per_block + d * vocab)


def states_for(model: torch.nn.Module) -> list:
    """θ+ and θ− stand-ins: every parameter nudged (timing does not depend on the values)."""
    torch.manual_seed(0)
    return [
        {n: p.detach() + s * 1e-3 * torch.randn_like(p) for n, p in model.named_parameters()}
        for s in (1.0, -1.0)
    ]


def timed_sweep(executor, blocks, states, repeats: int = 2) -> float:
    """Best of ``repeats`` full sweeps (the first also warms allocators and workers)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in executor.run(blocks, states):
            pass
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    set_progress(False)
    torch.set_num_threads(1)
    model_dir, corpus = demo_model_path(), demo_corpus_path()
    with tempfile.TemporaryDirectory() as tmp:
        config = AttributeConfig.from_dict(
            {
                "model": {"path": str(model_dir)},
                "corpus": {"path": str(corpus), "max_length": DEMO_MAX_LENGTH, "cache_dir": tmp},
                "query": {"prompt": "DIPLOMACY, n.", "completion": " The patriotic art."},
                "execution": {"device": "cpu"},
            }
        )
        inputs = load_inputs(config)
        model, cache = inputs.model, inputs.cache
        n = len(cache)
        blocks = [
            Block(b, s, min(s + BLOCK_UNITS, n)) for b, s in enumerate(range(0, n, BLOCK_UNITS))
        ]
        states = states_for(model)
        tokens = int(cache.lengths.sum()) * len(states)
        flops = forward_flops_per_token(model)
        pad = int(inputs.tokenizer.pad_token_id or 0)
        rows = [
            (
                "this process, 1 thread",
                timed_sweep(
                    LocalExecutor(model, cache, BATCH, pad, torch.device("cpu")), blocks, states
                ),
            )
        ]
        for workers, ship in ((1, "never"), (2, "never"), (2, "always")):
            options = RayOptions(
                workers=workers,
                address=None,
                cpus_per_worker=1.0,
                gpus_per_worker=0.0,
                ship_cache=ship,
                block_attempts=3,
                timeout=120.0,
                batch_size=BATCH,
                pad_id=pad,
            )
            with RayExecutor(
                model, cache, options, cache_root=cache.root, manifest=cache.manifest
            ) as ray_exec:
                how = "by path" if ship == "never" else "shipped"
                rows.append(
                    (
                        f"Ray, {workers} worker(s), cache {how}",
                        timed_sweep(ray_exec, blocks, states),
                    )
                )
    base = rows[0][1]
    lines = [
        f"\n## Ray sweep throughput ({date.today()}, {platform.machine()}, "
        f"{torch.get_num_threads()} torch thread, shared 2-core machine)",
        "",
        f"Demo model ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"{flops / 1e6:.1f} MFLOP per token forward), {n} units, {tokens:,} tokens × states; "
        "`python benchmarks/bench_ray.py`.",
        "",
        "| executor | time (s) | tokens/s | GFLOP/s | vs. this process |",
        "|---|---|---|---|---|",
    ]
    for name, seconds in rows:
        rate = tokens / seconds
        lines.append(
            f"| {name} | {seconds:.2f} | {rate:,.0f} | {rate * flops / 1e9:.2f} | "
            f"{base / seconds:.2f}x |"
        )
    publish(lines)


if __name__ == "__main__":
    main()
