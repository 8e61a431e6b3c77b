"""A sweep over some units only (prefilter + rerank): a subset view, and losses put back.

The engine is unchanged: it sweeps a :class:`SubsetUnits` view (the same
:class:`~bgotrace.cache.batching.TokenSource` protocol as the token cache) while the sweep
context keeps ``n_units`` = the corpus size, so the Fisher step's N, the Fisher sample and
the perturbed states are exactly those of the full sweep. A swept unit's loss is therefore
the full sweep's loss of that unit (batching leaves every unit's loss unchanged).
:func:`scatter` then places the swept units' losses in corpus-sized arrays, NaN elsewhere
(not scored, which is not the same as a score of 0).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bgotrace.cache.batching import TokenSource, loss_counts, unit_loss_mask
from bgotrace.score.engine import QueryLosses


class SubsetUnits:
    """The units ``indices`` of a token source, seen as units 0..len(indices)-1."""

    def __init__(self, units: TokenSource, indices: np.ndarray) -> None:
        self.source = units
        self.indices = np.asarray(indices, dtype=np.int64)  # (m,) corpus unit indices
        self._lengths = units.lengths[self.indices]  # (m,)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def lengths(self) -> np.ndarray:
        return self._lengths

    def unit_tokens(self, i: int) -> np.ndarray:
        return self.source.unit_tokens(int(self.indices[i]))

    def unit_loss_mask(self, i: int) -> np.ndarray | None:
        return unit_loss_mask(self.source, int(self.indices[i]))

    @property
    def loss_counts(self) -> np.ndarray:
        return loss_counts(self.source)[self.indices]


def scatter(result: QueryLosses, indices: np.ndarray, units: TokenSource) -> QueryLosses:
    """Losses of the swept ``indices`` placed in corpus-sized arrays (NaN elsewhere).

    Token counts of the units not swept are their predicted tokens in the loss (length - 1
    for plain text), which is what the sweep would have counted.
    """
    n = len(units.lengths)
    losses = {}
    for state, values in result.losses.items():
        full = np.full(n, np.nan, dtype=np.float64)
        full[indices] = values
        losses[state] = full
    counts = loss_counts(units).copy()
    counts[indices] = result.counts
    return dataclasses.replace(result, losses=losses, counts=counts)
