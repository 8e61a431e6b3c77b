"""``bgo-linear``: BGO's exact first-order control behind the common interface.

The score of unit z is ∇L(z; θ0)·Δ in nats, Δ = θ− − θ+ of the query's actual perturbed
states (the variant's own direction for ``--score ascent``/``descent``/``abs``/``agree``):
the same perturbation (optimizer, lr or ``lr: auto``, steps, params), normalisation,
reduction and outputs as ``bgo``, but one forward-mode pass over the corpus instead of the
sweep under θ+ and θ− (:mod:`bgotrace.score.linear`). Where its ranking matches ``bgo``'s,
BGO's finite steps changed nothing; where it does not, they did.

It runs through :func:`bgotrace.bgo.run_bgo` like ``bgo`` (registered there as a perturbation
method), so it takes exactly ``bgo``'s options.
"""

from __future__ import annotations

from bgotrace.baselines.base import register
from bgotrace.baselines.unlearning import BGO


@register("bgo-linear")
class BGOLinear(BGO):
    """First-order BGO, ∇L(z; θ0)·(θ− − θ+) in nats, by forward-mode differentiation."""
