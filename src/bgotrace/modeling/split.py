"""The one forward path of the sweep and the perturbation: whole, or split at a block.

``trunk`` runs the embeddings and blocks ``< start`` once (base weights) and keeps what the
rest needs (per-block mask and position embeddings); ``top_hidden``/``top`` run blocks
``>= start``, the final norm and the LM head under a state's parameter overrides. When every
perturbed parameter lies in blocks ``>= b`` (:func:`split_block`), all states of a batch share
one trunk, so a state costs only its top blocks and the head.

Models without an adapter (:mod:`bgotrace.modeling.adapters`), or perturbations that touch
the embeddings, a tied head or the final norm, run the model's full ``forward`` instead; the
reason is logged once.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import cast

import torch
from torch.func import functional_call

from bgotrace.modeling.adapters import Adapter, BlockKwargs, adapter_for
from bgotrace.modeling.bind import bind
from bgotrace.modeling.losses import forward_logits, head_token_losses, token_losses

log = logging.getLogger(__name__)
_logged: set[str] = set()

Overrides = Mapping[str, torch.Tensor] | None
"""Replacement values of some parameters; None is the base model θ0."""


def log_once(message: str, *args: object) -> None:
    """Log a decision about the forward path once per process (sweeps repeat it per batch)."""
    text = message % args
    if text not in _logged:
        _logged.add(text)
        log.info(text)


@dataclass
class TrunkState:
    """A batch after the trunk: what the top blocks need to finish the forward."""

    input_ids: torch.Tensor
    """(B, T) token ids."""
    attention_mask: torch.Tensor | None
    """(B, T) 1 = real token, 0 = right padding (None: no padding)."""
    start: int | None
    """First block left to run; None: no split, ``top`` runs the full forward."""
    hidden: torch.Tensor | None = None
    """(B, T, D) hidden states entering block ``start``."""
    block_kwargs: BlockKwargs | None = None
    """Keyword arguments of every block (mask, position embeddings…)."""


def split_block(model: torch.nn.Module, names: Iterable[str]) -> int | None:
    """First block of the top when every name in ``names`` lies in blocks ``>= b``, else None.

    None also when the model has no adapter; the reason is logged once.
    """
    names = list(names)
    adapter = adapter_for(model)
    if adapter is None:
        log_once("full forward: no split adapter for %s", type(model).__name__)
        return None
    if not names:
        return None
    pattern = re.compile(re.escape(adapter.blocks) + r"\.(\d+)\.")
    outside = [n for n in names if not pattern.match(n)]
    if outside:
        log_once("full forward: the perturbation moves %s, outside the blocks", outside[0])
        return None
    return min(int(m.group(1)) for n in names if (m := pattern.match(n)))


def trunk(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    start: int | None,
) -> TrunkState:
    """Embeddings and blocks ``< start`` with the base weights (nothing when start is None)."""
    adapter = adapter_for(model)
    if start is None or adapter is None:
        return TrunkState(input_ids, attention_mask, None)
    hidden = adapter.embed(model, input_ids)  # (B, T, D)
    kwargs = adapter.block_kwargs(model, hidden, attention_mask)
    blocks = _blocks(model, adapter)
    for i in range(start):
        hidden = blocks[i](hidden, **kwargs[i])
    return TrunkState(input_ids, attention_mask, start, hidden, kwargs)


def resume_trunk(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    start: int,
    hidden: torch.Tensor,
) -> TrunkState:
    """A trunk state from stored hidden states entering block ``start`` (trunk cache)."""
    adapter = _require_adapter(model)
    kwargs = adapter.block_kwargs(model, hidden, attention_mask)
    return TrunkState(input_ids, attention_mask, start, hidden, kwargs)


def top_hidden(model: torch.nn.Module, state: TrunkState, overrides: Overrides) -> torch.Tensor:
    """Final-normed hidden states (B, T, D): blocks ``>= start`` + final norm, overridden."""
    adapter = _require_adapter(model)
    assert state.start is not None and state.hidden is not None and state.block_kwargs
    per_block = _overrides_by_block(adapter, overrides, state.start)
    blocks = _blocks(model, adapter)
    hidden = state.hidden
    for i in range(state.start, len(blocks)):
        own = per_block.get(i)
        if own:
            hidden = functional_call(blocks[i], own, args=(hidden,), kwargs=state.block_kwargs[i])
        else:
            hidden = blocks[i](hidden, **state.block_kwargs[i])
    return model.get_submodule(adapter.norm)(hidden)


def head(model: torch.nn.Module) -> torch.nn.Module:
    """The LM head module (hidden (…, D) → logits (…, V))."""
    return model.get_submodule(_require_adapter(model).head)


def top(model: torch.nn.Module, state: TrunkState, overrides: Overrides) -> torch.Tensor:
    """Logits (B, T, V) of the state: the top blocks + head, or the full forward."""
    if state.start is None:
        return forward_logits(model, state.input_ids, state.attention_mask, overrides)
    return head(model)(top_hidden(model, state, overrides))


def state_token_losses(
    model: torch.nn.Module, state: TrunkState, overrides: Overrides, labels: torch.Tensor
) -> torch.Tensor:
    """NLL (B, T-1) float32 of each predicted token under ``overrides`` (0 where IGNORE).

    Split: the top blocks, then the LM head in token chunks (:func:`head_token_losses`).
    """
    if state.start is None:
        return token_losses(top(model, state, overrides), labels)
    return head_token_losses(top_hidden(model, state, overrides), head(model), labels)


@dataclass
class BoundState:
    """One state, bound once into module copies that share the base model's tensors."""

    full: torch.nn.Module | None
    """No split: the whole model with the state's values bound."""
    blocks: list[torch.nn.Module] | None
    """Split: blocks ``>= start`` with the state's values bound (the others are the model's)."""


