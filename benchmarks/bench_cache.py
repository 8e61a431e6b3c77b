"""Token cache at scale: peak memory of ``bgotrace cache build`` for a 10x larger corpus, and
tokenization throughput against the tokenizers library's own batch encoding.

    python benchmarks/bench_cache.py               # 2e6 vs 2e7 tokens (~5 min on 2 cores)
    python benchmarks/bench_cache.py --quick       # 2e5 vs 2e6, not recorded

A synthetic JSONL corpus is made from the demo corpus (each document 1-4 random demo entries
joined), in a temporary folder, at two sizes 10x apart. Each measurement runs in a fresh
subprocess (peak RSS = its ``ru_maxrss``; "above imports" subtracts its resident memory
after importing torch, transformers and bgotrace):

1. ``cache build``: ``bgotrace cache build`` (streamed, sharded) with the demo model's
   tokenizer, ``--max-length 128``;
2. ``list path``: the same cache built from ``load_documents`` (the corpus held as a list,
   as every run did before the cache streamed);
3. ``open + read``: open the cache and read every unit's tokens (the data side of a sweep;
   a full sweep on 2e7 tokens is too slow for this CPU benchmark);
4. throughput, in one subprocess, alternating 5 rounds and keeping each best (wall-clock
   and CPU seconds): the tokenizers backend's ``encode_batch`` (batches of 256 texts) on the
   texts of the small corpus, the same plus reading ``.ids``, bgotrace's
   :func:`iter_chunked_batches` (the same encode plus array chunking into units) and
   transformers' ``tokenizer(texts, return_offsets_mapping=True)`` (the old path's
   tokenization step, without its per-document Python chunking).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from results_log import publish

from bgotrace.corpus import load_documents
from bgotrace.demo import demo_corpus_path, demo_model_path
from bgotrace.modeling.loading import load_tokenizer

MAX_LENGTH = 128

MEMORY_CHILD = r"""
import json, resource, sys, time
mode, model, corpus, cache = sys.argv[1:5]
import torch, transformers
from bgotrace.cli.main import app
from bgotrace.cache import TokenCache, get_token_cache
from bgotrace.corpus import ChunkingConfig, load_documents
from bgotrace.corpus.bos import resolve_bos
from bgotrace.modeling.loading import load_tokenizer
def current_kib():  # resident now (Linux); the peak so far elsewhere
    try:
        status = open("/proc/self/status").read()
        return int(status.split("VmRSS:")[1].split()[0])
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
base = current_kib()
start = time.perf_counter()
if mode == "build":
    app(["cache", "build", "--model", model, "--corpus", corpus, "--cache-dir", cache,
         "--max-length", sys.argv[5], "--quiet"], standalone_mode=False)
elif mode == "list":
    tokenizer = load_tokenizer(model)
    chunking = ChunkingConfig(int(sys.argv[5]), bos_id=resolve_bos(tokenizer, "auto"))
    get_token_cache(load_documents(corpus), tokenizer, chunking, cache, progress=False)
else:
    tokens = TokenCache(cache)
    checksum = sum(int(tokens.unit_tokens(i).sum()) for i in range(len(tokens)))
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"base_mib": base / 1024, "peak_mib": peak / 1024, "seconds": seconds}))
"""

THROUGHPUT_CHILD = r"""
import json, sys, time
from tokenizers import Tokenizer
from bgotrace.corpus import ChunkingConfig, load_documents
from bgotrace.corpus.chunking import iter_chunked_batches
from bgotrace.modeling.loading import load_tokenizer
model, corpus = sys.argv[1:3]
tokenizer = load_tokenizer(model)
docs = load_documents(corpus)
texts = [d.text for d in docs]
backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
chunking = ChunkingConfig(int(sys.argv[3]))

def raw():
    return sum(len(e) for i in range(0, len(texts), 256)
               for e in backend.encode_batch(texts[i:i + 256], add_special_tokens=False))

def raw_ids():
    for i in range(0, len(texts), 256):
        [e.ids for e in backend.encode_batch(texts[i:i + 256], add_special_tokens=False)]

def ours():
    return sum(len(b.tokens) for b in iter_chunked_batches(docs, tokenizer, chunking))

def transformers_call():
    for i in range(0, len(texts), 256):
        tokenizer(texts[i:i + 256], add_special_tokens=False, return_offsets_mapping=True)

runs = (("raw", raw), ("raw_ids", raw_ids), ("ours", ours), ("transformers", transformers_call))
best = {f"{name}_{clock}": float("inf") for name, _ in runs for clock in ("wall", "cpu")}
n_tokens = raw()
for _ in range(5):
    for name, fn in runs:
        wall, cpu = time.perf_counter(), time.process_time()  # cpu: all threads of the process
        fn()
        best[name + "_wall"] = min(best[name + "_wall"], time.perf_counter() - wall)
        best[name + "_cpu"] = min(best[name + "_cpu"], time.process_time() - cpu)
