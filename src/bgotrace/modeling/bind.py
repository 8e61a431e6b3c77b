"""A module with some parameters replaced, built once and reused for many batches.

``functional_call`` re-binds every parameter on every call; in a sweep that evaluates
each state on hundreds of batches, that Python overhead costs as much as the compute of
a small block. :func:`bind` instead makes a structural copy of the module once, whose
parameters are the given values (by name) or the original module's own tensors, so no
weight is copied and the original is never written.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

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


@contextmanager
def swapped(module: torch.nn.Module, values: Mapping[str, torch.nn.Parameter]) -> Iterator[None]:
    """``module`` with its parameter ``name`` replaced by ``values[name]`` for the duration.

    What ``functional_call`` does on every call, done once for many calls: the K steps of a
    perturbation run the model with their working copies swapped in (gradients flow to them;
    the optimizer steps them in place), instead of re-binding every parameter on every step.
    Only the module's parameter *entries* change, never a tensor of it; every entry of a
    tied parameter is swapped together (GPT-2's head and input embedding stay one); the
    original entries come back on exit, also on errors. Unknown names are refused.
    """
    params = dict(module.named_parameters())
    unknown = sorted(set(values) - set(params))
    if unknown:
        raise KeyError(f"{type(module).__name__} has no parameter(s) {unknown[:3]}")
    by_id = {id(params[name]): value for name, value in values.items()}
    entries: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []  # (owner, attr, original)
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in by_id:
            path, _, attr = name.rpartition(".")
            entries.append((module.get_submodule(path), attr, p))
    try:
        for holder, attr, p in entries:
            holder._parameters[attr] = by_id[id(p)]
        yield
    finally:
        for holder, attr, p in entries:
            holder._parameters[attr] = p
