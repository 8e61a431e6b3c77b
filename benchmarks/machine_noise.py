"""How much identical work varies on this machine, with no bgotrace code in the loop.

    OMP_NUM_THREADS=1 python benchmarks/machine_noise.py               # 12 windows of ~6 s
    OMP_NUM_THREADS=1 python benchmarks/machine_noise.py --windows 4   # a quick look

Issue 18 asks identical calls to agree within ±5% on an idle machine and, if they do not, to
fix the code if the variance comes from it. This script separates the two: it times the same
forward pass of a random-init GPT-2 (12 blocks, width 128, the benchmarks' shape) over the
same fixed batch, ``--per-window`` times per window, for ``--windows`` windows, in one process
with one torch thread and no allocation that changes between windows. Whatever spread the
windows show is the machine's (the host's other tenants, its clock, its caches), not any code
path of bgotrace's, and it is the floor under the spread of every benchmark here. Printed per
window: wall and CPU seconds and the steal ticks the kernel counted (``/proc/stat``: time the
hypervisor ran something else while this VM wanted the CPU); recorded in RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import date

import torch
from results_log import publish
from transformers import GPT2Config, GPT2LMHeadModel


def steal_ticks() -> int:
    """The kernel's count of steal ticks of all CPUs (0 where /proc/stat has no such field)."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = fh.readline().split()
    except OSError:
        return 0
    return int(fields[8]) if len(fields) > 8 else 0


@torch.inference_mode()
def windows(n_windows: int, per_window: int) -> list[tuple[float, float, int]]:
    """(wall s, CPU s, steal ticks) of each window of ``per_window`` identical forwards."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=12, n_embd=128, n_head=4, vocab_size=2048, n_positions=256)
    model = GPT2LMHeadModel(config).eval()
    batch = torch.randint(0, config.vocab_size, (32, 36))
    for _ in range(5):  # warm-up: first calls allocate and pick kernels
        model(batch)
    rows = []
    for _ in range(n_windows):
        steal, wall, cpu = steal_ticks(), time.perf_counter(), time.process_time()
        for _ in range(per_window):
            model(batch)
        rows.append((time.perf_counter() - wall, time.process_time() - cpu, steal_ticks() - steal))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=12)
    parser.add_argument("--per-window", type=int, default=40, help="forwards per window")
    parser.add_argument("--quick", action="store_true", help="print only, record nothing")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    rows = windows(args.windows, args.per_window)
    walls, cpus = [r[0] for r in rows], [r[1] for r in rows]
    command = (f"OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/machine_noise.py "
               f"--windows {args.windows} --per-window {args.per_window}")  # fmt: skip
    lines = [
        f"\n#### The machine's own spread ({date.today()}, {platform.machine()}, "
        f"{torch.get_num_threads()} thread(s), load average {load:.2f} at the start)\n",
        f"`{command}` — the same forward of a random GPT-2 (12 blocks, width 128) over one "
        f"fixed 32 × 36-token batch, {args.per_window} times per window; no bgotrace code.\n",
        "| window | wall s | CPU s | steal ticks |",
        "|---:|---:|---:|---:|",
        *(f"| {i} | {w:.3f} | {c:.3f} | {s} |" for i, (w, c, s) in enumerate(rows, 1)),
        f"\nSpread of identical windows (max/min - 1): wall {max(walls) / min(walls) - 1:.1%}, "
        f"CPU {max(cpus) / min(cpus) - 1:.1%}; steal ticks in all {sum(r[2] for r in rows)}.",
    ]
    publish(lines, record=not args.quick)


if __name__ == "__main__":
    main()
