"""Rank order of scores: best first, ties broken by a seeded permutation, NaN last.

Shared by the ranked outputs, the prefilter's candidate choice and the evaluation metrics,
so every consumer orders tied scores the same way.
"""

from __future__ import annotations

import zlib

import numpy as np


def tie_seed(query_id: str, seed: int = 0) -> list[int]:
    """Seed of the tie-breaking permutation: stable across runs and query batching."""
    return [seed, zlib.crc32(query_id.encode("utf-8"))]


def rank_order(scores: np.ndarray, query_id: str, seed: int = 0) -> np.ndarray:
    """Indices of ``scores`` (n,) best first; ties in random (seeded) order, NaN last."""
    perm = np.random.default_rng(tie_seed(query_id, seed)).permutation(scores.shape[0])
    keyed = np.where(np.isnan(scores[perm]), -np.inf, scores[perm])
    return perm[np.argsort(-keyed, kind="stable")]
