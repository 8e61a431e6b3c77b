"""Seeded Gaussian random projection of long gradient vectors, in bounded memory.

``x ↦ x R / √k`` with R (D, k) i.i.d. standard normal: inner products and norms are
preserved in expectation (Johnson–Lindenstrauss), so cosines of k-dimensional projections
approximate cosines of D-dimensional gradients with error about 1/√k. R is never held
whole: it is generated in blocks of rows, each from its own seed ``(seed, block)``, and
regenerated on every call. Projecting many vectors at once amortises the generation.
"""

from __future__ import annotations

import math

import numpy as np
import torch

CHUNK_ELEMENTS = 1 << 24
"""Entries of one generated block of R (64 MiB in float32)."""


class GaussianProjection:
    """The linear map R/√k from ``dim_in`` to ``dim_out`` dimensions, fixed by ``seed``."""

    def __init__(self, dim_in: int, dim_out: int, seed: int, chunk_rows: int | None = None):
        if dim_out < 1 or dim_in < 1:
            raise ValueError(f"projection dims must be >= 1, got {dim_in} -> {dim_out}")
        self.dim_in, self.dim_out, self.seed = dim_in, dim_out, seed
        self.chunk_rows = chunk_rows or max(1, CHUNK_ELEMENTS // dim_out)

    def block(self, c: int) -> torch.Tensor:
        """Rows ``[c·chunk_rows, (c+1)·chunk_rows)`` of R, (rows, dim_out) float32 on CPU.

        Generated on the CPU so that a seed gives the same R on every device.
        """
        rows = min(self.chunk_rows, self.dim_in - c * self.chunk_rows)
        state = np.random.SeedSequence([self.seed, c]).generate_state(2, dtype=np.uint32)
        gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        return torch.randn(rows, self.dim_out, generator=gen)

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.dim_in / self.chunk_rows)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Project rows of x (B, dim_in) to (B, dim_out), float32 on x's device."""
        out = torch.zeros(x.shape[0], self.dim_out, device=x.device)  # (B, k)
        for c in range(self.n_blocks):
            start = c * self.chunk_rows
            r = self.block(c).to(x.device)  # (rows, k)
            out += x[:, start : start + r.shape[0]].float() @ r
        return out / math.sqrt(self.dim_out)

    def matrix(self) -> torch.Tensor:
        """The whole R/√k (dim_in, dim_out): only for checks on small dimensions."""
        blocks = [self.block(c) for c in range(self.n_blocks)]
        return torch.cat(blocks) / math.sqrt(self.dim_out)
