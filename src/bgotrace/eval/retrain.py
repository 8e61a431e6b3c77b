"""Retraining a benchmark model without some units: its training corpus, and a disk cache.

**Training corpus.** A model built by ``bgotrace bench build`` was trained on the benchmark
documents with every planted-fact document (source ``facts``) repeated ``fact_repeats``
times, so that the small model memorises the facts: the copies are the same text under the
ids ``<id>~rep<j>`` (j = 1 … R−1), appended after the benchmark documents. The number R is
recorded in ``bench_training.json`` in the model directory; a model trained on the
benchmark's ``corpus.jsonl`` by ``bgotrace train`` has no record and R = 1. Either way the
result must match the ``corpus_fingerprint`` in the model's ``train_config.json``.

**Units.** Attribution ranks the benchmark's own units ``<doc>#<k>`` (the token cache built
from the benchmark documents). A ranked unit stands for all its copies
``<doc>~rep<j>#<k>``: removing a unit from training removes every copy.

**Cache.** Retrained models live under ``<benchmark>/retrains/<setup key>/<set>-s<seed>/``
where the setup key hashes everything that fixes a training run except the seed (config,
chunking, tokenizer, training corpus) and ``<set>`` hashes the sorted ids of the removed
units (``full`` when none is removed). Each keeps its weights (the optimiser state is
deleted: no retrain needs it) and a ``query_losses.json`` of the query losses measured on it,
so a rerun trains and evaluates nothing it has done before.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from bgotrace.cache.fingerprint import canonical_json, sha256_text, tokenizer_fingerprint
from bgotrace.corpus import ChunkingConfig, Document, corpus_fingerprint, documents_from_records
from bgotrace.errors import InputError
from bgotrace.eval.benchmark import Benchmark
from bgotrace.modeling.loading import load_model_and_tokenizer
from bgotrace.modeling.losses import forward_logits, mean_loss
from bgotrace.query import EncodedQuery
from bgotrace.train import TrainConfig, train_model

log = logging.getLogger(__name__)

TRAINING_RECORD = "bench_training.json"
"""File in a model directory saying how ``bench build`` upsampled the fact documents."""
FACT_SOURCE = "facts"
COPY_MARK = "~rep"
_SETUP_IGNORED = ("seed", "log_every")  # TrainConfig fields that do not change the recipe


def upsample_documents(documents: Sequence[Document], repeats: int) -> list[Document]:
    """The documents, then ``repeats - 1`` copies of each fact document (ids ``<id>~rep<j>``)."""
    if repeats < 1:
        raise InputError(f"fact_repeats must be at least 1, got {repeats}.")
    facts = [d for d in documents if d.source == FACT_SOURCE]
    copies = [
        dataclasses.replace(d, doc_id=f"{d.doc_id}{COPY_MARK}{j}")
        for j in range(1, repeats)
        for d in facts
    ]
    return [*documents, *copies]


def training_unit_ids(unit_id: str, source: str, repeats: int) -> list[str]:
    """The training units a ranked unit ``<doc>#<k>`` stands for (itself and its copies)."""
    if source != FACT_SOURCE or repeats == 1:
        return [unit_id]
    doc, _, k = unit_id.rpartition("#")
    return [unit_id, *(f"{doc}{COPY_MARK}{j}#{k}" for j in range(1, repeats))]


@dataclass(frozen=True)
class TrainingSetup:
    """How a model was trained, read back from its directory: enough to retrain it."""

    model_dir: Path
    config: TrainConfig
    """The recorded training config (device possibly overridden for retrains)."""
    chunking: ChunkingConfig
    """Chunking of the training units; the token cache must use the same."""
    fact_repeats: int
    """Times each fact document occurs in the training corpus (1 = not upsampled)."""
    documents: list[Document]
    """The exact training corpus (benchmark documents plus fact copies)."""
    replays_base: bool = True
    """Whether a retrain with the recorded seed and no removal reproduces the base model
    (False when the retrain device differs from the recorded one)."""


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _train_config(summary: dict[str, Any], model_dir: Path, device: str | None) -> TrainConfig:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in summary.get("config", {}).items() if k in known}
    if device is not None:
        values["device"] = device
    try:
        return TrainConfig(**values)
    except TypeError as err:
        raise InputError(
            f"{model_dir}/train_config.json has no usable training config ({err}): "
            "retrain the model with `bgotrace bench build` or `bgotrace train`."
        ) from err


def read_training_setup(
    model_dir: str | Path, bench: Benchmark, *, device: str | None = None
) -> TrainingSetup:
    """Read how ``model_dir`` was trained and check it was trained on ``bench``'s corpus."""
    model_dir = Path(model_dir)
    path = model_dir / "train_config.json"
    if not path.is_file():
        raise InputError(
            f"{model_dir} has no train_config.json, so its training data is unknown: evaluate "
            "a model trained by `bgotrace bench build` or `bgotrace train` on the benchmark."
        )
    summary = _read_json(path)
    record_path = model_dir / TRAINING_RECORD
    repeats = int(_read_json(record_path)["fact_repeats"]) if record_path.is_file() else 1
    documents = upsample_documents(documents_from_records(bench.documents), repeats)
    if corpus_fingerprint(documents) != summary.get("corpus_fingerprint"):
        raise InputError(
            f"Model {model_dir} was not trained on the corpus of benchmark {bench.root} "
            f"(fact_repeats={repeats}): evaluate the model that `bgotrace bench build` "
            "trained for this benchmark, or train one on its corpus.jsonl."
        )
    chunking = ChunkingConfig(**summary["chunking"])
    config = _train_config(summary, model_dir, device)
    same_device = device is None or device == summary.get("config", {}).get("device")
    return TrainingSetup(model_dir, config, chunking, repeats, documents, same_device)


def query_key(query: EncodedQuery) -> str:
    """Cache key of a query's loss: its token ids and loss mask, not its name."""
    ids = query.input_ids[0].tolist()
    mask = (query.labels[0] != -100).tolist()
    return sha256_text(canonical_json([ids, mask]))[:24]


@torch.no_grad()
def query_losses(model: torch.nn.Module, queries: Sequence[EncodedQuery]) -> np.ndarray:
    """Mean NLL (nats per loss token) of each query under ``model``, shape (q,)."""
    device = next(model.parameters()).device
    out = []
    for q in queries:
        logits = forward_logits(model, q.input_ids.to(device))  # (1, T, V)
        out.append(float(mean_loss(logits, q.labels.to(device))))
    return np.asarray(out, dtype=np.float64)


class RetrainCache:
    """Models retrained without some ranked units, trained on demand and kept on disk.

    ``unit_ids`` and ``unit_sources`` describe the ranked units (token cache order); removed
    sets are given as indices into them. ``trained`` counts the retrains this object ran.
    """

    def __init__(
        self,
        root: str | Path,
        setup: TrainingSetup,
        tokenizer: PreTrainedTokenizerBase,
        unit_ids: Sequence[str],
        unit_sources: Sequence[str],
        *,
        progress: bool = False,
    ) -> None:
        self.setup = setup
        self.tokenizer = tokenizer
        self.unit_ids = np.asarray(unit_ids, dtype=object)
        self.unit_sources = np.asarray(unit_sources, dtype=object)
        self.progress = progress
        self.root = Path(root) / self.setup_key()
        self.trained = 0
        self._memory: dict[tuple[str, int], dict[str, float]] = {}

    def setup_key(self) -> str:
        """Hash of the training recipe without its seed (see the module docstring)."""
        config = dataclasses.asdict(self.setup.config)
        recipe = {k: v for k, v in config.items() if k not in _SETUP_IGNORED}
        parts = [recipe, dataclasses.asdict(self.setup.chunking), self.setup.fact_repeats]
        parts += [corpus_fingerprint(self.setup.documents), tokenizer_fingerprint(self.tokenizer)]
        return sha256_text(canonical_json(parts))[:16]

    def set_key(self, removed: Sequence[int] | np.ndarray) -> str:
        """``full`` or the hash of the sorted ids of the removed units."""
        ids = sorted(str(u) for u in self.unit_ids[np.asarray(removed, dtype=np.int64)])
        return sha256_text(*ids)[:16] if ids else "full"

    def is_base(self, removed: Sequence[int] | np.ndarray, seed: int) -> bool:
        """True when the retrain would reproduce the base model bit for bit (no removal,
        same seed and recipe): the base model is then used instead."""
        setup = self.setup
        return setup.replays_base and len(removed) == 0 and seed == setup.config.seed

    def model_dir(self, removed: Sequence[int] | np.ndarray, seed: int) -> Path:
        """Directory of the model retrained with seed ``seed`` without ``removed``."""
        if self.is_base(removed, seed):
            return self.setup.model_dir
        out = self.root / f"{self.set_key(removed)}-s{seed}"
        if not (out / "train_config.json").is_file():
            self._train(removed, seed, out)
        return out

    def _kept_unit_ids(self, removed: Sequence[int] | np.ndarray) -> list[str]:
        keep = np.ones(len(self.unit_ids), dtype=bool)
        keep[np.asarray(removed, dtype=np.int64)] = False
        repeats = self.setup.fact_repeats
        return [
            tid
            for uid, src in zip(self.unit_ids[keep], self.unit_sources[keep], strict=True)
            for tid in training_unit_ids(str(uid), str(src), repeats)
        ]

    def _train(self, removed: Sequence[int] | np.ndarray, seed: int, out: Path) -> None:
        config = dataclasses.replace(self.setup.config, seed=seed)
        log.info("retraining seed %d without %d units -> %s", seed, len(removed), out)
        out.parent.mkdir(parents=True, exist_ok=True)
        keep = self._kept_unit_ids(removed)
        train_model(
            self.setup.documents, config, out, tokenizer=self.tokenizer, keep=keep,
            progress=self.progress, overwrite=True,
        )  # fmt: skip
        (out / "optimizer_state.safetensors").unlink(missing_ok=True)
        self.trained += 1

    def query_losses(
        self, removed: Sequence[int] | np.ndarray, seed: int, queries: Sequence[EncodedQuery]
    ) -> np.ndarray:
        """Query losses (q,) in nats per loss token of the retrained model (cached)."""
        keys = [query_key(q) for q in queries]
        path = self.model_dir(removed, seed)
        known = self._load_losses(path, removed, seed)
        missing = [i for i, k in enumerate(keys) if k not in known]
        if missing:
            model, _ = load_model_and_tokenizer(path, device=self.setup.config.device)
            values = query_losses(model, [queries[i] for i in missing])
            known.update({keys[i]: float(v) for i, v in zip(missing, values, strict=True)})
            self._store_losses(path, removed, seed, known)
        return np.asarray([known[k] for k in keys], dtype=np.float64)

    def _load_losses(
        self, path: Path, removed: Sequence[int] | np.ndarray, seed: int
    ) -> dict[str, float]:
        if self.is_base(removed, seed):
            return self._memory.setdefault(("base", seed), {})
        file = path / "query_losses.json"
        return _read_json(file) if file.is_file() else {}

    def _store_losses(
        self, path: Path, removed: Sequence[int] | np.ndarray, seed: int, known: dict[str, float]
    ) -> None:
        if self.is_base(removed, seed):
            return  # kept in memory: never write into the user's model directory
        tmp = path / f".query_losses.json.{os.getpid()}"
        tmp.write_text(json.dumps(known, sort_keys=True), encoding="utf-8")
        tmp.replace(path / "query_losses.json")
