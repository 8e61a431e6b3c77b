"""Baselines stage: BGO and eight baselines behind one interface (prepare, then score).

============== =========================================================== ==================
method         score of unit z for query x (high = z supports x)           units
============== =========================================================== ==================
random         seeded N(0, 1) draws (chance level)                         none
bm25           BM25 relevance of the unit's text to the completion         none, >= 0
repsim         cosine of mean-pooled last hidden states                    [-1, 1]
graddot        g_zᵀ g_x (loss gradients at the final checkpoint)           nats² / param²
gradcos        cos(g_z, g_x)                                               [-1, 1]
fisher-graddot g_zᵀ diag(F̂+ε)⁻¹ g_x: BGO's first-order limit              × 2Kη/N ≈ BGO nats
trackstar      cosine of projected g/(√v+ε), v = Adam's second moment      [-1, 1]
ekfac          g_xᵀ(Ĝ+λI)⁻¹g_z via kronfluence (positive = helpful)        ÷ N ≈ nats
untrac-inv     L(z; θ−) − L(z; θ0) (ascent only)                           nats
bgo            L(z; θ−) − L(z; θ+) (or the configured variant)             nats
bgo-linear     ∇L(z; θ0)·(θ− − θ+): BGO's exact first-order control        nats
============== =========================================================== ==================

Use :func:`get_attributor` and :class:`MethodContext` (see :mod:`bgotrace.baselines.base`).
"""

from __future__ import annotations

from bgotrace.baselines import (  # noqa: F401  (each module registers its methods)
    gradient,
    influence,
    lexical,
    linear,
    random,
    representation,
    unlearning,
)
from bgotrace.baselines.base import (
    Attributor,
    MethodContext,
    available_methods,
    get_attributor,
    register,
)

__all__ = ["Attributor", "MethodContext", "available_methods", "get_attributor", "register"]
