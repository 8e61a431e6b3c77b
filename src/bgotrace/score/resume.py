"""What a resumed run must prove it recomputed: the perturbed states and the sweep's split.

Shards on disk are only valid for the exact states (fingerprinted by value) and the
exact forward path (full, or split at a block) that produced them.
"""

from __future__ import annotations

from collections.abc import Sequence

from bgotrace.modeling.fingerprint import tensors_fingerprint
from bgotrace.query import EncodedQuery
from bgotrace.score.store import RunStore
from bgotrace.score.sweep import Overrides
from bgotrace.variants import BASE


def check_group_states(
    store: RunStore,
    g: int,
    group: Sequence[EncodedQuery],
    keys: Sequence[tuple[int, str]],
    states: Sequence[Overrides],
) -> None:
    """Record (or, on resume, compare) the fingerprints of group ``g``'s states."""
    fingerprints = {
        f"{group[q].query.query_id if q >= 0 else ''}:{d}": (
            tensors_fingerprint(s) if s is not None else BASE
        )
        for (q, d), s in zip(keys, states, strict=True)
    }
    store.check_state(f"group{g:03d}", fingerprints)


def check_split(store: RunStore, split: int | None) -> None:
    """Record (or compare) the block the sweep splits at (``full``: no split)."""
    store.check_state("sweep_split", "full" if split is None else f"block{split}")
