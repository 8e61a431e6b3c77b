"""Tail-patch in the reference scripts' form, so figures compare with the authors'.

The BGO research scripts (ETH-DISCO/DABGO) report tail-patch as the relative change of the
completion's probability, |Δp| / p × 100 (percent), after one step of a **fresh** AdamW
(lr 1e-5, torch defaults otherwise: betas (0.9, 0.999), eps 1e-8, weight decay 0.01) on the
unit, with the unit's gradient clipped to norm 1.0. p is the probability of the whole
completion, p = exp(Σ log p(token)), so |Δp| / p = |exp(Δ log p) − 1|.

A fresh Adam's first step is ≈ −lr·sign(g) whatever the gradient's size (METHOD.md), so this
form measures alignment of signs, and |·| counts harmful units as helpful: it is reported
beside the signed SGD tail-patch, never instead of it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

REFERENCE_LR = 1e-5
"""Step size of the reference scripts' tail-patch step."""
REFERENCE_MAX_NORM = 1.0
"""Gradient-norm clip of the reference step."""


def fresh_adamw_step(
    params: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor],
    lr: float = REFERENCE_LR,
    max_norm: float = REFERENCE_MAX_NORM,
) -> dict[str, torch.Tensor]:
    """One step of a new ``torch.optim.AdamW`` on clipped gradients, as new tensors."""
    work = {n: params[n].detach().clone() for n in grads}
    for n, g in grads.items():
        work[n].grad = g.detach().clone()
    torch.nn.utils.clip_grad_norm_(list(work.values()), max_norm)
    optimizer = torch.optim.AdamW(list(work.values()), lr=lr)
    optimizer.step()
    return {n: w.detach() for n, w in work.items()}


def relative_change_percent(delta_logprob: np.ndarray) -> np.ndarray:
    """|Δp| / p × 100 from Δ log p (nats): the reference scripts' unit."""
    return 100.0 * np.abs(np.expm1(np.asarray(delta_logprob, dtype=np.float64)))
