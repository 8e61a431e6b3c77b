"""K optimizer steps on half-precision weights without float32 copies (``--model-dtype``).

Why not a float32 working copy: for ``--params all`` it costs 4 bytes per parameter, and
Adam's two float32 moments 8 more: 96 GB for Llama-3-8B before the model itself. Here the
working copy and both moments stay in half precision (6 bytes per parameter for bfloat16),
and float32 is used only where the K steps need it: the arithmetic of each update, one
chunk of one tensor at a time (:data:`CHUNK` elements), never stored.

Why stochastic rounding: an update smaller than half a bfloat16 step of its weight would
vanish under round-to-nearest (Adam moves each weight by about η per step; with η = 1e-4
every weight above ~0.05 in magnitude would never move). Rounded stochastically, the
stored weight is an unbiased estimate of the float32 sum, so small steps accumulate in
expectation (the rounding noise is a few bfloat16 steps per weight, independent across
weights; the sweep reads the states in bfloat16 anyway). float16 keeps 11 significant bits,
enough for such steps on weights below ~0.4, and is rounded to nearest.

Moments are kept in bfloat16 for both half dtypes: float16 would underflow g² of small
gradients to zero (its smallest normal is 6e-5), bfloat16 has float32's exponent range.
The random bits come from a generator seeded per optimizer, so runs are reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

CHUNK = 1 << 22
"""Elements per update chunk: bounds the float32 transients to a few × 16 MiB."""


def update_transient_bytes(largest: int) -> int:
    """Transient bytes of one chunk's update of a tensor of ``largest`` elements: at most six
    4-byte buffers of a chunk alive at once (gradient, moments, denominator, update; then
    update, sum, random bits, result)."""
    return 6 * 4 * min(largest, CHUNK)


MOMENT_DTYPE = torch.bfloat16
"""Storage dtype of Adam's moments when the weights are in half precision."""


def needs_lowp(params: Sequence[torch.Tensor]) -> bool:
    """Whether the weights are in a half dtype (so :class:`LowPrecisionOptimizer` steps them)."""
    return any(p.dtype in (torch.bfloat16, torch.float16) for p in params)


def stochastic_round_(out: torch.Tensor, value: torch.Tensor, gen: torch.Generator) -> None:
    """Write float32 ``value`` into bfloat16 ``out``, rounded up with probability equal to
    the fraction of a bfloat16 step it lies above the value below (unbiased rounding).

    bfloat16 is float32's top 16 bits: adding 16 random low bits and truncating does it.
    Other dtypes are rounded to nearest.
    """
    if out.dtype != torch.bfloat16:
        out.copy_(value)
        return
    bits = value.contiguous().view(torch.int32)
    noise = torch.randint(
        0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=gen
    )
    out.copy_(((bits + noise) & -65536).view(torch.float32))  # exact: low bits are zero


def _moment(p: torch.Tensor) -> torch.Tensor:
    """A zero moment for ``p``: float32 beside float32 weights, else :data:`MOMENT_DTYPE`."""
    return torch.zeros_like(p, dtype=torch.float32 if p.dtype == torch.float32 else MOMENT_DTYPE)


class LowPrecisionOptimizer:
    """Adam (or plain steps for sgd/fisher) on half-precision leaf tensors.

    The same update as ``torch.optim.Adam`` / ``torch.optim.SGD`` (``maximize`` for ascent);
    equal to them in float32 (tested), with the storage described in the module docstring.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        *,
        lr: float,
        adam: tuple[float, float, float] | None,
        maximize: bool,
        seed: int = 0,
    ) -> None:
        self.params = list(params)
        self.lr, self.adam, self.sign = lr, adam, 1.0 if maximize else -1.0
        self.t = 0
        self.moments = [(_moment(p), _moment(p)) for p in self.params] if adam else []
        device = self.params[0].device
        self.gen = torch.Generator(device=device).manual_seed(seed)

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            flat, grad = p.view(-1), p.grad.reshape(-1)
            for lo in range(0, flat.numel(), CHUNK):
                part = slice(lo, lo + CHUNK)
                update = self._update(i, part, grad[part].float())
                stochastic_round_(flat[part], flat[part].float() + update, self.gen)

    def _update(self, i: int, part: slice, g: torch.Tensor) -> torch.Tensor:
        """This chunk's signed update in float32 (moments updated in place)."""
        if self.adam is None:
            return self.sign * self.lr * g
        beta1, beta2, eps = self.adam
        m_store, v_store = (s.view(-1)[part] for s in self.moments[i])
        m = m_store.float().mul_(beta1).add_(g, alpha=1 - beta1)
        v = v_store.float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
        m_store.copy_(m)
        v_store.copy_(v)
        correction2 = math.sqrt(1 - beta2**self.t)
        step = self.lr / (1 - beta1**self.t)
        return m.div(v.sqrt().div_(correction2).add_(eps)).mul_(self.sign * step)
