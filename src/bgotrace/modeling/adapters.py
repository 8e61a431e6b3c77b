"""Where each supported architecture keeps its blocks, and what every block is called with.

An adapter knows, for one family of Hugging Face causal LMs, how the model's own
``forward`` builds the block inputs in the installed ``transformers`` version (read from
its ``modeling_*.py``): the embedding, the causal/padding mask (through
``transformers.masking_utils``, so the attention implementation picks its own mask
format), rotary position embeddings, and the per-block keyword arguments. With that,
:mod:`bgotrace.modeling.split` can run any contiguous range of blocks by itself.

Covered: GPT-2, GPT-NeoX (Pythia), Llama, Mistral and Qwen2, and the mixture-of-experts
families built like Llama (Mixtral, Qwen2-MoE, OLMoE: their blocks route tokens to experts
inside, with the same block inputs). Anything else has no adapter and is run through its
full ``forward``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

BlockKwargs = list[dict[str, Any]]
"""Keyword arguments of each block, in block order (mask, position embeddings…)."""


@dataclass(frozen=True)
class Adapter:
    """How one architecture family runs: module paths and the block inputs."""

    name: str
    blocks: str
    """Dotted path of the ``ModuleList`` of transformer blocks, e.g. ``transformer.h``."""
    norm: str
    """Dotted path of the final norm."""
    head: str
    """Dotted path of the LM head."""
    embed: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
    """(model, input_ids (B, T)) → hidden states entering block 0 (B, T, D)."""
    block_kwargs: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor | None], BlockKwargs]
    """(model, hidden (B, T, D) for shape/dtype/device, attention_mask (B, T)) → kwargs."""


def _positions(x: torch.Tensor) -> torch.Tensor:
    """Positions 0..T-1 (1, T) for x of shape (B, T, ...).

    Right-padded batches without a KV cache: what each model's forward uses when
    ``position_ids`` is None.
    """
    return torch.arange(x.shape[1], device=x.device).unsqueeze(0)


def _causal(model: Any, hidden: torch.Tensor, mask: torch.Tensor | None) -> Any:
    return create_causal_mask(
        config=model.config,
        inputs_embeds=hidden,
        attention_mask=mask,
        cache=None,
        position_ids=_positions(hidden),
    )


def _gpt2_embed(model: Any, ids: torch.Tensor) -> torch.Tensor:
    t = model.transformer
    hidden = t.wte(ids) + t.wpe(_positions(ids))
    return t.drop(hidden)


def _gpt2_kwargs(model: Any, hidden: torch.Tensor, mask: torch.Tensor | None) -> Any:
    causal = _causal(model, hidden, mask)
    kw = {"attention_mask": causal, "position_ids": _positions(hidden), "use_cache": False}
    return [kw] * model.config.n_layer


def _neox_embed(model: Any, ids: torch.Tensor) -> torch.Tensor:
    return model.gpt_neox.emb_dropout(model.gpt_neox.embed_in(ids))


def _neox_kwargs(model: Any, hidden: torch.Tensor, mask: torch.Tensor | None) -> Any:
    positions = _positions(hidden)
    kw = {
        "attention_mask": _causal(model, hidden, mask),
        "position_ids": positions,
        "position_embeddings": model.gpt_neox.rotary_emb(hidden, position_ids=positions),
        "use_cache": False,
    }
    return [kw] * model.config.num_hidden_layers


def _llama_embed(model: Any, ids: torch.Tensor) -> torch.Tensor:
    return model.model.embed_tokens(ids)


def _llama_kwargs(model: Any, hidden: torch.Tensor, mask: torch.Tensor | None) -> Any:
    """Llama, Mistral, Qwen2 and their MoE kin: one rotary table, a full or sliding-window
    mask per layer."""
    config, positions = model.config, _positions(hidden)
    args = {
        "config": config,
        "inputs_embeds": hidden,
        "attention_mask": mask,
        "cache": None,
        "position_ids": positions,
    }
    kinds = _layer_kinds(config)
    masks = {"full_attention": create_causal_mask(**args)} if "full_attention" in kinds else {}
    if "sliding_attention" in kinds:
        masks["sliding_attention"] = create_sliding_window_causal_mask(**args)
    rotary = model.model.rotary_emb(hidden, position_ids=positions)
    return [
        {
            "attention_mask": masks[kind],
            "position_ids": positions,
            "position_embeddings": rotary,
            "use_cache": False,
        }
        for kind in kinds
    ]


def _layer_kinds(config: Any) -> list[str]:
    n = config.num_hidden_layers
    if config.model_type in ("qwen2", "qwen2_moe"):  # per-layer types (sliding layers optional)
        return list(config.layer_types[:n])
    if config.model_type in ("mistral", "mixtral") and config.sliding_window is not None:
        return ["sliding_attention"] * n
    return ["full_attention"] * n


_GPT2 = Adapter("gpt2", "transformer.h", "transformer.ln_f", "lm_head", _gpt2_embed, _gpt2_kwargs)
_NEOX = Adapter(
    "gpt_neox", "gpt_neox.layers", "gpt_neox.final_layer_norm", "lm_head", _neox_embed,
    _neox_kwargs,
)  # fmt: skip
_LLAMA = Adapter("llama", "model.layers", "model.norm", "lm_head", _llama_embed, _llama_kwargs)

ADAPTERS: dict[str, Adapter] = {
    "gpt2": _GPT2,
    "gpt_neox": _NEOX,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "mixtral": _LLAMA,
    "qwen2_moe": _LLAMA,
    "olmoe": _LLAMA,
}
"""``config.model_type`` → adapter."""


def adapter_for(model: torch.nn.Module) -> Adapter | None:
    """The model's adapter, or None when its forward must run whole."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    adapter = ADAPTERS.get(str(model_type))
    if adapter is None:
        return None
    try:  # a wrapped model (e.g. PEFT) keeps the config but not the module paths
        for path in (adapter.blocks, adapter.norm, adapter.head):
            model.get_submodule(path)
    except AttributeError:
        return None
    return adapter
