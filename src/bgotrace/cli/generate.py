"""``bgotrace generate``: let a model continue a prompt, to find text worth attributing.

CPU example::

    bgotrace generate --model MODEL_DIR --prompt "ABASEMENT, n." --max-new-tokens 24
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from bgotrace.generate import generate_completion
from bgotrace.modeling.loading import load_model_and_tokenizer


def generate(
    model: Annotated[str, typer.Option(help="Hugging Face model directory (safetensors).")],
    prompt: Annotated[str, typer.Option(help="Text for the model to continue.")],
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 32,
    sample: Annotated[
        bool, typer.Option("--sample/--greedy", help="Sample instead of greedy decoding.")
    ] = False,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    top_k: Annotated[
        int | None,
        typer.Option(help="Sample from the k likeliest tokens (default: all).", show_default=False),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the sampler.")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda[:N] or auto.")] = "cpu",
    trust_remote_code: Annotated[
        bool, typer.Option(help="Run code shipped with the checkpoint (only if you trust it).")
    ] = False,
) -> None:
    """Print the prompt and the model's completion; stdout gets the completion alone."""
    lm, tokenizer = load_model_and_tokenizer(
        model, device=device, trust_remote_code=trust_remote_code
    )
    completion = generate_completion(
        lm,
        tokenizer,
        prompt,
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature,
        top_k=top_k,
        seed=seed,
    )
    Console(stderr=True).print(f"[dim]{escape(prompt)}[/dim]", end="")
    typer.echo(completion)
