"""``--attn-implementation``: the attention kernel is chosen at load and is what the model runs.

Tolerance of the score comparisons: SDPA's math and eager attention compute the same float32
softmax-weighted sums in a different order (~1e-7 relative per activation); scores are
differences of unit losses of ~50 nats, so atol 1e-5 (a mask applied differently, e.g. a
padded key attended to, moves a score by far more).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bgotrace
from bgotrace.config import AttributeConfig
from bgotrace.errors import ConfigError
from bgotrace.modeling.loading import attention_for, load_model_and_tokenizer
from bgotrace.score.linear import linear_scores
from tests.conftest import make_tiny_tokenizer
from tests.corpora import QUERIES, documents
from tests.models import tiny_gpt2, tiny_llama


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model_dir(request, tmp_path_factory):
    tok = make_tiny_tokenizer()
    model = (tiny_gpt2 if request.param == "gpt2" else tiny_llama)(tok, seed=4)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize(("requested", "loaded"), [("auto", "sdpa"), ("sdpa", "sdpa"),
                                                   ("eager", "eager")])  # fmt: skip
def test_the_chosen_kernel_is_what_the_model_runs(model_dir, requested, loaded):
    model, _ = load_model_and_tokenizer(model_dir, attn_implementation=requested)
    assert model.config._attn_implementation == loaded


def test_auto_is_eager_where_the_architecture_has_no_sdpa(model_dir, monkeypatch):
    model, _ = load_model_and_tokenizer(model_dir)
    monkeypatch.setattr(type(model), "_supports_sdpa", False)
    again, _ = load_model_and_tokenizer(model_dir, attn_implementation="auto")
    assert again.config._attn_implementation == "eager"
    with pytest.raises(ConfigError, match="no sdpa attention.*--attn-implementation eager"):
        load_model_and_tokenizer(model_dir, attn_implementation="sdpa")


def test_flash_attention_without_its_package_gpu_or_half_precision_is_one_line(model_dir):
    model, _ = load_model_and_tokenizer(model_dir)
    for device, dtype in (("cpu", "bfloat16"), ("cpu", "float32")):
        with pytest.raises(ConfigError, match="flash_attention_2") as err:
            attention_for(model.config, "flash_attention_2", device, dtype)
        assert "\n" not in str(err.value) and "--attn-implementation sdpa" in str(err.value)


def test_bgo_linear_refuses_flash_attention():
    with pytest.raises(ConfigError, match="forward mode.*--attn-implementation sdpa"):
        AttributeConfig.from_dict({
            "model": {"path": "m", "attn_implementation": "flash_attention_2"},
            "corpus": {"path": "c"}, "query": {"prompt": "a", "completion": "b"},
            "method": "bgo-linear",
        })  # fmt: skip


def test_scores_with_sdpa_and_eager_agree(model_dir, tmp_path):
    tok = make_tiny_tokenizer()
    runs = {}
    for kernel in ("sdpa", "eager"):
        config = {
            "model": {"attn_implementation": kernel},
            "corpus": {"max_length": 12, "stride": 4, "cache_dir": str(tmp_path / "cache")},
            "perturb": {"lr": 3e-3, "steps": 2},
            "scoring": {"batch_size": 5},  # padded batches: the masks must agree too
            "output": {"top_tokens": 0},
        }
        result = bgotrace.attribute(str(model_dir), tok, documents(), queries=QUERIES[:2],
                                    config=config)  # fmt: skip
        runs[kernel] = result.scores.sort_values(["query_id", "unit_id"])["score"].to_numpy()
    assert np.isfinite(runs["sdpa"]).all()
    np.testing.assert_allclose(runs["sdpa"], runs["eager"], atol=1e-5, rtol=0)


def test_forward_mode_runs_under_both_kernels(model_dir, tmp_path):
    """bgo-linear's JVPs: SDPA (math backend) and eager give the same first-order scores."""
    from bgotrace.cache import get_token_cache
    from bgotrace.corpus import ChunkingConfig

    out = {}
    for kernel in ("sdpa", "eager"):
        model, tok = load_model_and_tokenizer(model_dir, attn_implementation=kernel)
        cache = get_token_cache(documents(), tok, ChunkingConfig(max_length=12), tmp_path)
        torch.manual_seed(0)
        direction = {n: torch.randn_like(p) * 1e-3 for n, p in model.named_parameters()}
        out[kernel] = linear_scores(model, cache, [direction], batch_size=4)
    np.testing.assert_allclose(out["sdpa"], out["eager"], atol=1e-6, rtol=1e-5)
