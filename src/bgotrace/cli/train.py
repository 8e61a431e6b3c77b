"""``bgotrace train``: train a small causal LM from scratch on a corpus.

A model whose training data is known exactly is what attribution is checked against.
CPU example (a few seconds)::

    bgotrace train --corpus corpus.jsonl --out runs/model --preset test --epochs 3
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from bgotrace.corpus import CorpusFields, load_documents
from bgotrace.errors import RunDirectoryError
from bgotrace.train import PRESETS, TrainConfig, train_model

_PRESETS = ", ".join(PRESETS)


def train(
    corpus: Annotated[str, typer.Option(help="Corpus: .jsonl/.json/.parquet/.txt file or folder.")],
    out: Annotated[str, typer.Option(help="Directory to write the trained model to.")],
    preset: Annotated[str, typer.Option(help=f"Model size: one of {_PRESETS}.")] = "tiny",
    arch: Annotated[
        str | None, typer.Option(help="Architecture override: gpt2 or llama.", show_default=False)
    ] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the training units.")] = 10,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate.")] = 3e-3,
    batch_size: Annotated[int, typer.Option(help="Units per optimiser step.")] = 16,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay on matrices.")] = 0.0,
    warmup_steps: Annotated[int, typer.Option(help="Linear learning-rate warmup steps.")] = 20,
    seed: Annotated[int, typer.Option(help="Seed of initialisation and data order.")] = 0,
    max_length: Annotated[
        int | None,
        typer.Option(help="Tokens per unit (default: the preset's context).", show_default=False),
    ] = None,
    stride: Annotated[int, typer.Option(help="Token overlap between units of a document.")] = 0,
    text_field: Annotated[str, typer.Option(help="Record field holding the text.")] = "text",
    id_field: Annotated[str, typer.Option(help="Record field holding the document id.")] = "id",
    source_field: Annotated[str, typer.Option(help="Record field naming the source.")] = "source",
    device: Annotated[str, typer.Option(help="cpu, cuda[:N] or auto.")] = "cpu",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out directory.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Train a known-data model on the corpus's units; saves a Hugging Face model directory."""
    config = TrainConfig(
        preset=preset,
        arch=arch,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        seed=seed,
        max_length=max_length,
        stride=stride,
        device=device,
    )
    _refuse_existing(out, overwrite)
    documents = load_documents(corpus, CorpusFields(text_field, id_field, source_field))
    path = train_model(documents, config, out, progress=not quiet, overwrite=overwrite)
    Console(stderr=True).print(f"saved model, tokenizer and optimizer state to [bold]{path}")


def _refuse_existing(out: str, overwrite: bool) -> None:
    """Fail before loading the corpus, not after: the check is cheap and the load is not."""
    if Path(out).exists() and not overwrite:
        raise RunDirectoryError(f"Output directory {out} exists: use --overwrite or another --out.")
