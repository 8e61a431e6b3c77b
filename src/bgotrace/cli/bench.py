"""``bgotrace bench build`` / ``bgotrace bench run``: the benchmark with known training data.

CPU, seconds::

    bgotrace bench build --out bench/quick --quick
    bgotrace bench run --bench bench/quick --out runs/quick --methods bm25,bgo,random --quick

The shipped benchmark (needs Debian's fortunes, dict-devil and dict-foldoc)::

    bgotrace bench build --out bench/default
    bgotrace bench run --bench bench/default --out runs/bench

The chat benchmark (SFT conversations ranked for a full and a LoRA fine-tune; ``--quick``:
test sizes, seconds)::

    bgotrace bench build --bench-preset chat --quick --out bench/chat-quick
    bgotrace bench run --bench bench/chat-quick --out runs/chat-quick --methods bgo,bm25,graddot
"""

from __future__ import annotations

import shlex
import sys
from typing import Annotated, Any

import typer
from rich.console import Console

from bgotrace.bench.build import PRESETS as BENCH_PRESETS
from bgotrace.bench.build import BenchConfig
from bgotrace.bench.chat_build import CHAT_PRESETS, ChatBenchConfig, build_chat_bench, is_chat_bench
from bgotrace.bench.chat_eval import run_chat_bench
from bgotrace.bench.runner import (
    DEFAULT_FACT_REPEATS,
    QUICK_SEEDS,
    QUICK_TRAIN,
    build_bench,
    quick_options,
    run_bench,
)
from bgotrace.cli.errors import user_errors
from bgotrace.cli.eval import (
    OptionPairs,
    merge_flags,
    parse_ints,
    parse_options,
    print_result,
    split_list,
)
from bgotrace.errors import ConfigError
from bgotrace.runtime.progress import set_progress
from bgotrace.train import PRESETS as MODEL_PRESETS
from bgotrace.train import TrainConfig

