"""BGO's corpus sweep on one GPU against a plain Hugging Face inference pass over the same tokens.

    python benchmarks/gpu_sweep.py                 # one CUDA GPU, < 5 min (prints a table)
    python benchmarks/gpu_sweep.py --record        # ... and appends it to RESULTS.md
    python benchmarks/gpu_sweep.py --device cpu --tiny --no-record   # smoke test (CPU, ~10 min:
    #   the tiny Llama keeps the 128k-token vocabulary, slow in bfloat16 on a CPU)
    python benchmarks/gpu_sweep.py --device cpu --tiny --models gpt2-small --no-record  # ~2 min

Two randomly initialised shapes, weights in bfloat16 (``--model-dtype bfloat16``: no float32
copy), SDPA attention, losses accumulated in float32:

* ``gpt2-small``: 12 layers, width 768, vocabulary 50,257 (the LM head costs ~5 blocks);
* ``llama-1b``: Llama-3.2-1B's shape (16 layers, width 2,048, GQA 32/8 heads, MLP 8,192,
  vocabulary 128,256, tied head).

For each, on a synthetic corpus of ``--tokens`` tokens (default 2e6; 128-token units) with
every cache warm (token cache built and the normaliser computed by a first, untimed query):

1. the plain pass: ``model(input_ids, attention_mask).logits`` and a float32 cross-entropy per
   unit, same batches — what any user's inference loop costs; BGO's physical limit for one
   query is two of them (θ+ and θ−);
2. one full-model BGO query end to end (perturbation, the sweep under θ+ and θ−, ranking,
   top tokens), ``--params all``, Adam, K = 10;
3. the normaliser alone (``--normalize sensitivity`` on a fresh cache directory).

It prints tokens/s of each, the ratio 2 plain passes / one query (1.0 = BGO costs exactly two
inference passes) and the peak GPU memory of each stage (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import platform
import random
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import numpy as np
import torch
from results_log import publish
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import bgotrace
from bgotrace.cache import TokenCache
from bgotrace.cache.batching import collate, length_buckets
from bgotrace.corpus import Document
from bgotrace.query import Query
from bgotrace.runtime.progress import set_progress
from bgotrace.train.tokenizer import train_tokenizer

UNIT = 128
WORDS = (
    "river mountain forest capital language model token gradient query corpus data "
    "attribution city sea island winter summer light dark stone glass paper ink"
).split()


def shapes(tiny: bool) -> dict[str, Callable[[], torch.nn.Module]]:
    """Model builders by name; ``tiny`` shrinks both to a few layers for the CPU smoke test."""
    if tiny:
        gpt2 = GPT2Config(vocab_size=50257, n_positions=UNIT, n_embd=64, n_layer=2, n_head=4)
        llama = LlamaConfig(vocab_size=128256, hidden_size=64, intermediate_size=256,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=UNIT, tie_word_embeddings=True)  # fmt: skip
    else:
        gpt2 = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
        llama = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                            num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                            max_position_embeddings=131072, rope_theta=500000.0,
                            tie_word_embeddings=True)  # fmt: skip
    for cfg in (gpt2, llama):
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout"):
            if hasattr(cfg, name):
                setattr(cfg, name, 0.0)
    return {
        "gpt2-small": lambda: GPT2LMHeadModel._from_config(gpt2, attn_implementation="sdpa"),
        "llama-1b": lambda: LlamaForCausalLM._from_config(llama, attn_implementation="sdpa"),
    }


def corpus(n_tokens: int, seed: int = 0) -> list[Document]:
    """Synthetic documents of ~1,000 words (about as many tokens) until ``n_tokens``."""
    rng = random.Random(seed)
    n_docs = max(1, n_tokens // 1000)
    return [Document(f"d{i}", " ".join(rng.choices(WORDS, k=1000)), "syn") for i in range(n_docs)]


def synced(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(seconds, peak GiB allocated on the device) of ``fn()``; the queue drained around it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter() - start, torch.cuda.max_memory_allocated(device) / 2**30
    return time.perf_counter() - start, float("nan")


@torch.inference_mode()
def hf_pass(model: torch.nn.Module, cache: TokenCache, batch: int, device: torch.device) -> None:
    """A plain Hugging Face inference pass: logits, then each unit's float32 loss."""
    for rows in length_buckets(np.arange(len(cache)), cache.lengths, batch):
        ids, mask, labels = collate(cache, rows, 0, device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), labels[:, 1:], reduction="none"
        ).sum(dim=1)


