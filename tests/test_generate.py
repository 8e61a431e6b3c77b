"""Generation: greedy equals an obvious argmax loop, sampling is seeded, errors are clear."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from bgotrace.cli.errors import user_errors
from bgotrace.cli.generate import generate as generate_command
from bgotrace.corpus import documents_from_records
from bgotrace.errors import ConfigError, InputError
from bgotrace.generate import generate_completion
from bgotrace.modeling.loading import load_model_and_tokenizer
from bgotrace.train import TrainConfig, train_model

TEXTS = [
    "Alpha beta gamma delta.",
    "One two three four five.",
    "Red green blue.",
    "North east south west.",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A test-preset model that has memorised four short documents."""
    docs = documents_from_records([{"id": str(i), "text": t} for i, t in enumerate(TEXTS)])
    config = TrainConfig(preset="test", epochs=60, batch_size=4, lr=2e-2, warmup_steps=5)
    return train_model(docs, config, tmp_path_factory.mktemp("gen") / "model", progress=False)


@pytest.fixture(scope="module")
def lm(model_dir):
    return load_model_and_tokenizer(model_dir)


def _argmax_loop(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The slow, obvious greedy decoder: full forward pass per token, stop at EOS."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids + new])).logits  # (1, T, V)
            token = int(logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return tokenizer.decode(new)


def test_greedy_recalls_memorised_text_and_stops_at_eos(lm):
    model, tokenizer = lm
    completion = generate_completion(model, tokenizer, "Alpha beta", max_new_tokens=20)
    assert completion == " gamma delta."  # the rest of the document, then EOS stops it


@pytest.mark.parametrize("prompt", ["Alpha beta", "Red", "One two three", "Zebra"])
def test_greedy_matches_an_argmax_loop(lm, prompt):
    model, tokenizer = lm
    expected = _argmax_loop(model, tokenizer, prompt, 12)
    assert generate_completion(model, tokenizer, prompt, max_new_tokens=12) == expected
    assert generate_completion(model, tokenizer, prompt, max_new_tokens=12, seed=5) == expected


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(lm):
    model, tokenizer = lm
    kwargs = {"max_new_tokens": 16, "do_sample": True, "temperature": 3.0}
    torch.manual_seed(123)
    first = generate_completion(model, tokenizer, "North", seed=7, **kwargs)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3))  # the call did not advance the global RNG
    assert generate_completion(model, tokenizer, "North", seed=7, **kwargs) == first
    others = {generate_completion(model, tokenizer, "North", seed=s, **kwargs) for s in range(5)}
    assert len(others) > 1  # at temperature 3 different seeds sample different text


def test_top_k_one_is_greedy(lm):
    model, tokenizer = lm
    greedy = generate_completion(model, tokenizer, "One two", max_new_tokens=8)
    sampled = generate_completion(
        model, tokenizer, "One two", max_new_tokens=8, do_sample=True, top_k=1, seed=3
    )
    assert sampled == greedy


def test_generation_keeps_the_training_flag(lm):
    model, tokenizer = lm
    model.train()
    generate_completion(model, tokenizer, "Red", max_new_tokens=2)
    assert model.training
    model.eval()


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"prompt": ""}, InputError),
        ({"max_new_tokens": 0}, ConfigError),
        ({"temperature": 0.0}, ConfigError),
        ({"top_k": 0}, ConfigError),
        ({"prompt": "Red " * 200}, InputError),
    ],
)
def test_bad_arguments_are_refused(lm, kwargs, error):
    model, tokenizer = lm
    args = {"prompt": "Red", **kwargs}
    with pytest.raises(error):
        generate_completion(model, tokenizer, args.pop("prompt"), **args)


def test_cli_prints_the_completion(model_dir):
    app = typer.Typer()
    app.command("generate")(user_errors(generate_command))
    app.command("other")(lambda: None)  # two commands: typer then expects the command name
    base = ["generate", "--model", str(model_dir), "--max-new-tokens", "20"]
    result = CliRunner().invoke(app, [*base, "--prompt", "Alpha beta"])
    assert result.exit_code == 0, result.output
    assert "gamma delta." in result.stdout
    empty = CliRunner().invoke(app, [*base, "--prompt", ""])
    assert empty.exit_code == 2 and "prompt is empty" in empty.output


def test_shipped_demo_model_continues_its_prompts_from_its_corpus():
    """The demo promises prompts that the demo model continues with the right entry."""
    from bgotrace.corpus import load_documents
    from bgotrace.demo import DEMO_PROMPT_DOCS, DEMO_PROMPTS, demo_corpus_path, demo_model_path

    documents = {d.doc_id: d for d in load_documents(demo_corpus_path())}
    assert {d.source for d in documents.values()} == {"devils-dictionary", "jargon-file"}
    model, tokenizer = load_model_and_tokenizer(demo_model_path())
    assert DEMO_PROMPTS and set(DEMO_PROMPTS) == set(DEMO_PROMPT_DOCS)
    for prompt in DEMO_PROMPTS:
        completion = generate_completion(model, tokenizer, prompt, max_new_tokens=16)
        text = documents[DEMO_PROMPT_DOCS[prompt]].text
        assert text.startswith(prompt + completion), (prompt, completion)
        assert len(completion.strip()) >= 10
