"""Cost of span attribution: what one more span costs next to one whole-completion query.

    OMP_NUM_THREADS=1 python benchmarks/bench_spans.py           # ~1-2 min on one core
    OMP_NUM_THREADS=1 python benchmarks/bench_spans.py --quick   # seconds, smaller corpus

Measured side by side in one run, same model, corpus and query (4 sentences):
1. the whole completion alone (``--spans none``);
2. the whole completion and its 4 sentence spans in one sweep (``--spans sentence``);
3. the same 5 queries with one sweep each (``queries_per_sweep=1`` and the spans passed as
   separate queries), i.e. what a user pays without span support.
Printed: the cost per span as a fraction of one whole-completion query,
``(t_spans - t_whole) / 4 / t_whole``, for all parameters and for ``--params last:1``
(where a shared frozen trunk, when the engine has one, makes a span's extra states cheaper).
Ratios, not absolute times, are the result: these machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import tempfile
from datetime import date
from pathlib import Path

import torch
from bench_sweep import WORDS, corpus, timed
from results_log import publish
from transformers import GPT2Config, GPT2LMHeadModel

from bgotrace.config import AttributeConfig
from bgotrace.pipeline import load_inputs, run_attribution
from bgotrace.query import Query
from bgotrace.runtime.progress import set_progress
from bgotrace.train.tokenizer import train_tokenizer

SENTENCES = 4


def completion() -> str:
    return "".join(" " + " ".join(WORDS[4 * i : 4 * i + 4]) + "." for i in range(SENTENCES))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    args = parser.parse_args()
    set_progress(False)
    torch.manual_seed(0)
    docs = corpus(60 if args.quick else 300)
    tokenizer = train_tokenizer([d.text for d in docs], vocab_size=512)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=128, n_layer=4, n_head=4)
    ).eval()
    query = Query("q", "the river and the", completion())
    cache = Path(tempfile.mkdtemp(prefix="bgotrace-bench-"))  # fresh: never a stale cache

    def run(params: str, spans: str = "none", separate: bool = False) -> None:
        config = AttributeConfig.from_dict(
            {
                "model": {"path": "<in-memory>"},
                "corpus": {"path": "<in-memory>", "max_length": 128, "cache_dir": str(cache)},
                "query": {"prompt": query.prompt, "completion": query.completion, "spans": spans},
                "perturb": {"steps": 2, "params": params},
                "scoring": {"queries_per_sweep": 1 if separate else 8},
                "output": {"top_tokens": 0},
            }
        )
        inputs = load_inputs(config, model=model, tokenizer=tokenizer, documents=docs)
        if separate:  # each span a query of its own, as without span support: one sweep each
            inputs.queries = [dataclasses.replace(q, span=None) for q in inputs.queries]
        run_attribution(config, inputs)

    run("all")  # warm-up: builds the token cache
    rows = []
    for params in ("all", "last:1"):
        modes = {
            "whole": lambda p=params: run(p),
            "spans": lambda p=params: run(p, "sentence"),
            "separate": lambda p=params: run(p, "sentence", separate=True),
        }
        # Interleaved rounds, best of each: load from other jobs drifts over minutes, and
        # timing one mode after the other would fold that drift into the ratios.
        best = {name: float("inf") for name in modes}
        for _ in range(args.rounds):
            for name, fn in modes.items():
                best[name] = min(best[name], timed(fn, repeats=1))
        rows.append((params, best["whole"], best["spans"], best["separate"]))
    report(rows, n_docs=len(docs), quick=args.quick)


def report(rows: list[tuple[str, float, float, float]], n_docs: int, quick: bool) -> None:
    lines = [
        f"\n### Span attribution cost ({date.today()}, {platform.machine()}, "
        f"{torch.get_num_threads()} threads, {n_docs} docs, {SENTENCES} sentence spans"
        f"{', quick' if quick else ''})\n",
        "| params | whole only (s) | whole + spans, one sweep (s) | one sweep each (s) "
        "| cost per span / whole query | one sweep vs one each |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for params, whole, spans, separate in rows:
        per_span = (spans - whole) / SENTENCES / whole
        lines.append(
            f"| {params} | {whole:.2f} | {spans:.2f} | {separate:.2f} | {per_span:.2f} "
            f"| {separate / spans:.2f}x |"
        )
    publish(lines)


if __name__ == "__main__":
    main()