def config(cache_dir: Path, batch: int, normalize: str) -> dict:
    return {
        "model": {"dtype": "bfloat16"},
        "corpus": {"max_length": UNIT, "cache_dir": str(cache_dir)},
        "scoring": {"dtype": "bfloat16", "batch_size": batch, "normalize": normalize},
        "output": {"top_tokens": 3},
    }


def measure(name: str, build, docs, tok, args, device: torch.device) -> list[str]:
    torch.manual_seed(0)
    model = build().to(device=device, dtype=torch.bfloat16).eval()
    work = Path(tempfile.mkdtemp(prefix=f"bgotrace-gpu-{name}-"))
    query = [Query("q0", "river mountain forest", " capital language")]

    def bgo(cache_dir: Path, normalize: str) -> None:
        bgotrace.attribute(model, tok, docs, queries=query,
                           config=config(cache_dir, args.batch, normalize))  # fmt: skip

    bgo(work / "cache", "none")  # warm-up: token cache, kernels, allocator
    cache = TokenCache(work / "cache")
    tokens = int(cache.lengths.sum())
    plain, plain_mem = synced(lambda: hf_pass(model, cache, args.batch, device), device)
    full, full_mem = synced(lambda: bgo(work / "cache", "none"), device)
    norm, norm_mem = synced(lambda: bgo(work / "cache-norm", "sensitivity"), device)
    n_params = sum(p.numel() for p in model.parameters())
    return [
        f"| {name} ({n_params / 1e9:.2f}B) | plain HF bf16 pass | {plain:.1f} | "
        f"{tokens / plain:,.0f} | {plain_mem:.1f} | |",
        f"| {name} | one BGO query, --params all | {full:.1f} | {tokens / full:,.0f} | "
        f"{full_mem:.1f} | {2 * plain / full:.2f} of its 2-pass limit |",
        f"| {name} | normaliser + one query (fresh cache) | {norm:.1f} | {tokens / norm:,.0f} | "
        f"{norm_mem:.1f} | normaliser ≈ {(norm - full) / plain:.2f} plain passes |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    parser.add_argument("--tokens", type=float, default=2e6, help="corpus size in tokens")
    parser.add_argument("--batch", type=int, default=64, help="units per forward pass")
    parser.add_argument("--models", default="gpt2-small,llama-1b")
    parser.add_argument("--record", action=argparse.BooleanOptionalAction, default=False,
                        help="append the table to RESULTS.md")  # fmt: skip
    args = parser.parse_args()
    device = torch.device(args.device)
    set_progress(False)
    tokens = int(min(args.tokens, 2e4) if args.tiny else args.tokens)
    docs = corpus(tokens)
    tok = train_tokenizer([d.text for d in docs[:200]], vocab_size=512)
    builders = shapes(args.tiny)
    rows = [
        row for name in args.models.split(",") for row in measure(name, builders[name], docs,
                                                                   tok, args, device)
    ]  # fmt: skip
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    lines = [
        f"\n### BGO sweep vs a plain HF inference pass on {gpu} ({date.today()})\n",
        f"`python benchmarks/gpu_sweep.py{' --tiny' if args.tiny else ''}` — {tokens:,} corpus "
        f"tokens in {UNIT}-token units, batch {args.batch}, bf16 weights, SDPA, float32 losses.\n",
        "| model | run | seconds | tokens/s | peak GiB | ratio |",
        "|---|---|---:|---:|---:|---|",
        *rows,
    ]
    publish(lines, record=args.record)


if __name__ == "__main__":
    main()
