"""A slow, obvious BGO: model copies, hand-written optimizer updates, one unit at a time.

Nothing here is shared with the library's perturbation or sweep code except the
Fisher sample indices, so agreement means the fast path computes what the method says.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

IGNORE = -100


def unit_token_nll(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    """NLL of tokens 1..n-1 of one unit, by hand from log-softmax."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=x).logits[0].double(), dim=-1)
    return np.array([-float(logp[t - 1, ids[t]]) for t in range(1, len(ids))])


def query_loss(
    model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    logits = model(input_ids=input_ids).logits[0, :-1].float()
    target = labels[0, 1:]
    keep = target != IGNORE
    logp = torch.log_softmax(logits, dim=-1)
    return -logp[keep].gather(1, target[keep][:, None]).mean()


def fisher_diag(model: torch.nn.Module, units: list[list[int]], indices: np.ndarray) -> dict:
    """Mean squared per-unit gradient, one backward pass per unit."""
    acc = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in indices:
        model.zero_grad()
        ids = torch.tensor([units[int(i)]])
        query_loss(model, ids, ids.clone()).backward()
        for n, p in model.named_parameters():
            acc[n] += p.grad.detach() ** 2
    return {n: a / len(indices) for n, a in acc.items()}


def perturbed_copy(
    model,
    input_ids,
    labels,
    *,
    optimizer,
    lr,
    steps,
    sign,
    n_units=1,
    fisher=None,
    fisher_eps=1e-6,
    betas=(0.9, 0.999),
    eps=1e-8,
):
    """sign=-1: descent (θ+), sign=+1: ascent (θ−); every update written out."""
    m = copy.deepcopy(model)
    state = {n: (torch.zeros_like(p), torch.zeros_like(p)) for n, p in m.named_parameters()}
    for t in range(1, steps + 1):
        m.zero_grad()
        query_loss(m, input_ids, labels).backward()
        with torch.no_grad():
            for n, p in m.named_parameters():
                g = p.grad
                if optimizer == "sgd":
                    p += sign * lr * g
                elif optimizer == "fisher":
                    p += sign * (lr / n_units) * g / (fisher[n] + fisher_eps)
                else:
                    mom, var = state[n]
                    mom.mul_(betas[0]).add_((1 - betas[0]) * g)
                    var.mul_(betas[1]).add_((1 - betas[1]) * g * g)
                    m_hat = mom / (1 - betas[0] ** t)
                    v_hat = var / (1 - betas[1] ** t)
                    p += sign * lr * m_hat / (v_hat.sqrt() + eps)
    return m
