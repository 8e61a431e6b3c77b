"""``--params adapter``: a PEFT adapter perturbed as trained, unmerged, with the base frozen.

A tiny Llama gets a LoRA adapter trained for one step (so B != 0) and saved as safetensors.
The reference never runs PEFT: it reads the saved A and B, takes SGD steps on them through
the base model with W + s·B·A written in by hand (autograd for the gradient), and scores
every unit with that merged copy.

Tolerance: as tests/test_bgo_reference.py (float32 batched forwards vs a float64
log-softmax per unit, ~1e-6 nats; a wrong merge, scale or sign moves scores by > 1e-3).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import bgotrace
from bgotrace.cli.main import app
from bgotrace.corpus import Document
from bgotrace.errors import ConfigError
from bgotrace.modeling.loading import load_model_and_tokenizer
from bgotrace.perturb.params import select_parameters
from bgotrace.query import Query, encode_query
from tests.bgo_reference import query_loss, unit_token_nll
from tests.conftest import make_tiny_tokenizer
from tests.models import tiny_gpt2, tiny_llama

TOL = {"atol": 2e-5, "rtol": 1e-4}
RANK, ALPHA = 4, 8
SCALE = ALPHA / RANK
LR, STEPS = 0.5, 3
QUERY = Query("q", "Paris is the capital of", " France.")
DOCS = [
    Document("fox", "The quick brown fox jumps over the lazy dog.", "animals"),
    Document("paris", "Paris is the capital of France, Berlin of Germany.", "geo"),
    Document("rome", "Rome is the capital of Italy and Madrid of Spain.", "geo"),
    Document("water", "Water boils at one hundred degrees and ice melts at zero.", "science"),
]


def _save_lora(base: torch.nn.Module, tokenizer, root, targets: list[str]):
    """Base and a LoRA adapter trained one step (B != 0), both as safetensors."""
    from peft import LoraConfig, get_peft_model

    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets)
    lora = get_peft_model(copy.deepcopy(base), config)
    ids = torch.tensor([tokenizer("Berlin is the capital of Germany.")["input_ids"]])
    opt = torch.optim.Adam([p for p in lora.parameters() if p.requires_grad], lr=5e-2)
    lora(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    lora.save_pretrained(root / "adapter", safe_serialization=True)
    return root / "base", root / "adapter"


@pytest.fixture(scope="module")
def llama_lora(tmp_path_factory):
    tokenizer = make_tiny_tokenizer()
    root = tmp_path_factory.mktemp("llama_lora")
    return (*_save_lora(tiny_llama(tokenizer), tokenizer, root, ["q_proj", "v_proj"]), tokenizer)


def _saved_pairs(adapter_dir) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Base weight name → (A, B) from the adapter file, by PEFT's saved key names."""
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    pairs = {}
    for key, a in saved.items():
        if ".lora_A." in key:
            name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            pairs[name] = (a, saved[key.replace(".lora_A.", ".lora_B.")])
    return pairs


def _merged(base: torch.nn.Module, pairs) -> dict[str, torch.Tensor]:
    """W + s·B·A for every adapted weight (Linear layers: (out, in) = (out, r)·(r, in))."""
    params = dict(base.named_parameters())
    return {n: params[n] + SCALE * b @ a for n, (a, b) in pairs.items()}


def _reference_scores(base, tokenizer, adapter_dir, units: list[list[int]]) -> np.ndarray:
    enc = encode_query(QUERY, tokenizer, None)
    losses = {}
    for sign in (-1, +1):  # descent (θ+), ascent (θ−)
        pairs = {n: (a.clone().requires_grad_(), b.clone().requires_grad_())
                 for n, (a, b) in _saved_pairs(adapter_dir).items()}  # fmt: skip
        for _ in range(STEPS):
            weights = _merged(base, pairs)
            loss = query_loss(
                lambda w=weights, **kw: torch.func.functional_call(base, w, kwargs=kw),
                enc.input_ids,
                enc.labels,
            )
            grads = torch.autograd.grad(loss, [t for ab in pairs.values() for t in ab])
            with torch.no_grad():
                for t, g in zip([t for ab in pairs.values() for t in ab], grads, strict=True):
                    t += sign * LR * g
        merged = copy.deepcopy(base)
        with torch.no_grad():
            for name, w in _merged(base, pairs).items():
                merged.get_parameter(name).copy_(w)
        losses[sign] = np.array([unit_token_nll(merged, ids).sum() for ids in units])
    return losses[+1] - losses[-1]


