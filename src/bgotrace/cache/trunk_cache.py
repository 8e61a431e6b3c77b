"""Trunk-activation cache: the hidden states entering block b for every unit, on disk.

When every perturbed parameter lies in blocks >= b, the trunk (embeddings + blocks < b,
base weights) gives the same hidden states in every run on the same model and corpus.
Storing them once lets later runs skip the trunk: a query then costs only its top
blocks and the LM head. Layout, beside the token cache::

    TOKEN_CACHE/trunk/<model fingerprint>-b<split>-<dtype>/
        manifest.json   model fingerprint, split block, token-cache fingerprint, dtype…
        hidden.bin      (n_tokens, hidden_size) rows of every unit, in unit order
        lengths.npy     tokens per unit (n_units,)

Built in a temporary directory and renamed into place when complete; reused only when
the manifest matches the request, refused otherwise (stale). Rows are stored in float16
(default) or bfloat16: scores then carry that dtype's rounding of the trunk output
(float16: relative 2^-11 per element), the same for θ0, θ+ and θ−.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from bgotrace.cache.batching import TokenSource, collate, length_buckets
from bgotrace.cache.locking import exclusive
from bgotrace.cache.token_cache import TokenCache
from bgotrace.devices import resolve_dtype
from bgotrace.errors import CacheMismatchError, ConfigError
from bgotrace.modeling.fingerprint import model_fingerprint
from bgotrace.modeling.split import trunk
from bgotrace.runtime.progress import progress_task

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST, ROWS, LENGTHS = "manifest.json", "hidden.bin", "lengths.npy"
STORED_DTYPES = ("float16", "bfloat16", "float32")
_RAW = {"float16": np.int16, "bfloat16": np.int16, "float32": np.float32}
"""numpy has no bfloat16: 2-byte rows are stored raw and viewed as the torch dtype."""


@dataclass(frozen=True)
class TrunkRequest:
    """What a trunk cache must have been built from to be reused."""

    model_fingerprint: str
    split: int
    dtype: str
    """Stored dtype: float16 | bfloat16 | float32."""
    sweep_dtype: str
    """Dtype the trunk ran in."""
    token_cache_fingerprint: str
    hidden_size: int
    n_units: int
    n_tokens: int

    def manifest(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, **self.__dict__}


class TrunkCache:
    """Read-only rows of a complete trunk cache."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.manifest = json.loads((root / MANIFEST).read_text())
        self.split: int = self.manifest["split"]
        self.dtype = resolve_dtype(self.manifest["dtype"])
        self._raw = np.dtype(_RAW[self.manifest["dtype"]])
        self._row_bytes = self.manifest["hidden_size"] * self._raw.itemsize
        self.lengths = np.load(root / LENGTHS).astype(np.int64)  # (n_units,) tokens per unit
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        # Read with pread, not a memmap: touched memmap pages count as this process's
        # resident memory, which would grow with the corpus; the page cache does not.
        self._fd = os.open(root / ROWS, os.O_RDONLY)

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)

    def unit_hidden(self, i: int) -> torch.Tensor:
        """Hidden states (L_i, D) entering block ``split`` of corpus unit ``i``."""
        n = int(self.lengths[i])
        data = os.pread(self._fd, n * self._row_bytes, int(self.starts[i]) * self._row_bytes)
        rows = np.frombuffer(bytearray(data), dtype=self._raw).reshape(n, -1)
        return torch.from_numpy(rows).view(self.dtype)

    def for_units(self, units: TokenSource) -> TrunkRows:
        """Rows in the order of ``units``: the token cache, or a subset view of it.

        A subset view says which corpus units it shows through ``indices`` (as
        ``bgotrace.prefilter.rerank.SubsetUnits`` does).
        """
        indices = getattr(units, "indices", None)
        index = None if indices is None else np.asarray(indices, dtype=np.int64)
        if index is None and len(units.lengths) != len(self.lengths):
            raise ValueError("the units swept are not the trunk cache's units")
        return TrunkRows(self, index)


@dataclass(frozen=True)
class TrunkRows:
    """A trunk cache seen through the swept units' indices."""

    cache: TrunkCache
    index: np.ndarray | None
    """Swept unit k → corpus unit index[k] (None: the same numbering)."""

    @property
    def split(self) -> int:
        return self.cache.split

    def batch(self, batch: np.ndarray, width: int, device: torch.device) -> torch.Tensor:
        """Right-padded hidden states (B, width, D) of swept units ``batch`` (zeros at pads)."""
        dim = self.cache.manifest["hidden_size"]
        out = torch.zeros(len(batch), width, dim, dtype=self.cache.dtype)
        for row, k in enumerate(batch):
            unit = int(k) if self.index is None else int(self.index[int(k)])
            hidden = self.cache.unit_hidden(unit)
            out[row, : len(hidden)] = hidden
        return out.to(device)


