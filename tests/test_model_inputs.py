"""Model-side inputs: PEFT adapters, parameter selection, and the cached Fisher diagonal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bgotrace
from bgotrace.corpus import Document
from bgotrace.errors import ConfigError
from bgotrace.modeling.loading import load_model_and_tokenizer
from bgotrace.perturb.params import select_parameters
from tests.conftest import make_tiny_tokenizer
from tests.models import tiny_gpt2, tiny_llama

DOCS = [
    Document("paris", "Paris is the capital of France, Berlin of Germany.", "geo"),
    Document("fox", "The quick brown fox jumps over the lazy dog.", "animals"),
    Document("water", "Water boils at one hundred degrees.", "science"),
]
CONFIG = {"corpus": {"max_length": 16}, "perturb": {"optimizer": "adam", "steps": 2, "lr": 3e-3}}


def test_peft_adapter_is_merged_and_changes_scores(tmp_path):
    from peft import LoraConfig, get_peft_model

    tokenizer = make_tiny_tokenizer()
    base = tiny_llama(tokenizer)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    lora = get_peft_model(tiny_llama(tokenizer), LoraConfig(r=4, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained adapter: B != 0, so it changes the model
    lora.save_pretrained(tmp_path / "adapter")
    plain, _ = load_model_and_tokenizer(tmp_path / "base")
    merged, _ = load_model_and_tokenizer(tmp_path / "base", adapter=tmp_path / "adapter")
    expected = lora.merge_and_unload()
    for (name, p), q in zip(merged.named_parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)  # same weights as PEFT's own merge
    cfg = {**CONFIG, "corpus": {"max_length": 16, "cache_dir": str(tmp_path / "cache")}}
    a = bgotrace.attribute(
        plain, tokenizer, DOCS, prompt="Paris is", completion=" the capital", config=cfg
    )
    b = bgotrace.attribute(
        merged, tokenizer, DOCS, prompt="Paris is", completion=" the capital", config=cfg
    )
    assert not np.allclose(a.scores["score"], b.scores["score"])


def test_missing_adapter_config_is_refused(tmp_path):
    tokenizer = make_tiny_tokenizer()
    tiny_gpt2(tokenizer).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="adapter_config.json"):
        load_model_and_tokenizer(tmp_path / "m", adapter=tmp_path / "empty")


def test_parameter_selection():
    model = tiny_gpt2(make_tiny_tokenizer())
    names = [n for n, _ in model.named_parameters()]
    assert select_parameters(model, "all") == names
    last = select_parameters(model, "last:1")
    assert last and all(".h.1." in n for n in last)
    assert select_parameters(model, "regex:mlp") == [n for n in names if "mlp" in n]
    with pytest.raises(ConfigError, match="selects no parameter"):
        select_parameters(model, "regex:^nothing$")


def test_more_blocks_than_the_model_has_are_all_blocks_and_said(caplog):
    model = tiny_gpt2(make_tiny_tokenizer())  # 2 blocks
    blocks = select_parameters(model, "last:2")
    with caplog.at_level("WARNING", logger="bgotrace.perturb.params"):
        assert select_parameters(model, "last:7") == blocks
        assert select_parameters(model, "last:7") == blocks
    said = [r.getMessage() for r in caplog.records if "last:7" in r.getMessage()]
    assert said == [
        "--params=last:7 on a model of 2 blocks: all 2 blocks, without the "
        "embeddings, the final norm and the head (--params all moves those too)"
    ]


def test_restricted_perturbation_moves_only_selected_parameters():
    from bgotrace.config import PerturbConfig
    from bgotrace.perturb.steps import ASCENT, perturb
    from bgotrace.query import Query, encode_query

    tokenizer = make_tiny_tokenizer()
    model = tiny_gpt2(tokenizer)
    names = select_parameters(model, "last:1")
    q = encode_query(Query("q", "Paris is", " the capital"), tokenizer, 64)
    state = perturb(model, q, names, PerturbConfig(lr=1e-2, steps=2), ASCENT, n_units=3)
    assert set(state.params) == set(names)
    assert state.final_loss > state.loss_trajectory[0]  # ascent raised the query loss
    assert all(not torch.equal(state.params[n], dict(model.named_parameters())[n]) for n in names)


def test_fisher_is_cached_beside_the_token_cache(tmp_path):
    tokenizer = make_tiny_tokenizer()
    model = tiny_gpt2(tokenizer)
    cfg = {
        "corpus": {"max_length": 16, "cache_dir": str(tmp_path / "cache")},
        "perturb": {"optimizer": "fisher", "lr": 1e-6, "steps": 1, "fisher_samples": 3},
    }
    first = bgotrace.attribute(
        model, tokenizer, DOCS, prompt="Paris is", completion=" the", config=cfg
    )
    files = list((tmp_path / "cache" / "fisher").glob("*.safetensors"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    second = bgotrace.attribute(
        model, tokenizer, DOCS, prompt="Paris is", completion=" the", config=cfg
    )
    assert files[0].stat().st_mtime_ns == stamp  # reused, not recomputed
    np.testing.assert_array_equal(first.scores["score"], second.scores["score"])
    cfg["perturb"]["fisher_samples"] = 2
    bgotrace.attribute(model, tokenizer, DOCS, prompt="Paris is", completion=" the", config=cfg)
    assert len(list((tmp_path / "cache" / "fisher").glob("*.safetensors"))) == 2


def test_in_memory_corpus_reuses_one_cache_per_corpus_tokenizer_and_chunking():
    from bgotrace.config import CorpusSpec
    from bgotrace.pipeline import in_memory_cache_dir

    tokenizer = make_tiny_tokenizer()
    spec = CorpusSpec(path="<in-memory corpus>", max_length=16)
    first = in_memory_cache_dir(DOCS, tokenizer, spec)
    assert in_memory_cache_dir(list(DOCS), tokenizer, spec) == first
    assert in_memory_cache_dir(DOCS[:2], tokenizer, spec) != first
    assert in_memory_cache_dir(DOCS, make_tiny_tokenizer(300), spec) != first
    assert in_memory_cache_dir(DOCS, tokenizer, CorpusSpec(path="x", max_length=32)) != first
    model = tiny_gpt2(tokenizer)
    bgotrace.attribute(model, tokenizer, DOCS, prompt="Paris is", completion=" the", config=CONFIG)
    manifest = first / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    bgotrace.attribute(model, tokenizer, DOCS, prompt="Paris is", completion=" the", config=CONFIG)
    assert manifest.stat().st_mtime_ns == stamp  # second call reused the cache


def test_a_query_longer_than_the_context_is_refused_without_the_tokenizers_warning():
    """The refusal states the rule and the fix; transformers' own "longer than the maximum
    ... will result in indexing errors" warning would print before it and contradict it."""
    from bgotrace.errors import InputError
    from bgotrace.query import Query, encode_query

    tokenizer = make_tiny_tokenizer()
    tokenizer.model_max_length = 8
    long = Query(query_id="long", prompt="The capital is", completion=" Paris." * 20)
    with pytest.raises(InputError, match="but the model reads at most 8"):
        encode_query(long, tokenizer, max_context=8)
    warned = "sequence-length-is-longer-than-the-specified-maximum"
    assert not tokenizer.deprecation_warnings.get(warned), "transformers warned first"
