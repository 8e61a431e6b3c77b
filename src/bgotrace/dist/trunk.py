"""How a worker gets the trunk rows of a block: from the trunk cache by path, or not at all.

The driver builds or validates the trunk cache (``--trunk-cache``) exactly as a local run
does, then tells every worker its directory and manifest (:class:`TrunkSource`). A worker
opens it read-only where that path is readable on its node and holds the same manifest
(model fingerprint, split block, dtype and token-cache fingerprint: a different cache at
the same path on another node would give wrong scores); otherwise it computes the trunk
itself, which gives the same scores up to the stored dtype's rounding. The trunk cache is
never shipped through the object store: it holds n_tokens × hidden_size values (hundreds of
times the token cache), so shipping it would cost more than the trunk it saves. So
``--ship-cache`` is about the token cache only: with ``always`` a worker still reads the
trunk rows by path when it can, for the shipped units
(:attr:`bgotrace.dist.units.UnitSlice.indices`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bgotrace.cache.trunk_cache import TrunkCache


@dataclass(frozen=True)
class TrunkSource:
    """Where the driver's trunk cache is, and the manifest a worker's copy must match."""

    root: str
    """The trunk cache directory on the driver."""
    manifest: dict[str, Any]
    """Its manifest as the driver validated it."""

    @classmethod
    def of(cls, cache: TrunkCache | None) -> TrunkSource | None:
        return None if cache is None else cls(str(cache.root), dict(cache.manifest))


def open_trunk_at(source: TrunkSource | None) -> tuple[TrunkCache | None, str]:
    """The trunk cache at ``source.root`` if this node can read it and it is the driver's.

    Returns (cache or None, why not). Reading rows happens per batch (``pread``), so a
    complete ``hidden.bin`` of the manifest's size is checked here, once.
    """
    if source is None:
        return None, "no trunk cache"
    from bgotrace.cache.trunk_cache import MANIFEST, ROWS, TrunkCache, estimated_bytes
    from bgotrace.errors import BgotraceError

    root = Path(source.root)
    if not (root / MANIFEST).is_file() or not (root / ROWS).is_file():
        return None, f"{root} is not readable on this node"
    try:
        cache = TrunkCache(root)
    except (BgotraceError, OSError, ValueError, KeyError) as err:
        return None, f"{root} cannot be opened on this node ({err})"
    differs = sorted(k for k in source.manifest if cache.manifest.get(k) != source.manifest[k])
    if differs:
        return None, f"{root} on this node is another trunk cache ({', '.join(differs)} differ)"
    size = (root / ROWS).stat().st_size
    if size != estimated_bytes(_request_of(cache.manifest)):
        return None, f"{root} on this node is incomplete ({size} bytes of rows)"
    return cache, ""


def _request_of(manifest: dict[str, Any]) -> Any:
    from bgotrace.cache.trunk_cache import TrunkRequest

    fields = TrunkRequest.__dataclass_fields__
    return TrunkRequest(**{k: v for k, v in manifest.items() if k in fields})
