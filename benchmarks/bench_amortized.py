"""Amortized BGO: what a query costs as a fraction of a corpus pass, measured side by side.

    OMP_NUM_THREADS=1 python benchmarks/bench_amortized.py --model 12x128   # ~20 min, 1 core
    OMP_NUM_THREADS=1 python benchmarks/bench_amortized.py --model 6x256
    OMP_NUM_THREADS=1 python benchmarks/bench_amortized.py --model 12x128 --quick  # ~2 min
    OMP_NUM_THREADS=1 python benchmarks/bench_amortized.py --model 12x128 --unit-length 32
    OMP_NUM_THREADS=2 python benchmarks/bench_amortized.py --many-queries --unit-length 36
    OMP_NUM_THREADS=2 python benchmarks/bench_amortized.py --many-queries --unit-length 128

A randomly initialised GPT-2 (12 layers x width 128, or 6 x 256; vocabulary 2,048, so the
LM head costs about one block; context = the unit length) over >= 1,000 synthetic units of
``--unit-length`` tokens (default 128, the setting issue 6 measured; documents grow with it, so
the unit count stays about 1,100 and the tokens grow). With 32-token units the corpus pass is 4x
shorter, so a query's fixed costs (the perturbation, writing the run) weigh 4x more in the
ratios. Prints and appends to benchmarks/RESULTS.md:

1. one full-model query end to end (perturbation, sweep, top tokens, written run) vs its
   physical limit: two plain inference passes (model forward + loss) over the same units;
   every BGO run below is end to end too (outputs and HTML report written);
2. 16 queries with ``--params last:2`` in one sweep vs 16 full-model single-query runs
   (one run measured, times 16: each costs the same), cold and with a warm trunk cache;
3. corpus x1 vs x4 (one last:2 query, each in a fresh process): time, the sweep's own memory
   (peak RSS during ``bgotrace.attribute`` minus the RSS just before it: the import of torch
   sets the process's lifetime peak, which would hide the sweep) and the whole process's peak
   RSS during the run;
4. time to the first result and to 32 results: BGO (full; last:2 shared; last:2 + warm
   trunk cache), and with ``--baselines trackstar,ekfac`` those methods (index build or
   factor fit, then queries).

``--many-queries`` measures issue 18's ratios instead (each row side by side in one process):
16 full-model queries in one call vs 16 one-query calls (a loop over the same 16 queries,
timed as one run, as a user without ``--queries`` runs them) at 1, 4 and 16 queries per sweep
(target <= 1.0); one full-model query vs its 2-pass limit (>= 0.9); 16 ``last:2`` queries in
one sweep vs 16 full single runs (<= 0.30); and the spread of identical calls (the two
rounds of each run: max/min - 1, target <= 5% on an idle machine; the plain passes, torch's
forward alone, give the machine's own spread); with ``--sweep-order`` the sweep's order: 16 per
sweep with each state run over a window of batches (``score.sweep.WINDOW_TOKENS``) vs the
order before it, every batch under every state in turn; with ``--flops`` each run's matmul
FLOPs, counted once more under ``FlopCounterMode``: a ratio no load moves, which says whether
a run does more arithmetic than its reference; with ``--ops`` each run's torch operator calls
and Python function calls, counted once more (no load moves them either: they show per-call or
per-group overhead that FLOPs miss); and what the kernel did per call (system
time, page faults, context switches: would show allocation or thread trouble in the code).
``--top-tokens 0`` there, as in the issue.
Every ratio is given twice: of the best round of each run, and paired (the median and range
over ``--rounds`` of the ratio within one round, whose runs are minutes apart, so a slow
drift of the machine's speed cancels; the order of the runs is reversed every other round, so
a drift within a round cancels over two). ``--runs loop,many4`` times only those runs (their
rows), for more rounds of the comparison that matters in the same time.

Each timing is the best of ``--rounds`` (2) rounds taken in turn. Ratios, not absolute times,
are the result: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import gc
import json
import platform
import pstats
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from results_log import publish
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

import bgotrace
from bgotrace.baselines import MethodContext, get_attributor
from bgotrace.cache import TokenCache
from bgotrace.cache.batching import collate, length_buckets
from bgotrace.config import ScoreConfig
from bgotrace.corpus import Document
from bgotrace.modeling.losses import forward_logits, token_losses
from bgotrace.query import Query, encode_query
from bgotrace.runtime.progress import set_progress
from bgotrace.score import executor as sweep_executor
from bgotrace.score import sweep
from bgotrace.train.tokenizer import train_tokenizer

WORDS = (
    "river mountain forest capital language model token gradient query corpus data "
    "attribution city sea island winter summer light dark stone glass paper ink"
).split()
SHAPES = {"12x128": (12, 128), "6x256": (6, 256)}
UNIT_LENGTH, VOCAB, BATCH = 128, 2048, 16


def corpus(n_docs: int, seed: int = 0, unit_length: int = 32) -> list[Document]:
    """Synthetic documents of 40-160 words (about 1.2 tokens each) x ``unit_length`` / 32."""
    rng = random.Random(seed)
    scale = unit_length / 32
    return [
        Document(
            f"d{i}",
            " ".join(rng.choice(WORDS) for _ in range(round(rng.randint(40, 160) * scale))),
            "syn",
        )
        for i in range(n_docs)
    ]


def build_model(shape: str, unit_length: int) -> GPT2LMHeadModel:
    """The random GPT-2 of ``shape`` (LxD), with a context of ``unit_length`` positions."""
    layers, width = SHAPES[shape]
    return GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_positions=unit_length, n_embd=width, n_layer=layers,
                   n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    ).eval()  # fmt: skip


def random_setup(n_docs: int, unit_length: int, shape: str = "12x128"):
    """This benchmark's inputs, for the scripts that profile it: the seeded synthetic corpus of
    ``n_docs`` documents, a 512-token tokenizer trained on it and a random-init GPT-2."""
    set_progress(False)
    torch.manual_seed(0)
    docs = corpus(n_docs, unit_length=unit_length)
    tok = train_tokenizer([d.text for d in docs], vocab_size=512)
    return docs, tok, build_model(shape, unit_length)


def queries(n: int) -> list[Query]:
    return [
        Query(f"q{i}", " ".join(WORDS[i % 20 : i % 20 + 4]), " " + WORDS[(i * 7) % len(WORDS)])
        for i in range(n)
    ]


def config(
    cache: Path, params: str = "all", unit_length: int = UNIT_LENGTH, **scoring: Any
) -> dict[str, Any]:
    return {
        "corpus": {"max_length": unit_length, "cache_dir": str(cache)},
        "perturb": {"params": params},  # defaults otherwise: Adam, K = 10 steps each way
        # the first-order diagnostic (issue 15) off: measured apart from the engine's
        # amortization (the row "shipped defaults" has it on)
        "scoring": {
            "batch_size": BATCH,
            "queries_per_sweep": 16,
            "linearity_sample": 0,
            **scoring,
        },
        "output": {"top_tokens": 3},
    }


def interleaved(runs: dict[str, Any], rounds: int = 2) -> dict[str, float]:
    """Best of ``rounds`` wall seconds per run, the runs taken in turn (a load change hits all):
    :func:`spread_of`'s wall clock."""
    return spread_of(runs, rounds)["wall"]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.inference_mode()
