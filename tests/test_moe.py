"""Mixture-of-experts models attribute end to end, every expert perturbed.

Gradient-store tools track ``nn.Linear`` modules and miss fused experts (Mixtral's
``experts.gate_up_proj`` is one 3-D parameter per block in transformers 5). BGO perturbs
parameters by name, so the experts and routers move like any other weight; these tests pin
that for tiny Mixtral-, Qwen2-MoE- and OLMoE-style models built in code, that ``--params``
selects experts or routers alone, and that the shared trunk serves them (exactness of the
split forward for these families is in test_split_forward.py).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import bgotrace
from bgotrace.config import PerturbConfig
from bgotrace.modeling import split as split_mod
from bgotrace.perturb.params import select_parameters
from bgotrace.perturb.steps import ASCENT, perturb
from bgotrace.query import Query, encode_query
from tests.test_split_forward import build

MOE = ["mixtral", "qwen2_moe", "olmoe"]
QUERY = Query("q", "the cat", " sat on the mat")
EXPERTS = r"regex:\.experts\."
ROUTERS = r"regex:\.mlp\.gate\.weight$"


def moe(arch: str, tok) -> torch.nn.Module:
    return build(arch, vocab=len(tok))


@pytest.mark.parametrize("arch", MOE)
def test_every_expert_and_router_moves_under_the_perturbation(arch, tiny_tokenizer):
    model = moe(arch, tiny_tokenizer)
    names = select_parameters(model, "all")
    encoded = encode_query(QUERY, tiny_tokenizer, 64, None)
    cfg = PerturbConfig(lr=1e-2, steps=2)
    state = perturb(model, encoded, names, cfg, ASCENT, n_units=10)
    params = dict(model.named_parameters())
    experts = [n for n in names if ".experts." in n]
    routers = [n for n in names if n.endswith("mlp.gate.weight")]
    assert experts and routers
    for name in experts + routers:  # every expert's rows, not only the routed ones
        moved = (state.params[name] - params[name].detach()).abs()
        assert moved.max() > 0, name
    fused = params[experts[0]]
    assert fused.dim() == 3 and fused.shape[0] == 4  # one tensor holds all 4 experts


@pytest.mark.parametrize("arch", MOE)
def test_moe_models_attribute_end_to_end_through_the_shared_trunk(
    arch, tiny_tokenizer, tiny_documents, caplog
):
    model = moe(arch, tiny_tokenizer)
    config = {"corpus": {"max_length": 32}, "perturb": {"params": "last:1"}}
    split_mod._logged.clear()
    with caplog.at_level(logging.INFO, logger="bgotrace"):
        result = bgotrace.attribute(
            model, tiny_tokenizer, tiny_documents, prompt=QUERY.prompt,
            completion=QUERY.completion, config=config,
        )  # fmt: skip
    scores = result.scores["score"].to_numpy()
    assert np.isfinite(scores).all() and np.abs(scores).max() > 0
    assert "sweep split at block 2" in caplog.text  # the trunk (blocks 0-1) was shared
    total = sum(p.numel() for n, p in model.named_parameters() if ".layers.2." in n)
    assert result.summary["perturbed_parameters"] == total
    # no forward mode through fused experts (torch's grouped matmul): the optional first-order
    # check is skipped with a log line, never the run
    assert result.summary["queries"][0]["linearity"] is None


@pytest.mark.parametrize("arch", MOE)
def test_params_select_experts_or_routers_alone(arch, tiny_tokenizer):
    model = moe(arch, tiny_tokenizer)
    experts, routers = select_parameters(model, EXPERTS), select_parameters(model, ROUTERS)
    assert experts and all(".experts." in n for n in experts)
    assert len(routers) == 3 and all(n.endswith("mlp.gate.weight") for n in routers)
    everything = select_parameters(model, "all")
    expert_share = sum(model.get_parameter(n).numel() for n in experts) / sum(
        model.get_parameter(n).numel() for n in everything
    )
    assert expert_share > 0.1  # the experts are a large part of the model, none missed
