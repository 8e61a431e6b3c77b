"""What the memory plan needs to know about a model, read from its config alone.

The model is built on the meta device (shapes, no storage, nothing read from the weights
files), so a directory holding only ``config.json`` is enough; the parameter selection is
the perturbation's own (:func:`bgotrace.perturb.params.select_parameters`). Every expert of
a mixture-of-experts model is a parameter like any other and is counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from bgotrace.errors import ModelLoadError, first_line
from bgotrace.modeling.split import split_block
from bgotrace.perturb.ghost_norms import plan_for
from bgotrace.perturb.params import select_parameters


@dataclass(frozen=True)
class ModelShape:
    """Sizes of one model and of one parameter selection (counts, not bytes)."""

    n_params: int
    """Every parameter of the model (tied weights once, every expert)."""
    n_selected: int
    """Parameters ``--params`` selects (the perturbed ones)."""
    largest_selected: int
    """Elements of the largest selected tensor."""
    hidden: int
    """Width of the residual stream."""
    layers: int
    """Transformer blocks."""
    intermediate: int
    """Width of one MLP (of one expert, times the experts a token visits)."""
    heads: int
    """Attention heads."""
    vocab: int
    """Rows of the LM head (logits per position)."""
    context: int | None
    """Positions the model reads, when its config says so."""
    grad_layers: int | None = None
    """Blocks a backward pass runs through: from the first block holding a selected
    parameter to the last (None: all of them, the selection reaches below the blocks)."""
    uncovered_selected: int = 0
    """Selected parameters the batched normaliser's ghost norms do not cover (e.g. fused
    experts): their gradient is computed one unit at a time."""

    @property
    def backward_layers(self) -> int:
        """:attr:`grad_layers`, or every block."""
        return self.layers if self.grad_layers is None else self.grad_layers


def _first(cfg: PretrainedConfig, names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def read_config(path: str | Path, trust_remote_code: bool = False) -> PretrainedConfig:
    """``config.json`` of a model directory (weights need not be there)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{path} has no config.json: pass a Hugging Face model directory (the plan "
            "needs its config.json only)."
        )
    try:
        json.loads((path / "config.json").read_text(encoding="utf-8"))
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"{path}/config.json is unreadable ({first_line(err)}): re-save it with "
            "save_pretrained, or upgrade transformers if the architecture is new."
        ) from None


class MetaModel:
    """A causal LM built from its config on the meta device: shapes, no storage."""

    def __init__(self, config: PretrainedConfig, trust_remote_code: bool = False) -> None:
        with torch.device("meta"):
            self.module = AutoModelForCausalLM.from_config(
                config, trust_remote_code=trust_remote_code
            )
        self.config = config.get_text_config()
        self.sizes = {n: p.numel() for n, p in self.module.named_parameters()}

    def shape(self, params: str) -> ModelShape:
        """Counts and sizes with the ``--params`` selection ``params``."""
        chosen = select_parameters(self.module, params)
        cfg = self.config
        layers = _first(cfg, ("num_hidden_layers", "n_layer", "num_layers"), 1)
        split = split_block(self.module, chosen)
        uncovered = plan_for(self.module, chosen).uncovered
        hidden = _first(cfg, ("hidden_size", "n_embd", "d_model"), 1)
        experts = _first(cfg, ("num_experts_per_tok", "moe_topk"), 1)
        ffn = _first(cfg, ("moe_intermediate_size", "intermediate_size", "n_inner"), 4 * hidden)
        return ModelShape(
            n_params=sum(self.sizes.values()),
            n_selected=sum(self.sizes[n] for n in chosen),
            largest_selected=max(self.sizes[n] for n in chosen),
            hidden=hidden,
            layers=layers,
            intermediate=ffn * experts,
            heads=_first(cfg, ("num_attention_heads", "n_head"), 1),
            vocab=_first(cfg, ("vocab_size",), 1),
            context=_first(cfg, ("max_position_embeddings", "n_positions", "n_ctx"), 0) or None,
            grad_layers=layers - split if split is not None else None,
            uncovered_selected=sum(self.sizes[n] for n in uncovered),
        )


def model_shape(
    config: PretrainedConfig, params: str, trust_remote_code: bool = False
) -> ModelShape:
    """:meth:`MetaModel.shape` of ``config``'s causal LM."""
    return MetaModel(config, trust_remote_code).shape(params)
