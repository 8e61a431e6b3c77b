"""Two of issue 18's runs at the same time, one per core: ratios that the host's drift cannot move.

    OMP_NUM_THREADS=1 python benchmarks/bench_concurrent_pairs.py --pair loop,many4 --rounds 4
    OMP_NUM_THREADS=1 python benchmarks/bench_concurrent_pairs.py --pair loop,loop --rounds 3
    OMP_NUM_THREADS=1 python benchmarks/bench_concurrent_pairs.py --quick --no-record  # smoke

Why: on this shared machine torch's own forward, timed again and again on the same tensors,
drifts by 13-31% over minutes (``machine_noise.py``), while issue 18 asks whether 16 queries in
one call cost ≤ 1.0 of 16 one-query calls and whether identical calls agree within ±5%. Taken
in turn (``bench_amortized.py --many-queries``), the two runs of a comparison are minutes apart
and a ratio carries the drift between them. Here two processes, each pinned to one core with
one torch thread, build the same model, corpus and caches (``bench_amortized.many_runs``: the
same seeds) and then start the two runs of ``--pair`` at the same moment, round after round;
each round swaps the runs' cores, so neither run keeps a faster core. Measured on this machine
(an ad hoc probe of the same fixed forward on both cores): the two cores' speeds over 5-second
windows correlate 0.77, and the ratio of the two over 30-second windows spreads 1.0% (standard
deviation of its log) where each core alone spreads 1.8-2.8%: the drift is mostly the host's,
felt by both cores at once, and a ratio taken side by side cancels it.

What it costs: each run has a neighbour on the other core (its caches and memory bandwidth
shared), which both runs of a round have alike; the run that ends first leaves the other a few
seconds alone. ``--pair loop,loop`` times two identical calls side by side: their ratio is
what the code itself varies between identical calls, with the host's drift taken out.

Printed and appended to benchmarks/RESULTS.md: per round the two runs' CPU seconds (one torch
thread each) and their ratio, and over the rounds the median, geometric mean and a bootstrap
95% interval of the ratio, with the spread of each run's seconds over the rounds (the drift the
ratio cancels) beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
from bench_amortized import cpu_timed, many_runs, random_setup
from results_log import publish

from bgotrace.eval.metrics import bootstrap_ci

POLL_S = 0.05


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", default="loop,many4", help="two runs of bench_amortized")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--unit-length", type=int, default=128)
    parser.add_argument("--n-docs", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="4 queries, 30 documents")
    parser.add_argument("--no-record", action="store_true", help="print only (smoke runs)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sync", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    pair = args.pair.split(",")
    if len(pair) != 2:
        raise SystemExit("--pair: two run names, e.g. loop,many4")
    if args.child is not None:
        return child(args, pair)
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("needs two cores: one per run")
    sync = Path(tempfile.mkdtemp(prefix="bgotrace-pairs-"))
    cmd = [sys.executable, __file__, "--pair", args.pair, "--rounds", str(args.rounds),
           "--unit-length", str(args.unit_length), "--n-docs", str(args.n_docs),
           "--sync", str(sync)] + (["--quick"] if args.quick else [])  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    children = [
        subprocess.Popen([*cmd, "--child", str(k)], env=env, preexec_fn=_pin(cores[k]))
        for k in range(2)
    ]
    rounds = []
    for r in range(args.rounds):
        _wait(sync, [f"ready{r}.{k}" for k in range(2)], children)
        (sync / f"go{r}").touch()  # both start now
        done = _wait(sync, [f"done{r}.{k}" for k in range(2)], children)
        rounds.append({k: json.loads(text) for k, text in enumerate(done)})
        print(f"round {r + 1}: {rounds[-1]}", flush=True)
    for c in children:
        c.wait()
    report(args, pair, rounds)


def _pin(core: int):
    return lambda: os.sched_setaffinity(0, {core})


def _wait(sync: Path, names: list[str], children: list[subprocess.Popen]) -> list[str]:
    """The texts of files ``names`` in ``sync`` once all exist; exits if a child died."""
    while not all((sync / n).exists() for n in names):
        if any(c.poll() not in (None, 0) for c in children):
            raise SystemExit("a child process failed (its traceback is above)")
        time.sleep(POLL_S)
    return [(sync / n).read_text() for n in names]


def child(args: argparse.Namespace, pair: list[str]) -> None:
    """Build the runs (the same seeds in both children), warm both, then per round wait for
    the parent's start and time ``pair[(child + round) % 2]``: the runs swap cores each round."""
    import torch

    torch.set_num_threads(1)
    n_docs, n_q = (30, 4) if args.quick else (args.n_docs, 16)
    docs, tok, model = random_setup(n_docs, args.unit_length)
    work = Path(tempfile.mkdtemp(prefix=f"bgotrace-pairs-{args.child}-"))
    runs, cache = many_runs(model, tok, docs, work, args.unit_length, n_q, only=sorted(set(pair)))
    for name in sorted(set(pair)):  # first calls: every path warm before the timed rounds
        runs[name]()
    weights = float(sum(p.detach().double().sum() for p in model.parameters()))
    for r in range(args.rounds):
        (args.sync / f"ready{r}.{args.child}").touch()
        while not (args.sync / f"go{r}").exists():
            time.sleep(POLL_S)
        name = pair[(args.child + r) % 2]
        wall, cpu = cpu_timed(runs[name])
        result = {"run": name, "core": sorted(os.sched_getaffinity(0))[0], "wall": wall,
                  "cpu": cpu, "units": len(cache), "tokens": int(cache.lengths.sum()),
                  "weights": weights}  # fmt: skip
        tmp = args.sync / f"part{r}.{args.child}"
        tmp.write_text(json.dumps(result))
        tmp.rename(args.sync / f"done{r}.{args.child}")


