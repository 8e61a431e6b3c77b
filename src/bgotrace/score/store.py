"""The run directory: config, resumable sweep shards, and atomic final outputs.

Layout of ``RUN/``::

    config.yaml          the AttributeConfig that replays the run
    state.json           fingerprints of the inputs and of every perturbed state
    shards/gNNN/bNNNNN.npz  per-block loss sums of one query group (resume points)
    scores.parquet ...   final outputs, each written to ``*.part`` then renamed
    summary.json         written last: its presence marks a complete run

A run is resumable because each block's shard is renamed into place only once it is
whole, and ``state.json`` lets a resumed run prove it recomputed the same states. Each
shard carries a SHA-256 digest of its arrays (and of its group and block numbers): a
truncated, altered or misplaced shard is reported, deleted and recomputed, never merged.
Options that only say *where* the sweep runs (the ``execution`` section but its device:
workers, the Ray cluster) may differ on resume, so a run interrupted on a cluster can
finish on one machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bgotrace.config import AttributeConfig, ExecutionConfig
from bgotrace.errors import RunDirectoryError

log = logging.getLogger(__name__)

SUMMARY = "summary.json"
CONFIG = "config.yaml"
STATE = "state.json"


class RunStore:
    """Reads and writes one run directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def open(cls, root: str | Path, *, overwrite: bool, resume: bool) -> RunStore:
        """Create ``root`` for a new run, or reopen it to resume; refuse to clobber."""
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise RunDirectoryError(f"Run path {root} is a file: choose a directory for --out.")
        if root.exists() and any(root.iterdir()):
            if overwrite:
                shutil.rmtree(root)
            elif not resume:
                what = "a complete run" if (root / SUMMARY).exists() else "an interrupted run"
                raise RunDirectoryError(
                    f"Run directory {root} already holds {what}: pass --resume to continue it "
                    "or --overwrite to replace it."
                )
        elif resume:
            raise RunDirectoryError(f"--resume was given but {root} holds no run: drop --resume.")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # a parent that is a file, a read-only or missing mount
            raise RunDirectoryError(
                f"Cannot create the run directory {root} ({err.strerror}): choose another --out."
            ) from None
        if resume:
            (root / SUMMARY).unlink(missing_ok=True)  # the outputs are rewritten at the end
        return cls(root)

    def check_config(self, config: AttributeConfig) -> None:
        """Write ``config.yaml``; a resumed run must bring the same config."""
        path = self.root / CONFIG
        if path.is_file() and _scored_part(AttributeConfig.load(path)) != _scored_part(config):
            raise RunDirectoryError(
                f"Cannot resume {self.root}: its config.yaml differs from this run's options; "
                "resume with --config pointing at it, or start over with --overwrite."
            )
        config.save(path)

    # --- run state -------------------------------------------------------------------
    def check_state(self, key: str, value: Any) -> None:
        """Record ``value`` under ``key``, or check it equals what a previous run recorded."""
        state = self._read_state()
        if key in state and state[key] != value:
            raise RunDirectoryError(
                f"Cannot resume {self.root}: its {key} differs from this run's "
                f"({str(state[key])[:60]} vs {str(value)[:60]}); start over with --overwrite."
            )
        state[key] = value
        self.write_text(STATE, json.dumps(state, indent=2, sort_keys=True))

    def _read_state(self) -> dict[str, Any]:
        path = self.root / STATE
        return json.loads(path.read_text()) if path.is_file() else {}

    # --- sweep shards ------------------------------------------------------------------
    def shard_path(self, group: int, block: int) -> Path:
        return self.root / "shards" / f"g{group:03d}" / f"b{block:05d}.npz"

    def load_shard(self, group: int, block: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The sums and counts of a finished block; None when absent or damaged (deleted)."""
        path = self.shard_path(group, block)
        if not path.is_file():
            return None
        try:
            with np.load(path) as data:
                sums, counts, digest = data["sums"], data["counts"], str(data["digest"])
            if digest != _shard_digest(group, block, sums, counts):
                raise ValueError("its digest does not match its contents")
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            log.warning("shard %s is damaged (%s): recomputing its block", path, err)
            path.unlink()
            return None
        return sums, counts

    def save_shard(self, group: int, block: int, sums: np.ndarray, counts: np.ndarray) -> None:
        path = self.shard_path(group, block)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        digest = _shard_digest(group, block, sums, counts)
        with open(tmp, "wb") as fh:
            np.savez(fh, sums=sums, counts=counts, digest=np.array(digest))
        tmp.replace(path)

    # --- final outputs -----------------------------------------------------------------
    def write_atomic(self, name: str, write: Callable[[Path], object]) -> Path:
        """Write ``name`` through ``write(tmp_path)`` and rename it into place."""
        path = self.root / name
        tmp = path.with_name(path.name + ".part")
        write(tmp)
        tmp.replace(path)
        return path

    def write_text(self, name: str, text: str) -> Path:
        return self.write_atomic(name, lambda p: p.write_text(text, encoding="utf-8"))


def _shard_digest(group: int, block: int, sums: np.ndarray, counts: np.ndarray) -> str:
    """SHA-256 of a shard's place in the sweep and of its arrays (shape, dtype, bytes)."""
    h = hashlib.sha256(f"g{group}:b{block}".encode())
    for array in (sums, counts):
        h.update(f"{array.dtype.str}{array.shape}".encode())
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def _scored_part(config: AttributeConfig) -> AttributeConfig:
    """``config`` with the options that only choose where the sweep runs at their defaults.

    The device stays: a sweep on another device may round differently.
    """
    where = ExecutionConfig(device=config.execution.device)
    return dataclasses.replace(config, execution=where)
