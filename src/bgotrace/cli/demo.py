"""``bgotrace demo``: the whole loop on the shipped model and corpus, in about a minute.

The shipped model was trained by bgotrace itself on the shipped corpus
(``scripts/build_demo_assets.py``), so the training data of every generation is
known. The demo generates a continuation of a prompt, attributes it, prints the top
10 units and writes a run directory.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from bgotrace.config import (
    AttributeConfig,
    CorpusSpec,
    ExecutionConfig,
    ModelSpec,
    OutputSpec,
    QuerySpec,
    ScoreConfig,
)
from bgotrace.demo import DEMO_MAX_LENGTH, DEMO_PROMPTS, demo_corpus_path, demo_model_path
from bgotrace.generate import generate_completion
from bgotrace.modeling.loading import load_model_and_tokenizer
from bgotrace.pipeline import load_inputs, run_attribution
from bgotrace.report.console import print_result
from bgotrace.runtime.progress import set_progress


def demo_config(
    query: QuerySpec,
    *,
    output: OutputSpec | None = None,
    scoring: ScoreConfig | None = None,
    cache_dir: str | None = None,
) -> AttributeConfig:
    """A run of the shipped demo model over its own corpus (CPU, the demo's unit length); the
    demo command, the memorised-regime test and the normalisation protocol share it."""
    return AttributeConfig(
        model=ModelSpec(path=str(demo_model_path())),
        corpus=CorpusSpec(
            path=str(demo_corpus_path()), max_length=DEMO_MAX_LENGTH, cache_dir=cache_dir
        ),
        query=query,
        scoring=scoring or ScoreConfig(),
        output=output or OutputSpec(),
        execution=ExecutionConfig(device="cpu"),
    )


def demo(
    out: Annotated[str, typer.Option(help="Run directory to write.")] = "runs/demo",
    prompt: Annotated[
        str | None, typer.Option(help="Prompt to continue (default: a shipped one).")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 24,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run directory.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Generate with the shipped demo model, attribute the text, print the top 10."""
    set_progress(not quiet)
    console = Console()
    prompt = prompt or DEMO_PROMPTS[0]
    model, tokenizer = load_model_and_tokenizer(demo_model_path(), device="cpu")
    completion = generate_completion(model, tokenizer, prompt, max_new_tokens=max_new_tokens)
    console.print(f"[bold]prompt[/bold]     {escape(prompt)}")
    console.print(f"[bold]completion[/bold] {escape(completion)}")
    config = demo_config(
        QuerySpec(prompt=prompt, completion=completion),
        output=OutputSpec(out=out, top_k=10),
        cache_dir=f"{out}-cache",
    )
    inputs = load_inputs(config, model=model, tokenizer=tokenizer)
    result = run_attribution(config, inputs, overwrite=overwrite)
    print_result(result, granularity="unit", k=10, out=out, console=console)