def test_adapter_only_perturbation_matches_hand_merged_reference(llama_lora, tmp_path):
    base_dir, adapter_dir, tokenizer = llama_lora
    model, _ = load_model_and_tokenizer(base_dir, adapter=adapter_dir, merge_adapter=False)
    names = select_parameters(model, "adapter")
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(names) == 2 * len(_saved_pairs(adapter_dir))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = {
        "corpus": {"max_length": 12, "stride": 4, "cache_dir": str(tmp_path / "cache")},
        "perturb": {"optimizer": "sgd", "lr": LR, "steps": STEPS, "params": "adapter"},
        "scoring": {"reduce": "sum", "normalize": "none", "batch_size": 3},
    }
    result = bgotrace.attribute(
        model, tokenizer, DOCS, prompt=QUERY.prompt, completion=QUERY.completion, config=cfg
    )
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # base and adapter untouched
    from bgotrace.cache import get_token_cache
    from bgotrace.corpus import ChunkingConfig

    cache = get_token_cache(DOCS, tokenizer, ChunkingConfig(12, 4), tmp_path / "cache")
    units = [cache.unit_tokens(i).tolist() for i in range(len(cache))]
    base, _ = load_model_and_tokenizer(base_dir)
    reference = _reference_scores(base, tokenizer, adapter_dir, units)
    got = result.scores.sort_values("unit_index")["score"].to_numpy()
    np.testing.assert_allclose(got, reference, **TOL)
    assert np.abs(reference).max() > 1e-3  # the adapter's perturbation moved the losses


def test_adapter_params_leave_the_base_bit_identical(llama_lora):
    from bgotrace.config import PerturbConfig
    from bgotrace.modeling.split import split_block
    from bgotrace.perturb.steps import ASCENT, perturb

    base_dir, adapter_dir, tokenizer = llama_lora
    model, _ = load_model_and_tokenizer(base_dir, adapter=adapter_dir, merge_adapter=False)
    names = select_parameters(model, "adapter")
    q = encode_query(QUERY, tokenizer, 64)
    state = perturb(model, q, names, PerturbConfig(lr=1e-2, steps=2), ASCENT, n_units=3)
    assert set(state.params) == set(names)  # the state is adapter-sized
    assert split_block(model, names) == 0  # PEFT's layers sit in the blocks: split forward
    params = dict(model.named_parameters())
    assert all(not torch.equal(state.params[n], params[n]) for n in names)
    plain, _ = load_model_and_tokenizer(base_dir)
    for name, p in plain.named_parameters():  # the base under PEFT's base_layer, as saved
        wrapped = name.replace(".weight", ".base_layer.weight")
        assert torch.equal(p, params.get(wrapped, params.get(name)))


def test_adapter_params_without_an_adapter_is_refused(llama_lora):
    base_dir, _, _ = llama_lora
    plain, _ = load_model_and_tokenizer(base_dir)
    with pytest.raises(ConfigError, match="no unmerged PEFT adapter: pass --adapter DIR"):
        select_parameters(plain, "adapter")


def test_cli_attribute_with_adapter_params(tmp_path):
    tokenizer = make_tiny_tokenizer()
    base_dir, adapter_dir = _save_lora(tiny_gpt2(tokenizer), tokenizer, tmp_path, ["c_attn"])
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": d.doc_id, "text": d.text}) + "\n" for d in DOCS))
    args = ["attribute", "--model", str(base_dir), "--corpus", str(corpus), "--quiet",
            "--cache-dir", str(tmp_path / "cache"), "--max-length", "12", "--steps", "2",
            "--prompt", QUERY.prompt, "--completion", QUERY.completion]  # fmt: skip
    runs = {}
    for params in ("adapter", "all"):
        out = tmp_path / f"run-{params}"
        extra = ["--adapter", str(adapter_dir), "--params", params, "--out", str(out)]
        result = CliRunner().invoke(app, [*args, *extra])
        assert result.exit_code == 0, result.output
        runs[params] = json.loads((out / "summary.json").read_text())
    assert runs["adapter"]["config"]["perturb"]["params"] == "adapter"
    assert runs["adapter"]["config"]["model"]["adapter"] == str(adapter_dir)
    scores = {p: pd.read_parquet(tmp_path / f"run-{p}" / "scores.parquet") for p in runs}
    assert not np.allclose(scores["adapter"]["score"], scores["all"]["score"])
    missing = CliRunner().invoke(app, [*args, "--params", "adapter"])
    assert missing.exit_code != 0
    assert "no unmerged PEFT adapter" in missing.output
