"""Where the time of many queries in one call goes, beside one query (cProfile, issue 18).

    OMP_NUM_THREADS=2 python benchmarks/profile_multi_query.py                # issue 18's setting
    OMP_NUM_THREADS=2 python benchmarks/profile_multi_query.py --docs 300     # ~4x shorter

Issue 18's setting: a random-init GPT-2 (12 blocks, width 128, the demo tokenizer's 2,048
tokens), the demo corpus cycled to ``--docs`` documents (1,200: ~43k tokens, units of ~36
tokens), warm token cache and normaliser, ``--top-tokens 0``, the Python API as a user calls
it. One call with one query and one call with ``--queries`` queries (``--per-sweep`` of them
per sweep) are profiled; per function the cumulative CPU seconds of both are printed with
``excess = t(n) − n·t(1)``: what the n-query call spends beyond n one-query calls. The
functions with the largest excess come first; a function whose cost grows with the number
of queries beyond the perturbation and the sweep shows up there. Records nothing.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

import bgotrace
from bgotrace.corpus import Document, load_documents
from bgotrace.demo import demo_corpus_path, demo_model_path
from bgotrace.query import Query
from bgotrace.runtime.progress import set_progress


def demo_documents(n: int) -> list[Document]:
    """The demo corpus cycled to ``n`` documents (ids made unique)."""
    base = load_documents(str(demo_corpus_path()))
    return [Document(f"d{i}", base[i % len(base)].text, base[i % len(base)].source)
            for i in range(n)]  # fmt: skip


def random_gpt2(vocab: int, layers: int = 12, width: int = 128, context: int = 128):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_positions=context, n_embd=width, n_layer=layers,
                        n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return GPT2LMHeadModel(config).eval()


def queries(n: int) -> list[Query]:
    words = "river mountain forest capital language city sea island winter summer".split()
    return [Query(f"q{i}", f"The {words[i % 10]} of", f" the {words[(3 * i + 1) % 10]}.")
            for i in range(n)]  # fmt: skip


def profiled(fn) -> tuple[float, dict[str, float]]:
    """CPU seconds of ``fn()`` and each function's cumulative CPU seconds in it (this
    process's CPU time: with one torch thread, robust to the other processes' load)."""
    profile = cProfile.Profile(time.process_time)
    start = time.process_time()
    profile.runcall(fn)
    wall = time.process_time() - start
    stats: Any = pstats.Stats(profile).stats  # (file, line, name) -> (cc, nc, tt, ct, callers)
    cumulative: dict[str, float] = {}
    for (file, line, name), (_, _, _, ct, _) in stats.items():
        key = f"{Path(file).name}:{line}({name})"
        cumulative[key] = cumulative.get(key, 0.0) + ct
    return wall, cumulative


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=1200)
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--per-sweep", type=int, default=16)
    parser.add_argument("--top", type=int, default=25, help="functions printed")
    args = parser.parse_args()
    set_progress(False)
    tok = AutoTokenizer.from_pretrained(demo_model_path())
    model, docs = random_gpt2(len(tok)), demo_documents(args.docs)
    cache = Path(tempfile.mkdtemp(prefix="bgotrace-profile-multi-"))
    config = {
        "corpus": {"max_length": 128, "cache_dir": str(cache)},
        "scoring": {"queries_per_sweep": args.per_sweep},
        "output": {"top_tokens": 0},
    }

    def call(n: int):
        return lambda: bgotrace.attribute(model, tok, docs, queries=queries(n), config=config)

    call(1)()  # warm-up: token cache and the normaliser's gradient norms
    one, t1 = profiled(call(1))
    many, tn = profiled(call(args.queries))
    n = args.queries
    print(f"{len(docs)} documents, torch threads {torch.get_num_threads()}, CPU seconds: "
          f"1 query {one:.2f} s, "
          f"{n} queries ({args.per_sweep} per sweep) {many:.2f} s = {many / one:.2f} x one "
          f"(excess over {n} one-query calls: {many - n * one:+.2f} s)")  # fmt: skip
    rows = sorted(tn, key=lambda k: tn[k] - n * t1.get(k, 0.0), reverse=True)[: args.top]
    print(f"\n{'function':<70} {'t(1)':>8} {f't({n})':>9} {'excess':>9}")
    for key in rows:
        a, b = t1.get(key, 0.0), tn[key]
        print(f"{key[:70]:<70} {a:8.3f} {b:9.3f} {b - n * a:+9.3f}")


if __name__ == "__main__":
    main()