def geometric_ci(ratios: np.ndarray) -> tuple[float, float]:
    """95% interval of the geometric mean of ``ratios``: the project's seeded percentile
    bootstrap (:func:`bgotrace.eval.metrics.bootstrap_ci`) of their logs, exponentiated."""
    logs = bootstrap_ci(np.log(ratios), n_boot=10_000)
    return float(np.exp(logs.lo)), float(np.exp(logs.hi))


def report(args: argparse.Namespace, pair: list[str], rounds: list[dict]) -> None:
    first, second = pair
    same = first == second
    per_round = []
    for r, both in enumerate(rounds):
        if same:  # identical calls: child 0's over child 1's
            a, b = both[1], both[0]
        else:
            by_run = {x["run"]: x for x in both.values()}
            a, b = by_run[first], by_run[second]
        per_round.append((r, a, b, b["cpu"] / a["cpu"]))
    weights = {both[k]["weights"] for both in rounds for k in both}
    ratios = np.array([x[3] for x in per_round])
    low, high = geometric_ci(ratios)
    meta = rounds[0][0]
    what = "two identical calls" if same else f"{second} / {first}"
    lines = [
        f"#### Side by side on two cores: {what}, GPT-2 12x128, {args.unit_length}-token units "
        f"({date.today()}, {platform.machine()}, 1 thread per run)",
        "",
        f"`OMP_NUM_THREADS=1 python benchmarks/bench_concurrent_pairs.py --pair {args.pair} "
        f"--rounds {args.rounds} --unit-length {args.unit_length} --n-docs {args.n_docs}"
        f"{' --quick' if args.quick else ''}` — {meta['units']} units, {meta['tokens']} tokens, "
        f"`--top-tokens 0`, K = 10 Adam steps each way; both runs start together each round, "
        f"on swapped cores every other round; the two processes' weights "
        f"{'are identical' if len(weights) == 1 else 'DIFFER: ' + str(weights)}.",
        "",
        f"| round | core of A | A: {'child 1' if same else first} CPU s "
        f"| B: {'child 0' if same else second} CPU s | B / A |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r, a, b, ratio in per_round:
        lines.append(f"| {r + 1} | {a['core']} | {a['cpu']:.2f} | {b['cpu']:.2f} | {ratio:.3f} |")
    a_s = np.array([x[1]["cpu"] for x in per_round])
    b_s = np.array([x[2]["cpu"] for x in per_round])
    lines += [
        "",
        f"Ratio over {len(ratios)} rounds: median {np.median(ratios):.3f}, geometric mean "
        f"{np.exp(np.log(ratios).mean()):.3f}, bootstrap 95% interval [{low:.3f}, {high:.3f}], "
        f"range {ratios.min():.3f}–{ratios.max():.3f} "
        f"(spread {ratios.max() / ratios.min() - 1:.1%}). "
        f"The drift it cancels, each run's CPU seconds over the rounds: spread "
        f"{a_s.max() / a_s.min() - 1:.1%} and {b_s.max() / b_s.min() - 1:.1%}.",
        "",
    ]
    publish(lines, record=not args.no_record)


if __name__ == "__main__":
    main()
