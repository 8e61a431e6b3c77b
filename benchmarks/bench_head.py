"""The LM head's share of a restricted state's cost, and what the chunked head saves.

    OMP_NUM_THREADS=1 python benchmarks/bench_head.py     # ~1 min on one core

Per batch (16 units x 32 tokens) of a random GPT-2 split at its last two blocks: the two
top blocks + final norm, the head as the full-logits path computes it (all positions,
(B, T, V) logits, float32 cross-entropy), and the chunked head (predicted positions only,
256-token chunks). Widths 128 and 768, vocabularies 2,048 and 50,257. Prints and appends
to benchmarks/RESULTS.md; the best of 5 timings each, run round-robin.
"""

from __future__ import annotations

import platform
import time
from datetime import date

import torch
from results_log import publish
from transformers import GPT2Config, GPT2LMHeadModel

from bgotrace.modeling.losses import head_token_losses, token_losses
from bgotrace.modeling.split import head, top_hidden, trunk

CASES = [(128, 12, 2048), (128, 12, 50257), (768, 12, 50257)]


def best_interleaved(fns: list, repeats: int = 5) -> list[float]:
    """Best time of each function, run round-robin so a load change hits all of them."""
    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()  # warm-up
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return [min(t) for t in times]


@torch.inference_mode()
def case(width: int, layers: int, vocab: int) -> tuple[float, float, float]:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=width, n_layer=layers,
                        n_head=4)  # fmt: skip
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, vocab, (16, 32))
    mask = torch.ones_like(ids)
    shared = trunk(model, ids, mask, layers - 2)
    hidden = top_hidden(model, shared, None)  # (B, T, D)
    lm = head(model)
    blocks, full, chunked = best_interleaved(
        [
            lambda: top_hidden(model, shared, None),
            lambda: token_losses(lm(hidden), ids),
            lambda: head_token_losses(hidden, lm, ids),
        ]
    )
    return blocks, full, chunked


def main() -> None:
    lines = [
        f"\n### LM head share per state ({date.today()}, {platform.machine()}, "
        f"{torch.get_num_threads()} thread(s), shared machine)\n",
        "`OMP_NUM_THREADS=1 python benchmarks/bench_head.py` — one batch of 16 x 32 tokens, "
        "split at the last 2 of 12 blocks; best of 5, round-robin.\n",
        "| width | vocab | 2 blocks (ms) | head, full logits (ms) | head, chunked (ms) | "
        "head/2 blocks, chunked | chunked vs full |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for width, layers, vocab in CASES:
        blocks, full, chunked = case(width, layers, vocab)
        lines.append(
            f"| {width} | {vocab} | {blocks * 1e3:.1f} | {full * 1e3:.1f} | {chunked * 1e3:.1f} "
            f"| {chunked / blocks:.2f} | {chunked / full:.2f} |"
        )
    publish(lines)


if __name__ == "__main__":
    main()