bench_app = typer.Typer(
    help="Build a benchmark with known training data, then evaluate every method on it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _source_paths(pairs: list[str] | None) -> dict[str, str]:
    paths = {}
    for pair in pairs or []:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--source-path {pair!r} is not NAME=PATH: e.g. devil=devil.dict.")
        paths[name] = path
    return paths


def _train_config(
    preset: str | None, epochs: int | None, seed: int, quick: bool, device: str
) -> TrainConfig:
    """The base model's recipe: small preset, 10 epochs (test preset, 1 epoch with --quick)."""
    defaults: dict[str, Any] = dict(QUICK_TRAIN) if quick else {"preset": "small", "epochs": 10}
    given = {"preset": preset, "epochs": epochs}
    values = {**defaults, **{k: v for k, v in given.items() if v is not None}}
    return TrainConfig(**values, seed=seed, device=device)


def build(
    out: Annotated[str, typer.Option(help="Benchmark directory to build (or reuse).")],
    bench_preset: Annotated[
        str | None,
        typer.Option(
            help=f"Benchmark: {', '.join([*BENCH_PRESETS, 'chat'])} (default: default, tiny "
            "with --quick; chat: the chat benchmark, its test sizes with --quick).",
            show_default=False,
        ),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            help=f"Model preset: {', '.join(MODEL_PRESETS)} (default small, test with --quick).",
            show_default=False,
        ),
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option(help="Training epochs (default 10, 1 with --quick).", show_default=False),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the benchmark and the training.")] = 0,
    fact_repeats: Annotated[
        int, typer.Option(help="Times each fact document is seen per epoch.")
    ] = DEFAULT_FACT_REPEATS,
    source_path: Annotated[
        list[str] | None,
        typer.Option(help="NAME=PATH of a text source (repeatable).", show_default=False),
    ] = None,
    model_out: Annotated[
        str | None, typer.Option(help="Model directory (default OUT/model).", show_default=False)
    ] = None,
    quick: Annotated[
        bool, typer.Option(help="Test sizes: tiny benchmark, test preset, 1 epoch.")
    ] = False,
    device: Annotated[str, typer.Option(help="Training device: cpu, cuda[:N] or auto.")] = "cpu",
    overwrite: Annotated[
        bool, typer.Option(help="Rebuild what exists with other settings.")
    ] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Build the benchmark (real texts + planted facts + queries) and train its base model."""
    name = bench_preset or ("tiny" if quick else "default")
    paths = _source_paths(source_path)
    if name in CHAT_PRESETS:
        chat = {"model_preset": preset, "pretrain_epochs": epochs}
        overrides = {k: v for k, v in chat.items() if v is not None} | {"seed": seed}
        chat_config = ChatBenchConfig.preset(
            "chat-test" if quick else name,
            **overrides,
            **({"source_paths": paths} if paths else {}),
        )
        manifest = build_chat_bench(chat_config, out, overwrite=overwrite, progress=not quiet)
        Console(stderr=True).print(f"chat benchmark built: [bold]{out}[/] {manifest['counts']}")
        return
    bench_config = BenchConfig.preset(name, seed=seed, **({"source_paths": paths} if paths else {}))
    train_config = _train_config(preset, epochs, seed, quick, device)
    result = build_bench(
        out, bench_config, train_config, fact_repeats=fact_repeats, model_dir=model_out,
        overwrite=overwrite, progress=not quiet,
    )  # fmt: skip
    console = Console(stderr=True)
    state = "built" if result.built_benchmark else "reused"
    console.print(f"benchmark {state}: [bold]{result.bench_dir}")
    console.print(
        f"model {'trained' if result.trained_model else 'reused'}: [bold]{result.model_dir}"
    )


def run(
    bench: Annotated[str, typer.Option(help="Benchmark directory built by `bench build`.")],
    out: Annotated[str, typer.Option(help="Run directory for the tables and the plot.")],
    model: Annotated[
        str | None, typer.Option(help="Model directory (default BENCH/model).", show_default=False)
    ] = None,
    methods: Annotated[str, typer.Option(help="Comma-separated methods, or all.")] = "all",
    metrics: Annotated[str, typer.Option(help="Comma-separated metrics, or all.")] = "all",
    split: Annotated[str, typer.Option(help="Queries: validation, test or all.")] = "test",
    seeds: Annotated[
        str | None, typer.Option(help="Leave-k-out seeds (default 0,1,2).", show_default=False)
    ] = None,
    option: OptionPairs = None,
    quick: Annotated[
        bool, typer.Option(help="Few queries, k=2, 3 LDS subsets, seeds 0,1 (seconds).")
    ] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda[:N] or auto.")] = "cpu",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out directory.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Run every method × metric on the benchmark; writes results.{md,csv,png} to --out."""
    set_progress(not quiet)
    options = merge_flags(parse_options(option or []), device=device, progress=not quiet)
    if quick:
        options = quick_options(options)
    if is_chat_bench(bench):
        if model is not None:
            raise ConfigError("A chat benchmark evaluates its own fine-tunes: drop --model.")
        results = run_chat_bench(
            bench, out, methods=split_list(methods, "methods"),
            metrics=split_list(metrics, "metrics"), split=split, options=options,
            overwrite=overwrite, command=shlex.join(["bgotrace", *sys.argv[1:]]),
        )  # fmt: skip
        for variant, result in results.items():
            typer.echo(f"# {variant} fine-tune\n")
            print_result(result)
        return
    default_seeds = QUICK_SEEDS if quick else (0, 1, 2)
    result = run_bench(
        bench, out, model_dir=model, methods=split_list(methods, "methods"),
        metrics=split_list(metrics, "metrics"), split=split,
        seeds=parse_ints(seeds, "seeds") if seeds else default_seeds, options=options,
        overwrite=overwrite, command=shlex.join(["bgotrace", *sys.argv[1:]]),
    )  # fmt: skip
    print_result(result)


bench_app.command("build")(user_errors(build))
bench_app.command("run")(user_errors(run))
