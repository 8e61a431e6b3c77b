"""A module with some parameters replaced, built once and reused for many batches.

``functional_call`` re-binds every parameter on every call; in a sweep that evaluates
each state on hundreds of batches, that Python overhead costs as much as the compute of
a small block. :func:`bind` instead makes a structural copy of the module once, whose
parameters are the given values (by name) or the original module's own tensors, so no
weight is copied and the original is never written.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch


def bind(module: torch.nn.Module, values: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of ``module`` whose parameter ``name`` is ``values[name]`` where given.

    Every other parameter and every buffer is shared with ``module`` (tied weights stay
    tied: they are one object). Unknown names are refused.
    """
    params = dict(module.named_parameters())
    unknown = sorted(set(values) - set(params))
    if unknown:
        raise KeyError(f"{type(module).__name__} has no parameter(s) {unknown[:3]}")
    memo: dict[int, object] = {id(b): b for b in module.buffers()}
    for name, p in params.items():
        if name in values:
            memo[id(p)] = torch.nn.Parameter(values[name], requires_grad=False)
        else:
            memo[id(p)] = p
    return copy.deepcopy(module, memo)