print(json.dumps({**best, "tokens": n_tokens}))
"""


def synthetic_corpus(path: Path, n_tokens: int, seed: int = 0) -> int:
    """Write a JSONL corpus of about ``n_tokens`` demo-tokenizer tokens; its document count."""
    texts = [d.text for d in load_documents(demo_corpus_path())]
    tokenizer = load_tokenizer(demo_model_path())
    n_demo = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    chars_per_token = sum(map(len, texts)) / n_demo
    rng = np.random.default_rng(seed)
    target, written, n_docs = n_tokens * chars_per_token, 0, 0
    with path.open("w", encoding="utf-8") as out:
        while written < target:
            parts = rng.choice(len(texts), size=int(rng.integers(1, 5)))
            text = "\n\n".join(texts[i] for i in parts)
            row = {"id": f"syn{n_docs}", "text": text, "source": f"s{n_docs % 8}"}
            out.write(json.dumps(row) + "\n")
            written, n_docs = written + len(text), n_docs + 1
    return n_docs


def run_child(code: str, *args: str) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(root: Path, n_tokens: int) -> dict[str, dict[str, float]]:
    corpus = root / f"corpus-{n_tokens}.jsonl"
    n_docs = synthetic_corpus(corpus, n_tokens)
    model = str(demo_model_path())
    out: dict[str, dict[str, float]] = {}
    for mode in ("build", "read", "list"):
        cache = root / f"cache-{n_tokens}-{'list' if mode == 'list' else 'stream'}"
        out[mode] = run_child(MEMORY_CHILD, mode, model, str(corpus), str(cache), str(MAX_LENGTH))
    manifest = json.loads((root / f"cache-{n_tokens}-stream" / "manifest.json").read_text())
    out["corpus"] = {
        "docs": n_docs,
        "tokens": manifest["n_tokens"],
        "mib": corpus.stat().st_size / 2**20,
        "shards": len(manifest["shards"]),
    }
    return out


def table(small: dict, large: dict, speed: dict, command: str) -> list[str]:
    def row(mode: str, label: str) -> str:
        a, b = small[mode], large[mode]
        above = (b["peak_mib"] - b["base_mib"]) / max(a["peak_mib"] - a["base_mib"], 1e-9)
        return (
            f"| {label} | {a['peak_mib']:.0f} | {b['peak_mib']:.0f} | "
            f"**{b['peak_mib'] / a['peak_mib']:.2f}** | {a['peak_mib'] - a['base_mib']:.0f} | "
            f"{b['peak_mib'] - b['base_mib']:.0f} | {above:.1f} | {a['seconds']:.1f} | "
            f"{b['seconds']:.1f} |"
        )

    s, g = small["corpus"], large["corpus"]
    return [
        "",
        "## Token cache at scale: streamed build memory and tokenization throughput (issue 14)",
        "",
        f"`{command}` — {platform.machine()}, {os.cpu_count()} cores shared with other jobs "
        f"(load average {os.getloadavg()[0]:.0f} at the end), demo tokenizer, `--max-length "
        f"{MAX_LENGTH}`. Corpora: {s['tokens']:,} tokens / {s['docs']:,} documents / "
        f"{s['mib']:.0f} MiB of JSONL vs {g['tokens']:,} / {g['docs']:,} / {g['mib']:.0f} MiB "
        f"({s['shards']} and {g['shards']} shard(s) of at most 64 Mi tokens). Peak RSS in MiB "
        'of a fresh process per row; "above imports" subtracts its resident memory after '
        "importing torch, transformers and bgotrace.",
        "",
        "| stage | peak small | peak 10x | ratio (target ≤ 1.3) | above imports, small | "
        "above imports, 10x | ratio above imports | s small | s 10x |",
        "|---|---|---|---|---|---|---|---|---|",
        row("build", "`cache build` (streamed, sharded)"),
        row("list", "list path (`load_documents` + cache)"),
        row("read", "open cache + read every unit"),
        "",
        f"Tokenization throughput on the small corpus's texts ({speed['tokens']:,} tokens, "
        "best of 5 rounds, alternating; wall-clock, and CPU seconds of all the process's "
        "threads, which the shared machine disturbs less):",
        "",
        "| path | M tokens/s (wall) | vs encode_batch (wall) | vs encode_batch (CPU) |",
        "|---|---|---|---|",
        *(speed_row(speed, name, label) for name, label in SPEED_ROWS),
        "",
    ]


SPEED_ROWS = (
    ("raw", "tokenizers `encode_batch` (batches of 256 texts; the target's reference)"),
    ("raw_ids", "`encode_batch` + reading `.ids` (the least any consumer does)"),
    ("ours", "bgotrace `iter_chunked_batches`: encode, ids + offsets to arrays, units cut"),
    ("transformers", "transformers `tokenizer(texts, return_offsets_mapping=True)` (old path)"),
)


def speed_row(speed: dict, name: str, label: str) -> str:
    wall, cpu = speed[f"{name}_wall"], speed[f"{name}_cpu"]
    return (
        f"| {label} | {speed['tokens'] / wall / 1e6:.2f} | "
        f"**{speed['raw_wall'] / wall:.2f}** | **{speed['raw_cpu'] / cpu:.2f}** |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2e5 vs 2e6 tokens, not recorded")
    args = parser.parse_args()
    small = 200_000 if args.quick else 2_000_000
    command = "python benchmarks/bench_cache.py" + (" --quick" if args.quick else "")
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        root = Path(tmp)
        small_run, large_run = measure(root, small), measure(root, 10 * small)
        speed = run_child(
            THROUGHPUT_CHILD, str(demo_model_path()), str(root / f"corpus-{small}.jsonl"),
            str(MAX_LENGTH),
        )  # fmt: skip
    publish(table(small_run, large_run, speed, command), record=not args.quick)


if __name__ == "__main__":
    main()
