"""How a worker gets the tokens of a block: from the cache path, or shipped by the driver.

``path``: the worker opens the token cache at the driver's path (a file system every node
mounts) and reads each block from its memory map; nothing but block indices travels.
``ship``: the driver reads a block's tokens and puts them in Ray's object store
(:class:`UnitSlice`, a few MB per block); only the blocks in flight live there, so no
node needs the cache on disk. ``--ship-cache auto`` lets each worker choose: path when it
can open the cache and its manifest matches the driver's, ship otherwise.

A subset view of the cache (``--candidates``: a rerank group's ``SubsetUnits``) has no
directory of its own; a worker that reads the cache by path gets a block's corpus unit
indices (:func:`corpus_indices`) and takes those units from the cache, others get the
block shipped as a :class:`UnitSlice`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bgotrace.cache.batching import TokenSource, unit_loss_mask
from bgotrace.score.executor import Block

SHIP_MODES = ("auto", "always", "never")


@dataclass(frozen=True)
class UnitSlice:
    """The units of one block, re-indexed from 0: a :class:`TokenSource` on its own."""

    tokens: np.ndarray
    """Token ids of the block's units back to back, (n_tokens,)."""
    starts: np.ndarray
    """Offset of each unit in ``tokens``, (n_units,) int64."""
    unit_lengths: np.ndarray
    """Tokens per unit, (n_units,) int64."""
    indices: np.ndarray
    """Corpus unit (token-cache index) of each unit, (n_units,) int64: where a trunk cache
    finds its rows (:meth:`bgotrace.cache.trunk_cache.TrunkCache.for_units`)."""
    masks: np.ndarray | None = None
    """Loss mask beside ``tokens``, (n_tokens,) bool (SFT conversations); None: every token."""

    @property
    def lengths(self) -> np.ndarray:
        return self.unit_lengths

    def unit_tokens(self, i: int) -> np.ndarray:
        return self.tokens[self.starts[i] : self.starts[i] + self.unit_lengths[i]]

    def unit_loss_mask(self, i: int) -> np.ndarray | None:
        if self.masks is None:
            return None
        return self.masks[self.starts[i] : self.starts[i] + self.unit_lengths[i]]

    @classmethod
    def of_block(cls, units: TokenSource, block: Block) -> UnitSlice:
        """Copy units ``block.start:block.stop`` out of ``units`` (in their order).

        ``units`` is the token cache, or a subset view of it naming its corpus units
        through ``indices`` (as ``bgotrace.prefilter.rerank.SubsetUnits`` does).
        """
        return cls.of_units(units, np.arange(block.start, block.stop, dtype=np.int64))

    @classmethod
    def of_units(cls, units: TokenSource, positions: np.ndarray) -> UnitSlice:
        """Copy the units at ``positions`` of ``units`` (in that order), e.g. a block of
        the normaliser (any corpus units)."""
        seqs = [np.asarray(units.unit_tokens(int(i))) for i in positions]
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        tokens = np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.uint32)
        span = np.asarray(positions, dtype=np.int64)
        indices = corpus_indices(units, span)
        masks = [unit_loss_mask(units, int(i)) for i in span]
        joined = None
        if any(m is not None for m in masks):
            joined = np.concatenate(
                [np.ones(n, bool) if m is None else m for m, n in zip(masks, lengths, strict=True)]
            )
        return cls(tokens, starts, lengths, indices, joined)

    def local_block(self, block: Block) -> Block:
        """The same block indexed into this slice (units 0..n)."""
        return Block(block.index, 0, len(self.unit_lengths))


def corpus_indices(units: TokenSource, positions: np.ndarray) -> np.ndarray:
    """The corpus units (token-cache indices) at ``positions`` of ``units``: the positions
    themselves for the cache, ``units.indices[positions]`` for a subset view of it."""
    span = np.asarray(positions, dtype=np.int64)
    view = getattr(units, "indices", None)
    return span if view is None else np.asarray(view, dtype=np.int64)[span]


def open_cache_at(root: str | None, expected: dict[str, object]) -> tuple[TokenSource | None, str]:
    """The token cache at ``root`` if this node can read it and it is the driver's cache.

    Returns (cache or None, why not). ``expected`` holds manifest keys that must match
    (a different cache at the same path on another node would give wrong scores).
    """
    if root is None:
        return None, "the driver sweeps a subset of units (shipped)"
    from bgotrace.cache import TokenCache
    from bgotrace.errors import BgotraceError

    if not (Path(root) / "manifest.json").is_file():
        return None, f"{root} is not readable on this node"
    try:
        cache = TokenCache(root)
    except (BgotraceError, OSError, ValueError) as err:
        return None, f"{root} cannot be opened on this node ({err})"
    differs = [k for k, v in expected.items() if cache.manifest.get(k) != v]
    if differs:
        return None, f"{root} on this node is another cache ({', '.join(differs)} differ)"
    return cache, ""