def token_cache_fingerprint(cache: TokenCache) -> str:
    m = cache.manifest
    keys = ("corpus_fingerprint", "tokenizer_fingerprint", "chunking", "n_units", "n_tokens")
    return json.dumps({k: m.get(k) for k in keys}, sort_keys=True)


def trunk_request(
    model: torch.nn.Module, cache: TokenCache, split: int, dtype: str
) -> TrunkRequest:
    if dtype not in STORED_DTYPES:
        raise ConfigError(f"--trunk-cache-dtype {dtype!r}: use one of {', '.join(STORED_DTYPES)}.")
    param = next(model.parameters())
    return TrunkRequest(
        model_fingerprint=model_fingerprint(model),
        split=split,
        dtype=dtype,
        sweep_dtype=str(param.dtype).removeprefix("torch."),
        token_cache_fingerprint=token_cache_fingerprint(cache),
        hidden_size=int(cast(Any, model).config.hidden_size),
        n_units=len(cache),
        n_tokens=int(cache.lengths.sum()),
    )


def trunk_cache_dir(cache: TokenCache, request: TrunkRequest) -> Path:
    name = f"{request.model_fingerprint[:16]}-b{request.split}-{request.dtype}"
    return cache.root / "trunk" / name


def get_trunk_cache(
    model: torch.nn.Module,
    cache: TokenCache,
    split: int,
    *,
    dtype: str,
    batch_size: int,
    pad_id: int,
    device: torch.device,
) -> TrunkCache:
    """Reopen the trunk cache of this model, split and token cache, or build it."""
    request = trunk_request(model, cache, split, dtype)
    root = trunk_cache_dir(cache, request)
    # Two runs on one cache build it once: the second waits here, then reuses it.
    with exclusive(root, what="trunk cache"):
        if (root / MANIFEST).is_file():
            stored = json.loads((root / MANIFEST).read_text())
            wanted = request.manifest()
            diffs = [k for k in sorted(wanted) if stored.get(k) != wanted[k]]
            if diffs:
                raise CacheMismatchError(
                    f"Trunk cache {root} is stale (differs in {', '.join(diffs)}): delete it "
                    "(rm -r) to rebuild it, or run without --trunk-cache."
                )
            log.info("reusing trunk cache %s (block %d)", root, split)
            return TrunkCache(root)
        build_trunk_cache(model, cache, request, root, batch_size=batch_size, pad_id=pad_id,
                          device=device)  # fmt: skip
    return TrunkCache(root)


def estimated_bytes(request: TrunkRequest) -> int:
    return request.n_tokens * request.hidden_size * np.dtype(_RAW[request.dtype]).itemsize


@torch.inference_mode()
def build_trunk_cache(
    model: torch.nn.Module,
    cache: TokenCache,
    request: TrunkRequest,
    root: Path,
    *,
    batch_size: int,
    pad_id: int,
    device: torch.device,
) -> None:
    """Run the trunk over every unit and write its rows, atomically (temp dir + rename)."""
    log.warning(
        "building trunk cache %s: %d units, %d tokens x %d x %s = %.1f MiB",
        root, request.n_units, request.n_tokens, request.hidden_size, request.dtype,
        estimated_bytes(request) / 2**20,
    )  # fmt: skip
    tmp = root.with_name(f".{root.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        _write_rows(model, cache, request, tmp, batch_size, pad_id, device)
        (tmp / MANIFEST).write_text(json.dumps(request.manifest(), indent=2, sort_keys=True))
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_rows(
    model: torch.nn.Module,
    cache: TokenCache,
    request: TrunkRequest,
    tmp: Path,
    batch_size: int,
    pad_id: int,
    device: torch.device,
) -> None:
    lengths = cache.lengths.astype(np.int64)
    np.save(tmp / LENGTHS, lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    shape = (request.n_tokens, request.hidden_size)
    rows = np.memmap(tmp / ROWS, dtype=_RAW[request.dtype], mode="w+", shape=shape)
    stored = resolve_dtype(request.dtype)
    with progress_task("Trunk cache", total=len(cache)) as advance:
        for batch in length_buckets(np.arange(len(cache)), lengths, batch_size):
            ids, mask, _ = collate(cache, batch, pad_id, device)
            hidden = trunk(model, ids, mask, request.split).hidden  # (B, T, D)
            assert hidden is not None
            raw = hidden.to(stored).cpu().view(torch.int16 if stored != torch.float32 else stored)
            for row, unit in enumerate(batch):
                n = int(lengths[unit])
                rows[starts[unit] : starts[unit] + n] = raw[row, :n].numpy()
            advance(len(batch))
    rows.flush()
    del rows