def plain_pass(model: torch.nn.Module, cache: TokenCache, batch_size: int = BATCH) -> None:
    """The physical limit's unit: one forward + loss per unit, same batching, nothing else."""
    device = next(model.parameters()).device
    for batch in length_buckets(np.arange(len(cache)), cache.lengths, batch_size):
        ids, mask, labels = collate(cache, batch, 0, device)
        token_losses(forward_logits(model, ids, mask), labels).sum(dim=1)


def memory_mib() -> dict[str, float]:
    """This process's resident set now (VmRSS) and its peak (VmHWM), MiB (Linux)."""
    fields = dict(re.findall(r"^(\w+):\s+(\d+) kB$", Path("/proc/self/status").read_text(), re.M))
    return {k: int(fields[k]) / 1024 for k in ("VmRSS", "VmHWM")}


def reset_peak_rss() -> None:
    """Make VmHWM start again from the current RSS (Linux ``clear_refs`` 5), so the peak read
    afterwards is the peak of what runs next, not of importing torch."""
    Path("/proc/self/clear_refs").write_text("5")


def child_rss(args: argparse.Namespace) -> None:
    """One last:2 query in this fresh process: print its seconds, the RSS just before it,
    and the peak RSS while it ran (MiB)."""
    set_progress(False)
    model = GPT2LMHeadModel.from_pretrained(args.work / "model").eval()
    tok = PreTrainedTokenizerFast.from_pretrained(args.work / "model")
    docs = corpus(args.docs, unit_length=args.unit_length)
    cfg = config(args.cache, "last:2", args.unit_length)
    gc.collect()
    before = memory_mib()["VmRSS"]
    reset_peak_rss()
    seconds = timed(lambda: bgotrace.attribute(model, tok, docs, queries=queries(1), config=cfg))
    peak = memory_mib()["VmHWM"]
    print(json.dumps({"seconds": seconds, "rss_before_mib": before, "peak_mib": peak}))


