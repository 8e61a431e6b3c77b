"""``bgotrace generate``: let a model continue a prompt, to find text worth attributing.

CPU example::

    bgotrace generate --model MODEL_DIR --prompt "ABASEMENT, n." --max-new-tokens 24
    bgotrace generate --model CHAT_MODEL --chat "What is the capital of France?"
    bgotrace generate --model CHAT_MODEL --messages conversation.json   # next assistant turn
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from bgotrace.chat import Message, load_messages_file, parse_messages
from bgotrace.errors import ConfigError
from bgotrace.generate import generate_completion, generate_reply
from bgotrace.modeling.loading import load_model_and_tokenizer


def generate(
    model: Annotated[str, typer.Option(help="Hugging Face model directory (safetensors).")],
    prompt: Annotated[
        str | None, typer.Option(help="Text for the model to continue.", show_default=False)
    ] = None,
    chat: Annotated[
        str | None,
        typer.Option(
            help="A user message: the model answers it through its chat template.",
            show_default=False,
        ),
    ] = None,
    messages: Annotated[
        str | None,
        typer.Option(
            help="JSON/JSONL conversation ({role, content} messages): the model writes the "
            "next assistant turn.",
            show_default=False,
        ),
    ] = None,
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
    conversation = _conversation(prompt, chat, messages)  # checked before the model loads
    lm, tokenizer = load_model_and_tokenizer(
        model, device=device, trust_remote_code=trust_remote_code
    )
    options: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": sample,
        "temperature": temperature,
        "top_k": top_k,
        "seed": seed,
    }
    err = Console(stderr=True)
    if conversation is None:
        assert prompt is not None  # _conversation saw exactly one of them
        text = generate_completion(lm, tokenizer, prompt, **options)
        err.print(f"[dim]{escape(prompt)}[/dim]", end="")
    else:
        text = generate_reply(lm, tokenizer, conversation, **options)
        for m in conversation:
            err.print(f"[dim]{m.role}: {escape(m.content)}[/dim]")
        err.print("[dim]assistant:[/dim] ", end="")
    typer.echo(text)


def _conversation(
    prompt: str | None, chat: str | None, messages: str | None
) -> tuple[Message, ...] | None:
    """None for --prompt; the conversation of --chat or --messages."""
    given = [
        flag
        for flag, v in (("--prompt", prompt), ("--chat", chat), ("--messages", messages))
        if v is not None
    ]
    if len(given) != 1:
        raise ConfigError(
            "Pass exactly one of --prompt TEXT, --chat USER_MESSAGE or --messages FILE"
            + (f" (got {' and '.join(given)})." if given else ".")
        )
    if chat is not None:
        return parse_messages([{"role": "user", "content": chat}], "--chat")
    return None if messages is None else load_messages_file(messages)
