"""Which parameters the perturbation may move.

Restricting the perturbation (the last N blocks, or a regex such as LoRA or MLP
weights) makes BGO cheaper and lets several perturbed states share one sweep.
"""

from __future__ import annotations

import re

import torch

from bgotrace.errors import ConfigError

# Matches the block index in names like transformer.h.3.mlp..., model.layers.3.self_attn...
_BLOCK_RE = re.compile(r"\.(?:h|layers|layer|blocks|block)\.(\d+)\.")


def select_parameters(model: torch.nn.Module, spec: str) -> list[str]:
    """Names of the trainable parameters chosen by ``all | last:N | last:half | regex:PATTERN``."""
    names = [n for n, p in model.named_parameters() if p.is_floating_point()]
    if spec == "all":
        chosen = names
    elif spec.startswith("last:"):
        chosen = _last_blocks(names, spec.split(":", 1)[1])
    elif spec.startswith("regex:"):
        pattern = _compile(spec)
        chosen = [n for n in names if pattern.search(n)]
    else:
        raise ConfigError(f"--params={spec!r} is unknown: use all, last:N or regex:PATTERN.")
    if not chosen:
        raise ConfigError(
            f"--params={spec!r} selects no parameter of this model: "
            f"names look like {names[0]!r}; widen the selection."
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
    keep = set(blocks[-n_blocks:])
    return [n for n in names if (m := _BLOCK_RE.search(n)) and int(m.group(1)) in keep]


def _compile(spec: str) -> re.Pattern[str]:
    """The pattern of ``regex:PATTERN``; a malformed one is the user's to fix, not a crash."""
    try:
        return re.compile(spec.split(":", 1)[1])
    except re.error as err:
        raise ConfigError(
            f"--params={spec!r} is not a valid regular expression ({err}): fix the pattern."
        ) from None