def run_child(work: Path, cache: Path, docs: int, unit_length: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", "--work", str(work), "--cache", str(cache),
           "--docs", str(docs), "--unit-length", str(unit_length)]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="12x128")
    parser.add_argument("--quick", action="store_true", help="smaller corpus, fewer queries")
    parser.add_argument(
        "--unit-length",
        type=int,
        default=UNIT_LENGTH,
        help="tokens per unit, also the model's context (default 128; 32: the earlier setting)",
    )
    parser.add_argument(
        "--baselines", default="", help="also time these methods, e.g. trackstar,ekfac (slow)"
    )
    parser.add_argument(
        "--single-only",
        action="store_true",
        help="only row 1 (one full-model query vs its limit): minutes instead of ~20",
    )
    parser.add_argument(
        "--many-queries",
        action="store_true",
        help="issue 18's ratios: n queries in one call vs n one-query calls, and their spread",
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="--many-queries: rounds of every run (default 2)"
    )
    parser.add_argument(
        "--sweep-order",
        action="store_true",
        help="--many-queries: also n per sweep in the sweep's order before its windows",
    )
    parser.add_argument(
        "--flops", action="store_true", help="--many-queries: also each run's matmul FLOPs"
    )
    parser.add_argument(
        "--ops",
        action="store_true",
        help="--many-queries: also each run's torch operator and Python function calls",
    )
    parser.add_argument(
        "--runs",
        default="",
        help="--many-queries: only these runs, e.g. loop,many1,many4,many16 (default: all)",
    )
    parser.add_argument(
        "--n-docs", type=int, default=300, help="documents (300: >= 1,000 units; fewer: faster)"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--docs", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_rss(args)
    set_progress(False)
    torch.manual_seed(0)
    n_docs, n_q = (60, 4) if args.quick else (args.n_docs, 16)
    docs = corpus(n_docs, unit_length=args.unit_length)
    tok = train_tokenizer([d.text for d in docs], vocab_size=512)
    model = build_model(args.model, args.unit_length)
    work = Path(tempfile.mkdtemp(prefix="bgotrace-amortized-"))
    model.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    baselines = [b for b in args.baselines.split(",") if b]
    if args.single_only:
        return report_single(args, *single_query(model, tok, docs, work, args.unit_length))
    if args.many_queries:
        measured = many_queries(model, tok, docs, work, args.unit_length, n_q, rounds=args.rounds,
                                sweep_order=args.sweep_order, flops=args.flops, ops=args.ops,
                                only=[r for r in args.runs.split(",") if r])  # fmt: skip
        return report_many(args, measured)
    rows, notes = measure(model, tok, docs, n_q, work, baselines, args.unit_length)
    report(args, rows, notes)


def measure(
    model, tok, docs, n_q: int, work: Path, baselines: list[str], unit_length: int
) -> tuple[list, dict]:
    cache_dir = work / "cache"
    one, many = queries(1), queries(n_q)

    def attribute(qs, params="all", **scoring):  # end to end: every run writes its outputs
        cfg = config(cache_dir, params, unit_length, **scoring)
        out = work / "run"
        return bgotrace.attribute(model, tok, docs, queries=qs, config=cfg, out=out, overwrite=True)

    attribute(one)  # warm-up: builds the token cache
    attribute(one, "last:2", trunk_cache=True)  # builds the trunk cache
    cache = TokenCache(cache_dir)
    t = interleaved(
        {
            "limit": lambda: (plain_pass(model, cache), plain_pass(model, cache)),
            "full": lambda: attribute(one),
            "shared": lambda: attribute(many, "last:2"),
            "warm": lambda: attribute(many, "last:2", trunk_cache=True),
            "single": lambda: attribute(one, "last:2"),
            "single_warm": lambda: attribute(one, "last:2", trunk_cache=True),
        }
    )
    full, shared, warm = t["full"], t["shared"], t["warm"]
    rows: list[tuple[str, float, float, str]] = [
        ("1 full-model query, end to end vs 2 plain passes", full, t["limit"], "limit/run"),
        (f"{n_q} queries last:2, one sweep vs {n_q} full runs", shared, n_q * full, "run/ref"),
        (f"{n_q} queries last:2 + warm trunk cache vs {n_q} full runs", warm, n_q * full,
         "run/ref"),
    ]  # fmt: skip
    rows += corpus_scaling(work, cache_dir, len(docs), unit_length)
    notes = {"n_units": len(cache), "n_tokens": int(cache.lengths.sum()), "full": full,
             "shared": shared, "warm": warm, "n_q": n_q}  # fmt: skip
    single, single_warm = t["single"], t["single_warm"]
    notes["ttr"] = {
        "BGO full (2 passes per query)": (full, 32 * full),
        f"BGO last:2, {n_q} per sweep": (single, 32 / n_q * shared),
        "BGO last:2, warm trunk cache": (single_warm, 32 / n_q * warm),
    }
    for name in baselines:
        notes["ttr"][f"{name} (prepare + query)"] = baseline_times(
            name, model, tok, cache, unit_length
        )
    return rows, notes


def single_query(model, tok, docs, work: Path, unit_length: int) -> tuple[float, float, int]:
    """Row 1 alone: one full-model query end to end vs two plain passes (best of two rounds)."""
    cache_dir = work / "cache"
    cfg = config(cache_dir, "all", unit_length)

    def run() -> None:
        bgotrace.attribute(model, tok, docs, queries=queries(1), config=cfg, out=work / "run",
                           overwrite=True)  # fmt: skip

    run()  # warm-up: token cache and the normaliser's gradient norms
    cache = TokenCache(cache_dir)
    t = interleaved({"limit": lambda: (plain_pass(model, cache), plain_pass(model, cache)),
                     "full": run})  # fmt: skip
    return t["full"], t["limit"], len(cache)


def report_single(args: argparse.Namespace, full: float, limit: float, n_units: int) -> None:
    lines = [
        f"\n#### One full-model query, GPT-2 {args.model}, {args.unit_length}-token units "
        f"({date.today()}, {torch.get_num_threads()} thread(s), shared machine)\n",
        f"`python benchmarks/bench_amortized.py --model {args.model} --unit-length "
        f"{args.unit_length} --single-only` — {n_units} units: query {full:.2f} s, two plain "
        f"passes {limit:.2f} s, **{limit / full:.2f}** of the physical limit.",
    ]
    publish(lines, record=not args.quick)


def corpus_scaling(work: Path, cache_dir: Path, n_docs: int, unit_length: int) -> list:
    """Rows of one last:2 query over the corpus x4 vs x1, each in a fresh process."""
    run_child(work, work / "cache4", 4 * n_docs, unit_length)  # the first builds its cache ...
    x4 = run_child(work, work / "cache4", 4 * n_docs, unit_length)  # ... the second is measured
    x1 = run_child(work, cache_dir, n_docs, unit_length)
    own4, own1 = (x["peak_mib"] - x["rss_before_mib"] for x in (x4, x1))
    return [
        ("corpus x4 vs x1: time (1 query, last:2)", x4["seconds"], x1["seconds"], "run/ref"),
        ("corpus x4 vs x1: the sweep's own memory (MiB: peak RSS during attribute - RSS "
         "before)", own4, own1, "run/ref"),
        ("corpus x4 vs x1: whole-process peak RSS during attribute (MiB)", x4["peak_mib"],
         x1["peak_mib"], "run/ref"),
    ]  # fmt: skip


def baseline_times(name: str, model, tok, cache, unit_length: int) -> tuple[float, float]:
    """Seconds to the first result and to 32 results: the method's preparation (gradient
    index, EK-FAC factors) + its queries."""
    ctx = MethodContext(model, tok, cache, batch_size=BATCH)
    encoded = [encode_query(q, tok, unit_length) for q in queries(32)]
    start = time.perf_counter()
    method = get_attributor(name)
    method.prepare(ctx)
    built = time.perf_counter() - start
    first = built + timed(lambda: method.score(encoded[:1]))
    return first, built + timed(lambda: method.score(encoded))


def cpu_timed(fn) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of ``fn()``. With one torch thread the CPU
    seconds hardly move with the other processes on a shared machine; the wall seconds do."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


KERNEL_FIELDS = {"ru_stime": "sys s", "ru_minflt": "minor page faults",
                 "ru_nvcsw": "voluntary switches", "ru_nivcsw": "involuntary switches"}  # fmt: skip
"""What the kernel did for a call (``getrusage``): if identical calls differed because of the
code's allocation (page faults, system time) or its threads (context switches), it shows here."""


def kernel_side(fn) -> tuple[float, float, dict[str, float]]:
    """:func:`cpu_timed` of ``fn()`` and its :data:`KERNEL_FIELDS` (this process's deltas)."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    wall, cpu = cpu_timed(fn)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return wall, cpu, {f: getattr(after, f) - getattr(before, f) for f in KERNEL_FIELDS}


def spread_of(runs: dict[str, Any], rounds: int = 2) -> dict[str, Any]:
    """Per clock (``wall``, ``cpu``): best seconds per run, the spread of its rounds
    (max/min - 1) and every round's seconds, as ``{clock: best, clock_spread: spread,
    clock_rounds: {run: [seconds per round]}}``; the runs taken in turn, so one round's runs
    are minutes apart, not a whole round (the paired ratios below use that), and in reverse
    order every other round (a drift within a round cancels over two)."""
    seconds: dict[str, dict[str, list[float]]] = {"wall": {}, "cpu": {}}
    kernel: dict[str, list[dict[str, float]]] = {}
    for r in range(rounds):
        for name in list(runs)[:: -1 if r % 2 else 1]:
            wall, cpu, counts = kernel_side(runs[name])
            seconds["wall"].setdefault(name, []).append(wall)
            seconds["cpu"].setdefault(name, []).append(cpu)
            kernel.setdefault(name, []).append(counts)
    out: dict[str, Any] = {"kernel": kernel}
    for clock, per_run in seconds.items():
        out[clock] = {name: min(t) for name, t in per_run.items()}
        out[f"{clock}_spread"] = {name: max(t) / min(t) - 1 for name, t in per_run.items()}
        out[f"{clock}_rounds"] = per_run
    return out


def matmul_flops(runs: dict[str, Any]) -> dict[str, int]:
    """Per run, the floating-point operations of its matrix products (torch's
    ``FlopCounterMode``: matmuls, attention, convolutions), counted in one more call each.
    Unlike the seconds they do not move with the machine's load, so a ratio of them says
    whether one run does more arithmetic than another, whatever the noise."""
    from torch.utils.flop_counter import FlopCounterMode

    counts: dict[str, int] = {}
    for name, fn in runs.items():
        with FlopCounterMode(display=False) as counter:
            fn()
        counts[name] = int(counter.get_total_flops())
    return counts


class _OperatorCount(TorchDispatchMode):
    """Counts the torch operators (ATen calls) run while active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def call_counts(runs: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Per run, (torch operator calls, Python function calls) of one more call each: what a
    run does besides its arithmetic (checks, bookkeeping, per-call and per-group set-up),
    counted, so no load moves it; two further calls of each run (one per counter)."""
    counts: dict[str, tuple[int, int]] = {}
    for name, fn in runs.items():
        with _OperatorCount() as operators:
            fn()
        profile = cProfile.Profile()
        profile.runcall(fn)
        counts[name] = (operators.calls, pstats.Stats(profile).total_calls)
    return counts


def many_queries(
    model,
    tok,
    docs,
    work: Path,
    unit_length: int,
    n_q: int,
    *,
    rounds: int = 2,
    sweep_order: bool = False,
    flops: bool = False,
    ops: bool = False,
    only: list[str] | None = None,
) -> dict[str, Any]:
    """Issue 18's runs, side by side: one query, n queries per call at 1, 4 and n per sweep,
    n last:2 queries in one sweep, and two plain passes; ``rounds`` rounds of them in turn;
    with ``sweep_order`` also n per sweep in the sweep's order before its windows; with
    ``flops`` each run's matmul FLOPs too, with ``ops`` its operator and Python calls;
    ``only``: just these runs."""  # fmt: skip
    runs, cache = many_runs(model, tok, docs, work, unit_length, n_q, sweep_order, only)
    plain = {k: v for k, v in runs.items() if "batch_major" not in k}
    counted = matmul_flops(plain) if flops else {}
    calls = call_counts(plain) if ops else {}
    return {**spread_of(runs, rounds), "flops": counted, "ops": calls, "rounds": rounds,
            "n_q": n_q, "n_units": len(cache), "n_tokens": int(cache.lengths.sum())}  # fmt: skip


def many_runs(
    model,
    tok,
    docs,
    work: Path,
    unit_length: int,
    n_q: int,
    sweep_order: bool = False,
    only: list[str] | None = None,
) -> tuple[dict[str, Any], TokenCache]:
    """Issue 18's runs by name (``only``: just these), each a call of no arguments, with the
    token cache and the normaliser built and the first use of each path made (warm-ups)."""
    cache_dir = work / "cache"

    def call(n: int, params: str = "all", per_sweep: int = 16, **scoring: Any):
        cfg = config(cache_dir, params, unit_length, queries_per_sweep=per_sweep, **scoring)
        cfg["output"]["top_tokens"] = 0  # as in the issue
        return lambda: bgotrace.attribute(model, tok, docs, queries=queries(n), config=cfg)

    def each(n: int):  # n one-query calls in a loop, as a user without --queries runs them
        cfg = config(cache_dir, "all", unit_length)
        cfg["output"]["top_tokens"] = 0
        return lambda: [bgotrace.attribute(model, tok, docs, queries=[q], config=cfg)
                        for q in queries(n)]  # fmt: skip

    call(1)()  # warm-up: token cache and the normaliser's gradient norms
    cache = TokenCache(cache_dir)
    plain_pass(model, cache)  # warm-up of the plain pass too (a cold first round read 310%)
    runs = {"one": call(1), "limit": lambda: (plain_pass(model, cache), plain_pass(model, cache))}
    # the shipped defaults: the first-order diagnostic on, sized by --linearity-share
    runs["one_default"] = call(1, linearity_sample=ScoreConfig().linearity_sample)
    runs["loop"] = each(n_q)
    runs |= {f"many{q}": call(n_q, per_sweep=q) for q in sorted({1, 4, n_q})}
    if sweep_order:
        runs[f"many{n_q}_batch_major"] = batch_by_batch(call(n_q, per_sweep=n_q))
    runs["shared"] = call(n_q, "last:2", n_q)
    if only:
        unknown = sorted(set(only) - set(runs))
        if unknown:
            raise SystemExit(f"--runs: unknown run(s) {unknown}; known: {sorted(runs)}")
        runs = {k: v for k, v in runs.items() if k in only}
    for name in ("one_default", "shared"):  # first uses of the forward-mode and last:2 paths
        if name in runs:
            runs[name]()
    return runs, cache


def batch_by_batch(fn):
    """``fn`` with the sweep's order before its windows (every batch under every state in
    turn, ``window_tokens=0``): the reference of the row "sweep order"."""

    def run():
        old_order = functools.partial(sweep.unit_loss_sums, window_tokens=0)
        with mock.patch.object(sweep_executor, "unit_loss_sums", old_order):
            return fn()

    return run


def many_comparisons(n: int, runs: Any) -> list[tuple[str, str, str, str]]:
    """(comparison, numerator run, denominator run, target) of issue 18's ratios; a ratio is
    numerator / denominator of any per-run quantity (seconds of a clock, one round's seconds,
    matmul FLOPs). ``runs``: the names measured (the sweep-order row only when it ran)."""
    rows = [(f"{n} full queries in one call, {q} per sweep vs {n} one-query calls (a loop)",
             f"many{q}", "loop", "<= 1.0") for q in sorted({1, 4, n})]  # fmt: skip
    rows += [
        ("1 full query vs its limit (2 plain passes)", "limit", "one", ">= 0.9"),
        ("1 full query, shipped defaults (first-order diagnostic on) vs its limit", "limit",
         "one_default", ">= 0.9"),
        (f"{n} last:2 queries in one sweep vs {n} full single runs (the loop)", "shared", "loop",
         "<= 0.30"),
    ]  # fmt: skip
    if f"many{n}_batch_major" in runs:
        rows.append((f"sweep order: {n} full queries, {n} per sweep, each state over a window of "
                     "batches vs every batch under every state", f"many{n}",
                     f"many{n}_batch_major", "(< 1: the window pays)"))  # fmt: skip
    return [row for row in rows if row[1] in runs and row[2] in runs]


def paired(rounds: dict[str, list[float]], num: str, den: str) -> str:
    """The median of the per-round ratios num_r / den_r and their range: the two runs of one
    round are minutes apart, so a slow drift of the machine's speed cancels in each pair."""
    ratios = sorted(a / b for a, b in zip(rounds[num], rounds[den], strict=True))
    return f"{float(np.median(ratios)):.3f} ({ratios[0]:.3f}–{ratios[-1]:.3f})"


