"""Content fingerprints of parameters, to key caches and to check resumed runs."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import torch


def tensors_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of ``tensors`` (sorted by name)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def model_fingerprint(model: torch.nn.Module, names: Iterable[str] | None = None) -> str:
    """Fingerprint of a model's parameters (all, or only ``names``)."""
    wanted = None if names is None else set(names)
    params = {n: p for n, p in model.named_parameters() if wanted is None or n in wanted}
    return tensors_fingerprint(params)
