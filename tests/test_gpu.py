"""GPU checks (deselected by default; run with `pytest -m gpu` on a CUDA machine).

Tolerance: a bfloat16 sweep rounds losses to ~3 significant digits, so bf16 scores are
compared with float32 ones by rank correlation, not elementwise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

import bgotrace
from bgotrace.corpus import Document
from tests.conftest import make_tiny_tokenizer
from tests.models import tiny_gpt2

pytestmark = pytest.mark.gpu

DOCS = [
    Document(f"d{i}", f"Document {i} says the river {i} runs to the sea {i}.", "s")
    for i in range(24)
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_float32_matches_cpu_and_bf16_keeps_the_ranking():
    tokenizer = make_tiny_tokenizer()
    config = {
        "corpus": {"max_length": 16},
        "perturb": {"optimizer": "adam", "lr": 3e-3, "steps": 3},
    }
    kwargs = dict(prompt="Document 3 says the", completion=" river 3 runs", config=config)
    cpu = bgotrace.attribute(tiny_gpt2(tokenizer), tokenizer, DOCS, **kwargs)
    gpu = bgotrace.attribute(tiny_gpt2(tokenizer).cuda(), tokenizer, DOCS, **kwargs)

    def by_unit(r):
        return r.scores.sort_values("unit_index")["score"].to_numpy()

    np.testing.assert_allclose(by_unit(gpu), by_unit(cpu), atol=1e-4)
    bf16_config = {**config, "scoring": {"dtype": "bfloat16"}}
    bf16 = bgotrace.attribute(
        tiny_gpt2(tokenizer).cuda(), tokenizer, DOCS, **{**kwargs, "config": bf16_config}
    )
    assert (
        spearmanr(
            bf16.scores.sort_values("unit_index")["score"],
            cpu.scores.sort_values("unit_index")["score"],
        ).statistic
        > 0.9
    )