def report_many(args: argparse.Namespace, m: dict[str, Any]) -> None:
    n, rounds, flops = m["n_q"], m["rounds"], m["flops"]
    flags = f" --rounds {rounds}" if rounds != 2 else ""
    flags += (" --sweep-order" if args.sweep_order else "") + (" --flops" if flops else "")
    flags += " --ops" if m["ops"] else ""
    flags += f" --runs {args.runs}" if args.runs else ""
    command = (f"OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/bench_amortized.py "
               f"--many-queries --model {args.model} --unit-length {args.unit_length} "
               f"--n-docs {args.n_docs}{flags}")  # fmt: skip
    lines = [
        f"\n#### Many queries in one call (issue 18), GPT-2 {args.model}, {args.unit_length}-token "
        f"units ({date.today()}, {platform.machine()}, {torch.get_num_threads()} thread(s), "
        "shared machine)\n",
        f"`{command}` — {m['n_units']} units, {m['n_tokens']} tokens, `--top-tokens 0`, "
        f"K = 10 Adam steps each way; {rounds} rounds taken in turn (every other one in "
        f"reverse order), after a warm-up of {_warmed(m['wall'])}. Best: the "
        "best round of each run; paired: the median (range) over rounds of the ratio within "
        "one round. CPU: this process's CPU seconds (one torch thread)."
        + (
            " FLOPs: the runs' matmul FLOPs (`FlopCounterMode`), which no load moves."
            if flops
            else ""
        )
        + "\n",
        "| comparison | wall: measured (s) | wall: reference (s) | wall: best ratio "
        "| wall: paired ratio | CPU: best ratio | CPU: paired ratio"
        + (" | FLOP ratio" if flops else "")
        + " | target |",
        "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if flops else "") + "---|",
    ]
    wall, cpu = m["wall"], m["cpu"]
    for label, num, den, target in many_comparisons(n, wall):
        measured, reference = (den, num) if target.startswith(">=") else (num, den)
        cells = [f"{wall[measured]:.2f}", f"{wall[reference]:.2f}", f"{wall[num] / wall[den]:.3f}",
                 paired(m["wall_rounds"], num, den), f"{cpu[num] / cpu[den]:.3f}",
                 paired(m["cpu_rounds"], num, den)]  # fmt: skip
        if flops:
            cells.append(f"{flops[num] / flops[den]:.4f}" if den in flops else "")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {target} |")
    lines.append("\nPer-round CPU ratios (round 1, 2, …; every other round in reverse order):")
    for _, num, den, target in many_comparisons(n, wall):
        ratios = [a / b for a, b in zip(m["cpu_rounds"][num], m["cpu_rounds"][den], strict=True)]
        met = sum(_meets(r, target) for r in ratios)
        lines.append(f"- {num} / {den}: " + ", ".join(f"{r:.3f}" for r in ratios)
                     + f" ({met} of {len(ratios)} rounds meet {target})")  # fmt: skip
    if m["ops"]:
        lines.append(ops_line(m["ops"]))
    lines.append("\nWhat the kernel did per call (`getrusage`; the median over the rounds): "
                 + "; ".join(f"{name} " + ", ".join(
                     f"{float(np.median([c[f] for c in calls])):.{2 if f == 'ru_stime' else 0}f}"
                     f" {label}" for f, label in KERNEL_FIELDS.items())
                     for name, calls in m["kernel"].items()) + ".")  # fmt: skip
    for clock in ("wall", "cpu"):
        spread = m[f"{clock}_spread"]
        worst = max(spread, key=lambda k: spread[k])
        lines.append(
            f"\nIdentical calls, {clock} time (the {rounds} rounds of each run): spread "
            + ", ".join(f"{k} {v:.1%}" for k, v in spread.items())
            + f"; largest {worst} {spread[worst]:.1%} (target <= 5% on an idle machine"
            + (
                "; `limit` is torch's forward alone, no bgotrace code: the machine's own spread)."
                if "limit" in spread
                else ")."
            )  # fmt: skip
        )
    publish(lines, record=not args.quick)


