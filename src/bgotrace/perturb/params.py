"""Which parameters the perturbation may move.

Restricting the perturbation (the last N blocks, or a regex such as LoRA or MLP
weights) makes BGO cheaper and lets several perturbed states share one sweep.
``adapter`` picks the weights of an unmerged PEFT adapter (LoRA A/B) and nothing of the
base: the part of a fine-tuned model that holds the fine-tuning, perturbed as trained.
"""

from __future__ import annotations

import functools
import logging
import re

import torch

from bgotrace.errors import ConfigError

log = logging.getLogger(__name__)

# Matches the block index in names like transformer.h.3.mlp..., model.layers.3.self_attn...
_BLOCK_RE = re.compile(r"\.(?:h|layers|layer|blocks|block)\.(\d+)\.")


def select_parameters(model: torch.nn.Module, spec: str) -> list[str]:
    """Names of the trainable parameters chosen by ``all | last:N | last:half | regex:PATTERN``."""
    names = [n for n, p in model.named_parameters() if p.is_floating_point()]
    if spec == "adapter":
        return adapter_parameters(model)
    if spec == "all":
        chosen = names
    elif spec.startswith("last:"):
        chosen = _last_blocks(names, spec.split(":", 1)[1])
    elif spec.startswith("regex:"):
        pattern = _compile(spec)
        chosen = [n for n in names if pattern.search(n)]
    else:
        raise ConfigError(
            f"--params={spec!r} is unknown: use all, adapter, last:N or regex:PATTERN."
        )
    if not chosen:
        raise ConfigError(
            f"--params={spec!r} selects no parameter of this model: "
            f"names look like {names[0]!r}; widen the selection."
        )
    return chosen


def adapter_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the adapter weights of the PEFT layers in ``model`` (base weights excluded).

    Each PEFT tuner layer lists the attributes holding its adapter weights
    (``adapter_layer_names``: ``lora_A``, ``lora_B``, ``lora_embedding_A``…); everything
    under them is the adapter's, and the wrapped ``base_layer`` is not.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    prefixes = tuple(
        f"{name}.{attr}." if name else f"{attr}."
        for name, module in model.named_modules()
        if isinstance(module, BaseTunerLayer)
        for attr in module.adapter_layer_names
    )
    chosen = [
        n for n, p in model.named_parameters() if n.startswith(prefixes) and p.is_floating_point()
    ]
    if not chosen:
        raise ConfigError(
            "--params adapter, but the model has no unmerged PEFT adapter: pass --adapter DIR "
            "(a folder saved by a PEFT model), or choose --params all | last:N | regex:PATTERN."
        )
    return chosen


def _last_blocks(names: list[str], count: str) -> list[str]:
    blocks = sorted({int(m.group(1)) for n in names if (m := _BLOCK_RE.search(n))})
    if not blocks:
        raise ConfigError(
            "--params=last:N needs numbered transformer blocks, and this model has none: "
            "use --params regex:PATTERN."
        )
    # half: the upper ceil(L/2) blocks, so a 1-block model still perturbs its only block
    n_blocks = -(-len(blocks) // 2) if count == "half" else int(count)
    if n_blocks < 1:
        raise ConfigError(f"--params=last:{n_blocks} selects no block: pass last:1 or more.")
    if n_blocks > len(blocks):  # said, so a user who meant "everything" learns the difference
        _warn_more_blocks_than_the_model(n_blocks, len(blocks))
    keep = set(blocks[-n_blocks:])
    return [n for n in names if (m := _BLOCK_RE.search(n)) and int(m.group(1)) in keep]


@functools.cache  # once per process, not per call (the plan, the sweep, the normaliser ask)
def _warn_more_blocks_than_the_model(asked: int, blocks: int) -> None:
    log.warning(
        "--params=last:%d on a model of %d blocks: all %d blocks, without the embeddings, the "
        "final norm and the head (--params all moves those too)", asked, blocks, blocks,
    )  # fmt: skip


def _compile(spec: str) -> re.Pattern[str]:
    """The pattern of ``regex:PATTERN``; a malformed one is the user's to fix, not a crash."""
    try:
        return re.compile(spec.split(":", 1)[1])
    except re.error as err:
        raise ConfigError(
            f"--params={spec!r} is not a valid regular expression ({err}): fix the pattern."
        ) from None
