"""The memory plan for 1B–8B models on an 80 GiB GPU, as a table (no download, no GPU).

Configs are built in code with the published dimensions of Pythia-1B, Llama-3.2-1B and
Llama-3-8B and planned (``bgotrace.plan``) for ``--params all | last:2``, Q = 1, 8, 16
queries per sweep and float32 / bfloat16 (model and sweep dtype alike), at the defaults
otherwise (Adam, bidirectional score, batch 16, 256-token units, sensitivity normaliser),
and again at ``--batch-size 8``::

    python benchmarks/plan_table.py            # prints a markdown table
    python benchmarks/plan_table.py --record   # and writes it to benchmarks/RESULTS.md

Every number is an ESTIMATE of the formulas in ``bgotrace.plan.memory``; the times assume
the throughputs stated there.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from pathlib import Path

from transformers import GPTNeoXConfig, LlamaConfig, PretrainedConfig

from bgotrace.config import AttributeConfig
from bgotrace.plan.estimate import plan_run
from bgotrace.plan.fit import gib
from bgotrace.plan.shape import MetaModel

GIB = 2**30
MODELS: dict[str, PretrainedConfig] = {
    "Pythia-1B": GPTNeoXConfig(
        vocab_size=50304, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=8, max_position_embeddings=2048, tie_word_embeddings=False,
    ),
    "Llama-3.2-1B": LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
        tie_word_embeddings=True,
    ),
    "Llama-3-8B": LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
        tie_word_embeddings=False,
    ),
}  # fmt: skip


def _config(model_dir: Path, params: str, q: int, dtype: str, batch: int = 16) -> AttributeConfig:
    return AttributeConfig.from_dict({
        "model": {"path": str(model_dir), "dtype": dtype},
        "corpus": {"path": "(none)"},
        "query": {"completion": " "},
        "perturb": {"params": params},
        "scoring": {"queries_per_sweep": q, "dtype": dtype, "batch_size": batch},
        "execution": {"device": "cuda"},
    })  # fmt: skip


def rows(memory: int) -> list[str]:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in MODELS.items():
            model_dir = Path(tmp) / name
            cfg.save_pretrained(model_dir)  # config.json only: the plan reads nothing else
            meta = MetaModel(cfg)
            for params, q, dtype in itertools.product(("all", "last:2"), (1, 8, 16),
                                                      ("float32", "bfloat16")):  # fmt: skip
                plan = plan_run(_config(model_dir, params, q, dtype), n_queries=q,
                                device_memory=memory, meta=meta)  # fmt: skip
                by = {s.name: s for s in plan.stages}
                small = plan_run(_config(model_dir, params, q, dtype, batch=8), n_queries=q,
                                 device_memory=memory, meta=meta)  # fmt: skip
                out.append(
                    f"| {name} | {params} | {q} | {dtype} | {gib(plan.peak_device_bytes)} | "
                    f"{gib(by['perturbation'].device_bytes)} | {gib(by['sweep'].device_bytes)} "
                    f"| {gib(by['normaliser'].device_bytes)} | {gib(plan.peak_host_bytes)} | "
                    f"{'yes' if plan.fits else 'no'} | {gib(small.peak_device_bytes)} | "
                    f"{'yes' if small.fits else 'no'} | "
                    f"{by['sweep'].hours_per_1e9_tokens:.3g} | "
                    f"{by['normaliser'].hours_per_1e9_tokens:.3g} |"
                )
    return out


HEADER = (
    "| model | --params | Q | dtype | peak device | perturbation | sweep | normaliser | "
    "peak host | fits 80 GiB | peak at --batch-size 8 | fits (batch 8) | "
    "sweep h / 1e9 tok / group (EST.) | normaliser h / 1e9 tok (EST.) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


TITLE = "## Memory plan: 1B–8B models on an 80 GiB GPU (issue 14)"


def record(table: str, results: Path) -> None:
    """Replace the table under :data:`TITLE` in ``results`` (append the section if absent)."""
    text = results.read_text(encoding="utf-8")
    if TITLE not in text:
        command = "python benchmarks/plan_table.py --record"
        text += (f"\n{TITLE}\n\n`{command}` (estimates, no GPU; formulas in "
                 f"`bgotrace.plan.memory`)\n\n{table}\n")  # fmt: skip
    else:
        head, tail = text.split(TITLE, 1)
        start = tail.index("\n| model |") + 1
        end = start
        while end < len(tail) and tail.startswith("|", end):
            end = tail.index("\n", end) + 1
        text = head + TITLE + tail[:start] + table + "\n" + tail[end:]
    results.write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--record", action="store_true", help="Write the table into RESULTS.md (replaced)."
    )
    args = parser.parse_args()
    table = HEADER + "\n" + "\n".join(rows(80 * GIB))
    print(table)
    if args.record:
        record(table, Path(__file__).with_name("RESULTS.md"))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
