"""Per-unit gradient norms on disk: each unit computed once, reused by every later run.

``<token cache>/sensitivity/<key>.npz`` holds ``norms`` (n_units,) float64 and ``computed``
(n_units,) bool: the units computed so far. A ``--candidates`` run computes its candidates
(and the reference sample, see :func:`bgotrace.perturb.sensitivity.reference_units`) only;
a later run with other candidates computes the units still missing. While a pass runs,
every finished block is written to ``<key>.blocks/`` (atomically: ``*.part`` renamed), so an
interrupted pass resumes at its first missing unit; at the end the blocks are merged into
``<key>.npz`` (atomically) and removed.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class NormStore:
    """The stored norms of one (corpus, model, parameters, dtype, estimator) key."""

    path: Path
    """``<key>.npz``: the merged norms."""
    n_units: int
    merged: list[Path] = field(default_factory=list)
    """Block files read or written by this process: removed once merged."""

    @property
    def blocks(self) -> Path:
        return self.path.with_name(self.path.stem + ".blocks")

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """(norms (n,) float64, NaN where not computed; computed (n,) bool)."""
        norms = np.full(self.n_units, np.nan)
        computed = np.zeros(self.n_units, dtype=bool)
        if self.path.is_file():
            with np.load(self.path) as data:
                norms[:], computed[:] = data["norms"], data["computed"]
        for part in sorted(self.blocks.glob("*.npz")) if self.blocks.is_dir() else []:
            if part.name.endswith(".part.npz"):
                continue  # a write that never finished
            with np.load(part) as data:
                norms[data["units"]], computed[data["units"]] = data["norms"], True
            self.merged.append(part)
        return norms, computed

    def add_block(self, units: np.ndarray, norms: np.ndarray) -> None:
        """Keep one finished block (corpus unit indices and their norms) until the merge."""
        self.blocks.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(units.astype(np.int64).tobytes()).hexdigest()[:12]
        path = self.blocks / f"{int(units[0]):010d}-{digest}.npz"
        _save(path, units=units.astype(np.int64), norms=norms.astype(np.float64))
        self.merged.append(path)

    def merge(self, norms: np.ndarray, computed: np.ndarray) -> None:
        """Write every computed norm to ``<key>.npz`` and drop the blocks it now holds."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _save(self.path, norms=np.where(computed, norms, np.nan), computed=computed)
        for part in self.merged:
            part.unlink(missing_ok=True)
        self.merged = []
        if self.blocks.is_dir() and not any(self.blocks.iterdir()):
            shutil.rmtree(self.blocks, ignore_errors=True)


def _save(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez`` to ``path`` through ``*.part.npz``: a crash never leaves half a file."""
    tmp = path.with_name(path.stem + ".part.npz")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]  # the stub reads **arrays as allow_pickle
    tmp.replace(path)
