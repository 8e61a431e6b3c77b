"""Training known-data models: loss goes down, saved runs load, seeds and ``keep`` behave."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from bgotrace.cli.errors import user_errors
from bgotrace.cli.train import train as train_command
from bgotrace.corpus import (
    ChunkingConfig,
    Document,
    corpus_fingerprint,
    documents_from_records,
    tokenize_and_chunk,
)
from bgotrace.errors import ConfigError, InputError, RunDirectoryError
from bgotrace.train import (
    PRESETS,
    SPECIAL_TOKEN,
    ModelPreset,
    TrainConfig,
    batch_tensors,
    build_model,
    data_order,
    get_preset,
    train_model,
    train_tokenizer,
)

ANIMALS = ["cat", "dog", "owl", "fox", "eel", "yak", "bee", "elk"]


def _records() -> list[dict[str, str]]:
    """Three dozen short, regular documents in two sources: learnable in a few steps."""
    return [
        {
            "id": f"doc{i}",
            "text": f"The {ANIMALS[i % 8]} number {i} likes {ANIMALS[(i * 3) % 8]} food.",
            "source": "zoo" if i % 2 else "farm",
        }
        for i in range(36)
    ]


@pytest.fixture(scope="module")
def docs() -> list[Document]:
    return documents_from_records(_records())


@pytest.fixture(scope="module")
def tokenizer(docs: list[Document]):
    return train_tokenizer([d.text for d in docs], 512)


def _config(**overrides) -> TrainConfig:
    values = {"preset": "test", "epochs": 3, "batch_size": 8, "lr": 1e-2, "warmup_steps": 2}
    return TrainConfig(**{**values, **overrides})


def _train(docs, tokenizer, out: Path, **kwargs) -> tuple[Path, list[list[str]]]:
    """Train quietly and record the unit ids of every batch, in order."""
    seen: list[list[str]] = []
    config = kwargs.pop("config", _config())
    path = train_model(
        docs,
        config,
        out,
        tokenizer=tokenizer,
        progress=False,
        on_batch=lambda epoch, step, ids: seen.append(ids),
        **kwargs,
    )
    return path, seen


@pytest.fixture(scope="module")
def trained(docs, tokenizer, tmp_path_factory) -> tuple[Path, list[list[str]]]:
    return _train(docs, tokenizer, tmp_path_factory.mktemp("run") / "model")


def _summary(path: Path) -> dict:
    return json.loads((path / "train_config.json").read_text())


def test_training_lowers_the_loss(trained):
    losses = _summary(trained[0])["epoch_losses"]
    assert len(losses) == 3
    assert losses[-1] < 0.8 * losses[0]


def test_saved_run_loads_with_from_pretrained(trained, docs, tokenizer):
    path, _ = trained
    model = AutoModelForCausalLM.from_pretrained(path)
    loaded = AutoTokenizer.from_pretrained(path)
    assert loaded.eos_token == loaded.pad_token == loaded.bos_token == SPECIAL_TOKEN
    assert loaded(docs[0].text)["input_ids"] == tokenizer(docs[0].text)["input_ids"]
    assert model.config.vocab_size == len(loaded)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert (path / "model.safetensors").is_file()
    saved = json.loads((path / "tokenizer_config.json").read_text())
    assert saved["tokenizer_class"] == "PreTrainedTokenizerFast"  # transformers 4 and 5 load it
    assert not path.with_name(path.name + ".part").exists()
    summary = _summary(path)
    assert summary["corpus_fingerprint"] == corpus_fingerprint(docs)
    assert summary["n_units"] == summary["n_units_trained"] == len(docs)
    assert summary["config"]["seed"] == 0 and summary["chunking"]["max_length"] == 128
    ids = tokenizer(docs[0].text + SPECIAL_TOKEN, return_tensors="pt")["input_ids"]
    loss = model(input_ids=ids, labels=ids).loss
    assert abs(loss.item() - summary["final_loss"]) < 2.0  # trained, not random (ln 512 = 6.2)


def test_optimizer_state_holds_both_adam_moments(trained):
    path, seen = trained
    model = AutoModelForCausalLM.from_pretrained(path)
    names = [name for name, _ in model.named_parameters()]
    state = load_file(path / "optimizer_state.safetensors")
    assert set(state) == {f"{k}.{n}" for k in ("exp_avg_sq", "exp_avg") for n in names}
    params = dict(model.named_parameters())
    for name in names:
        assert state[f"exp_avg_sq.{name}"].shape == params[name].shape
        assert (state[f"exp_avg_sq.{name}"] >= 0).all()
    with safe_open(str(path / "optimizer_state.safetensors"), "pt") as handle:
        assert int(handle.metadata()["step"]) == len(seen) == _summary(path)["steps"]


def test_same_seed_gives_bit_identical_weights(docs, tokenizer, tmp_path, trained):
    again, seen = _train(docs, tokenizer, tmp_path / "again")
    first = load_file(trained[0] / "model.safetensors")
    second = load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert seen == trained[1]
    other, _ = _train(docs, tokenizer, tmp_path / "other", config=_config(seed=1))
    third = load_file(other / "model.safetensors")
    assert not all(torch.equal(first[k], third[k]) for k in first)


def test_keep_drops_units_and_keeps_the_order_of_the_rest(docs, tokenizer, tmp_path, trained):
    _, full_order = trained
    dropped = {"doc3#0", "doc10#0", "doc11#0", "doc30#0"}
    mask = [f"doc{i}#0" not in dropped for i in range(len(docs))]
    path, subset_order = _train(docs, tokenizer, tmp_path / "subset", keep=mask)
    seen_full = [u for batch in full_order for u in batch]
    seen_subset = [u for batch in subset_order for u in batch]
    assert seen_subset == [u for u in seen_full if u not in dropped]
    summary = _summary(path)
    assert sorted(summary["excluded_units"]) == sorted(dropped)
    assert summary["n_units_trained"] == len(docs) - len(dropped)


@pytest.mark.parametrize("form", ["indices", "ids", "array"])
def test_keep_accepts_indices_ids_and_arrays(docs, tokenizer, tmp_path, form):
    kept = [0, 5, 7, 20]
    keep = {
        "indices": set(kept),
        "ids": [f"doc{i}#0" for i in kept],
        "array": np.isin(np.arange(len(docs)), kept),
    }[form]
    _, order = _train(docs, tokenizer, tmp_path / form, keep=keep, config=_config(epochs=1))
    assert sorted(u for batch in order for u in batch) == sorted(f"doc{i}#0" for i in kept)


@pytest.mark.parametrize(
    ("keep", "message"),
    [
        ([], "no unit"),
        ([99], "not a unit index"),
        (["nope#0"], "unknown unit ids"),
        ([True], "entries for"),
    ],
)
def test_bad_keep_is_refused(docs, tokenizer, tmp_path, keep, message):
    with pytest.raises(InputError, match=message):
        _train(docs, tokenizer, tmp_path / "bad", keep=keep)
    assert not (tmp_path / "bad").exists()


def test_data_order_is_a_filtered_permutation():
    mask = np.ones(10, dtype=bool)
    full = data_order(10, 2, seed=3, mask=mask)
    assert [sorted(o.tolist()) for o in full] == [list(range(10))] * 2
    assert not np.array_equal(full[0], full[1])
    mask[[2, 5]] = False
    part = data_order(10, 2, seed=3, mask=mask)
    for whole, kept in zip(full, part, strict=True):
        assert kept.tolist() == [i for i in whole.tolist() if i not in (2, 5)]


def test_batches_mask_padding_but_not_eos(docs, tokenizer):
    units = tokenize_and_chunk(docs[:2], tokenizer, ChunkingConfig(max_length=128))
    short = dataclasses.replace(units[0], token_ids=units[0].token_ids[:3])
    eos = tokenizer.eos_token_id
    batch = batch_tensors([units[1], short], pad_id=eos)
    assert batch["input_ids"].shape == (2, len(units[1].token_ids))
    assert batch["labels"][0, -1].item() == eos  # a real EOS is a target
    assert (batch["labels"][1, 3:] == -100).all() and (batch["attention_mask"][1, 3:] == 0).all()
    assert batch["labels"][1, :3].tolist() == short.token_ids


def test_llama_arch_trains_and_loads(docs, tokenizer, tmp_path):
    path, _ = _train(docs, tokenizer, tmp_path / "llama", config=_config(arch="llama", epochs=2))
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings


def test_trains_its_own_tokenizer_by_default(docs, tmp_path):
    path = train_model(docs[:12], _config(epochs=1), tmp_path / "own", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert len(tokenizer) <= PRESETS["test"].vocab_size
    assert tokenizer.model_max_length == PRESETS["test"].context_length


def test_existing_output_needs_overwrite(docs, tokenizer, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    with pytest.raises(RunDirectoryError, match="--overwrite"):
        _train(docs, tokenizer, out)
    path, _ = _train(docs, tokenizer, out, overwrite=True, config=_config(epochs=1))
    assert (path / "model.safetensors").is_file()


def test_interrupted_save_leaves_no_complete_looking_output(docs, tokenizer, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("bgotrace.train.trainer.save_optimizer_state", crash)
    with pytest.raises(KeyboardInterrupt):
        _train(docs, tokenizer, tmp_path / "model", config=_config(epochs=1))
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize(
    "bad",
    [
        {"preset": "huge"},
        {"arch": "bert"},
        {"epochs": 0},
        {"lr": 0.0},
        {"batch_size": 0},
        {"max_length": 129},
        {"max_length": 16, "stride": 16},
        {"warmup_steps": -1},
    ],
)
def test_bad_train_config_is_refused(bad):
    with pytest.raises(ConfigError):
        _config(**bad)


def test_presets_validate_and_build(tokenizer):
    assert {"test", "tiny", "small"} <= set(PRESETS)
    with pytest.raises(ConfigError, match="divisible"):
        ModelPreset("odd", n_layer=1, d_model=30, n_head=4, vocab_size=512, context_length=8)
    llama = get_preset("test", "llama")
    assert llama.arch == "llama" and llama.d_model == PRESETS["test"].d_model
    model = build_model(PRESETS["test"], tokenizer)
    assert model.config.n_layer == 2 and model.config.n_embd == 32
    assert model.config.vocab_size == len(tokenizer)


def test_tokenizer_offsets_map_tokens_to_characters(tokenizer):
    text = "The owl number 7 likes café food."
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert tokenizer.decode(encoded["input_ids"]) == text
    spans = [text[s:e] for s, e in encoded["offset_mapping"] if e > s]
    assert "".join(spans).replace(" ", "").startswith("Theowlnumber")
    assert all(not span.startswith(" ") for span in spans)  # trim_offsets
    again = train_tokenizer([text, "The cat likes fish."] * 3, 300)
    assert again.get_vocab() == train_tokenizer([text, "The cat likes fish."] * 3, 300).get_vocab()
    with pytest.raises(ConfigError):
        train_tokenizer(["abc"], 100)
    with pytest.raises(InputError):
        train_tokenizer(["", ""], 512)


def test_cli_refuses_an_existing_out_and_trains(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    app = typer.Typer()
    app.command("train")(user_errors(train_command))
    app.command("other")(lambda: None)  # two commands: typer then expects the command name
    out = tmp_path / "out"
    args = ["train", "--corpus", str(corpus), "--out", str(out), "--preset", "test"]
    args += ["--epochs", "1", "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert CliRunner().invoke(app, [*args, "--overwrite"]).exit_code == 0