def ops_line(ops: dict[str, tuple[int, int]]) -> str:
    """The runs' operator and Python calls, and each as a ratio of the loop's where it ran."""
    ref = ops.get("loop")
    parts = []
    for name, (operators, calls) in ops.items():
        ratio = f" ({operators / ref[0]:.4f} / {calls / ref[1]:.4f} of the loop's)" if ref else ""
        parts.append(f"{name} {operators:,} / {calls:,}{ratio}")
    return ("\nWork besides the arithmetic, counted per call (torch operator calls / Python "
            "function calls; no load moves them): " + "; ".join(parts) + ".")  # fmt: skip


def _warmed(runs: Any) -> str:
    """What :func:`many_queries` ran once before the rounds, given the runs it timed."""
    first_uses = [("the first-order diagnostic", "one_default"), ("the last:2 path", "shared")]
    return ", ".join(["the caches", "the plain pass"] + [w for w, run in first_uses if run in runs])


def _meets(ratio: float, target: str) -> bool:
    """Whether ``ratio`` meets a target written "<= x" or ">= x" (any other: False)."""
    op, _, bound = target.partition(" ")
    if op not in ("<=", ">="):
        return False
    return ratio <= float(bound) if op == "<=" else ratio >= float(bound)


def report(args: argparse.Namespace, rows: list, notes: dict) -> None:
    command = f"OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/bench_amortized.py " \
        f"--model {args.model} --unit-length {args.unit_length}" \
        f"{' --quick' if args.quick else ''}"  # fmt: skip
    lines = [
        f"\n### Amortized BGO, GPT-2 {args.model}, {args.unit_length}-token units "
        f"({date.today()}, {platform.machine()}, {torch.get_num_threads()} thread(s), "
        "shared machine)\n",
        f"`{command}` — {notes['n_units']} units of <= {args.unit_length} tokens, "
        f"{notes['n_tokens']} tokens, vocabulary {VOCAB}, batch {BATCH}, K = 10 Adam steps "
        "each way.\n",
        "| comparison | measured (s) | reference (s) | ratio |",
        "|---|---:|---:|---:|",
    ]
    for name, new, ref, kind in rows:
        ratio = ref / new if kind == "limit/run" else new / ref
        lines.append(f"| {name} | {new:.2f} | {ref:.2f} | {ratio:.2f} |")
    lines += ["", "| method | first result (s) | 32 results (s) |", "|---|---:|---:|"]
    for name, (first, all32) in notes["ttr"].items():
        lines.append(f"| {name} | {first:.1f} | {all32:.1f} |")
    lines.append(
        "\nFirst result: one query alone (last:2 modes: a single-query sweep). 32 results: "
        f"32 x the full run, or 32/{notes['n_q']} x the measured {notes['n_q']}-query sweep; "
        "the baselines' are measured."
    )
    publish(lines, record=not args.quick)  # a quick run is a smoke test, not a result


if __name__ == "__main__":
    main()
