"""``bench build`` and ``bench run``: a benchmark with its trained base model, then the tables.

CPU, seconds (test sizes)::

    bgotrace bench build --out bench/quick --quick
    bgotrace bench run --bench bench/quick --out runs/quick --methods bm25,bgo,random --quick

The shipped benchmark (Debian texts; trains the ``small`` preset, minutes on 2 cores)::

    bgotrace bench build --out bench/default
    bgotrace bench run --bench bench/default --out runs/bench

**Fact upsampling.** Planted facts are a sliver of the corpus, and a small model would not
memorise them in a few epochs. ``bench build`` therefore trains on the benchmark documents
followed by ``fact_repeats - 1`` extra copies of every fact document (ids ``<id>~rep<j>``,
see :mod:`bgotrace.eval.retrain`), so each fact document is seen ``fact_repeats`` times
per epoch. The factor is written to ``bench_training.json`` in the model directory; the
evaluation ranks the benchmark's own units, each standing for all of its copies.

**Caching.** ``bench build`` reuses a benchmark whose manifest holds the same config and a
model whose ``bench_training.json`` records the same benchmark, training config and
factor; anything else that exists is refused unless ``overwrite``. Retrains of leave-k-out
and LDS are cached under ``<bench>/retrains``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bgotrace.bench.build import BenchConfig, Benchmark, build_benchmark, load_benchmark
from bgotrace.corpus import documents_from_records
from bgotrace.errors import InputError, RunDirectoryError
from bgotrace.eval.retrain import TRAINING_RECORD, upsample_documents
from bgotrace.eval.runner import EvalOptions, EvalResult, run_eval
from bgotrace.train import TrainConfig, train_model

log = logging.getLogger(__name__)

DEFAULT_FACT_REPEATS = 8
"""Times each fact document is seen per epoch by the base model."""
MODEL_DIRNAME = "model"
"""Default location of the base model inside the benchmark directory."""

QUICK_TRAIN = {"preset": "test", "epochs": 1}
"""``--quick`` training: the test preset, one epoch (plumbing, not memorisation)."""
QUICK_EVAL: dict[str, Any] = {
    "max_queries": 6,
    "tail_patch": {"ks": (1, 2)},
    "leave_k_out": {"k": 2, "max_queries": 1},
    "lds": {"n_subsets": 3},
}
"""``--quick`` evaluation sizes: a few queries and retrains (seconds with the test preset)."""
QUICK_SEEDS = (0, 1)


@dataclass(frozen=True)
class BuildResult:
    """Where ``build_bench`` put things and what it had to (re)do."""

    bench_dir: Path
    model_dir: Path
    built_benchmark: bool
    trained_model: bool


def _json_roundtrip(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _existing_benchmark(out: Path, config: BenchConfig, overwrite: bool) -> Benchmark | None:
    """The benchmark in ``out`` if it was built with ``config``; None if it must be built."""
    if not out.exists():
        return None
    try:
        bench = load_benchmark(out)
    except InputError:
        if overwrite:
            return None
        raise
    if bench.manifest.get("config") == _json_roundtrip(config.to_dict()):
        return bench
    if not overwrite:
        raise RunDirectoryError(
            f"Benchmark {out} was built with another config: use --overwrite to rebuild it "
            "(its models and retrains are deleted) or choose another --out."
        )
    return None


def _training_record(bench: Benchmark, config: TrainConfig, repeats: int) -> dict[str, Any]:
    return _json_roundtrip(
        {"benchmark_sha256": bench.manifest["content_sha256"], "fact_repeats": repeats,
         "train_config": dataclasses.asdict(config)}
    )  # fmt: skip


def _model_is_current(model_dir: Path, record: dict[str, Any], overwrite: bool) -> bool:
    """True if ``model_dir`` holds the model ``record`` describes; refuses other models."""
    path = model_dir / TRAINING_RECORD
    if not model_dir.exists():
        return False
    if path.is_file() and json.loads(path.read_text(encoding="utf-8")) == record:
        return True
    if not overwrite:
        raise RunDirectoryError(
            f"Model directory {model_dir} holds another model (other benchmark, training "
            "config or fact_repeats): use --overwrite or another --model-out."
        )
    return False


def train_base_model(
    bench: Benchmark,
    config: TrainConfig,
    model_dir: Path,
    *,
    fact_repeats: int = DEFAULT_FACT_REPEATS,
    progress: bool = True,
) -> Path:
    """Train the benchmark's base model (facts upsampled) and record how, atomically."""
    documents = upsample_documents(documents_from_records(bench.documents), fact_repeats)
    tmp = model_dir.with_name(f".{model_dir.name}.training-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    train_model(documents, config, tmp, progress=progress, overwrite=True)
    record = _training_record(bench, config, fact_repeats)
    (tmp / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if model_dir.exists():
        shutil.rmtree(model_dir)
    tmp.rename(model_dir)
    return model_dir


def build_bench(
    out_dir: str | Path,
    bench_config: BenchConfig,
    train_config: TrainConfig,
    *,
    fact_repeats: int = DEFAULT_FACT_REPEATS,
    model_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> BuildResult:
    """Build the benchmark into ``out_dir`` and train its base model (both cached).

    The model goes to ``model_dir`` (default ``<out_dir>/model``), trained with
    ``train_config`` (its seed fixes initialisation and data order) on the benchmark corpus
    with fact documents repeated ``fact_repeats`` times.
    """
    out = Path(out_dir)
    if fact_repeats < 1:
        raise InputError(f"fact_repeats must be at least 1, got {fact_repeats}.")
    bench = _existing_benchmark(out, bench_config, overwrite)
    built = bench is None
    if bench is None:
        build_benchmark(bench_config, out, overwrite=True)
        bench = load_benchmark(out)
    target = Path(model_dir) if model_dir is not None else out / MODEL_DIRNAME
    record = _training_record(bench, train_config, fact_repeats)
    trained = not _model_is_current(target, record, overwrite)
    if trained:
        train_base_model(bench, train_config, target, fact_repeats=fact_repeats, progress=progress)
    log.info("benchmark %s (%s), model %s (%s)", out, "built" if built else "cached", target,
             "trained" if trained else "cached")  # fmt: skip
    return BuildResult(out, target, built, trained)


def run_bench(
    bench_dir: str | Path,
    out: str | Path,
    *,
    model_dir: str | Path | None = None,
    methods: Sequence[str] = ("all",),
    metrics: Sequence[str] = ("all",),
    split: str = "test",
    seeds: Sequence[int] = (0, 1, 2),
    options: EvalOptions | Mapping[str, Any] | None = None,
    overwrite: bool = False,
    command: str | None = None,
) -> EvalResult:
    """Run every method × metric on a built benchmark; tables and plot go to ``out``."""
    bench_dir = Path(bench_dir)
    model = Path(model_dir) if model_dir is not None else bench_dir / MODEL_DIRNAME
    if not model.is_dir():
        raise InputError(
            f"No model at {model}: run `bgotrace bench build --out {bench_dir}` first, "
            "or pass --model."
        )
    return run_eval(
        bench_dir, model, methods, metrics, split=split, seeds=seeds, out=out,
        options=options, overwrite=overwrite, command=command,
    )  # fmt: skip


def quick_options(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``--quick`` evaluation options with ``overrides`` (sections merged key by key)."""
    merged: dict[str, Any] = {
        k: dict(v) if isinstance(v, dict) else v for k, v in QUICK_EVAL.items()
    }
    for key, value in (overrides or {}).items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged
