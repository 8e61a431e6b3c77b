"""Temporarily restrict which model parameters track gradients."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch


@contextmanager
def grads_only_for(model: torch.nn.Module, names: Sequence[str]) -> Iterator[list[torch.Tensor]]:
    """Yield the named parameters with ``requires_grad`` set on them alone.

    Autograd then builds no graph for the frozen rest, and the flags are restored
    afterwards so the caller's model is left as it was.
    """
    wanted = set(names)
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    try:
        for n, p in params.items():
            p.requires_grad_(n in wanted)
        yield [params[n] for n in names]
    finally:
        for n, p in params.items():
            p.requires_grad_(saved[n])