def bind_state(model: torch.nn.Module, start: int | None, overrides: Overrides) -> BoundState:
    """Bind ``overrides`` for evaluating many batches (see :mod:`bgotrace.modeling.bind`)."""
    if start is None:
        return BoundState(full=bind(model, overrides) if overrides else model, blocks=None)
    adapter = _require_adapter(model)
    per_block = _overrides_by_block(adapter, overrides, start)
    blocks = _blocks(model, adapter)
    bound = [
        bind(blocks[i], per_block[i]) if i in per_block else blocks[i]
        for i in range(start, len(blocks))
    ]
    return BoundState(full=None, blocks=bound)


def bound_token_losses(
    model: torch.nn.Module,
    state: TrunkState,
    bound: BoundState,
    labels: torch.Tensor,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`state_token_losses` of a bound state (the same modules, no per-call rebinding).

    ``keep``: the predicted positions, when known (:func:`head_token_losses`). Without a split
    the blocks' keyword arguments (mask, positions) are made by the batch's first state and
    kept in ``state`` for the others: they do not depend on the weights.
    """
    if state.start is None:
        assert bound.full is not None
        adapter = adapter_for(bound.full)
        if adapter is not None:  # every block, with the chunked head
            hidden = adapter.embed(bound.full, state.input_ids)
            if state.block_kwargs is None:
                state.block_kwargs = adapter.block_kwargs(bound.full, hidden, state.attention_mask)
            whole = TrunkState(state.input_ids, state.attention_mask, 0, hidden, state.block_kwargs)
            final = top_hidden(bound.full, whole, None)
            return head_token_losses(final, head(bound.full), labels, keep=keep)
        logits = forward_logits(bound.full, state.input_ids, state.attention_mask)  # (B, T, V)
        return token_losses(logits, labels)
    assert bound.blocks is not None and state.hidden is not None and state.block_kwargs
    hidden = state.hidden
    for k, block in enumerate(bound.blocks):
        hidden = block(hidden, **state.block_kwargs[state.start + k])
    final = model.get_submodule(_require_adapter(model).norm)(hidden)
    return head_token_losses(final, head(model), labels, keep=keep)


def _blocks(model: torch.nn.Module, adapter: Adapter) -> torch.nn.ModuleList:
    return cast(torch.nn.ModuleList, model.get_submodule(adapter.blocks))


def _require_adapter(model: torch.nn.Module) -> Adapter:
    adapter = adapter_for(model)
    if adapter is None:
        raise ValueError(f"{type(model).__name__} has no split adapter: use start=None")
    return adapter


def _overrides_by_block(
    adapter: Adapter, overrides: Overrides, start: int
) -> dict[int, dict[str, torch.Tensor]]:
    """{block index: {name inside the block: tensor}}; refuses names below ``start``."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    prefix = adapter.blocks + "."
    for name, value in (overrides or {}).items():
        index, _, rest = name.removeprefix(prefix).partition(".")
        if not name.startswith(prefix) or not index.isdigit() or int(index) < start:
            raise ValueError(f"override {name!r} is not in blocks >= {start}: split elsewhere")
        out.setdefault(int(index), {})[rest] = value
    return out
