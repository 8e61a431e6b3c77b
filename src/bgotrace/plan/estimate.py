"""The memory plan of one attribution config: its stages, peaks and what the device has.

Reads the model's ``config.json`` only (:mod:`bgotrace.plan.shape`) and never the corpus:
the unit length is ``--max-length`` or the default for the model's context, and the token
count comes from the cache manifest when ``--cache-dir`` already holds one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bgotrace.config import AttributeConfig
from bgotrace.devices import DTYPES, device_memory_bytes, host_memory_bytes
from bgotrace.errors import ConfigError
from bgotrace.modeling.loading import inject_adapter_layers
from bgotrace.perturb.steps import ASCENT, DESCENT
from bgotrace.plan.memory import RUNTIME_BYTES, RunShape, Stage, stages
from bgotrace.plan.shape import MetaModel, ModelShape, read_config
from bgotrace.variants import get_variant


@dataclass
class Plan:
    """Estimated peaks of a run, and the memory it must fit in."""

    model: ModelShape
    run: RunShape
    stages: list[Stage]
    device: str
    """cpu | cuda (what ``--device`` resolves to, or would on a machine with a GPU)."""
    device_memory: int
    """Bytes the run must fit in: the GPU's (or ``--device-memory``), the host's on CPU."""

    @property
    def peak_device_bytes(self) -> int:
        return max(s.device_bytes for s in self.stages)

    @property
    def cache_pages_bytes(self) -> int:
        """The token cache's pages a sweep reads through (its tokens, 4 bytes each)."""
        return 4 * (self.run.corpus_tokens or 0)

    @property
    def peak_host_bytes(self) -> int:
        """Runtime + token cache pages + the largest stage (device stages too on CPU)."""
        on_cpu = self.device == "cpu"
        on_host = [s.host_bytes + (s.device_bytes if on_cpu else 0) for s in self.stages]
        return RUNTIME_BYTES + self.cache_pages_bytes + max(on_host)

    @property
    def needed_bytes(self) -> int:
        """What must fit in :attr:`device_memory`."""
        return self.peak_host_bytes if self.device == "cpu" else self.peak_device_bytes

    @property
    def fits(self) -> bool:
        return self.needed_bytes <= self.device_memory

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "device_memory_bytes": self.device_memory,
            "peak_device_bytes": self.peak_device_bytes,
            "peak_host_bytes": self.peak_host_bytes,
            "fits": self.fits,
            "parameters": self.model.n_params,
            "selected_parameters": self.model.n_selected,
            "stages": [s.to_dict() for s in self.stages],
            "times": "ESTIMATED from FLOPs at assumed throughputs (bgotrace.plan.memory)",
        }


def device_type(name: str) -> str:
    """cpu | cuda for ``--device`` (``auto`` is cuda where a GPU is present)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if name.startswith("cuda") else "cpu"


def _memory_of(kind: str, device: str) -> int:
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"--device {device} has no GPU here to measure: pass --device-memory SIZE "
                "(e.g. 80GiB) to plan for one."
            )
        return device_memory_bytes(torch.device(device if device != "auto" else "cuda"))
    return host_memory_bytes()


def _corpus_tokens(config: AttributeConfig) -> int | None:
    """Tokens of an existing token cache named by ``--cache-dir`` (None: unknown)."""
    if config.corpus.cache_dir is None:
        return None
    manifest = Path(config.corpus.cache_dir) / "manifest.json"
    try:
        return int(json.loads(manifest.read_text(encoding="utf-8"))["n_tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def sweep_dtype(config: AttributeConfig) -> str:
    """The dtype the sweep runs in: ``--dtype``, or with ``auto`` the model's own."""
    return config.model.dtype if config.scoring.dtype == "auto" else config.scoring.dtype


def batch_units(config: AttributeConfig, unit_length: int) -> int:
    """Units per batch of ``unit_length``-token units: ``--batch-size``, or as many as
    ``--batch-tokens`` holds (one at least; shorter units make larger batches of no more
    padded tokens, and less attention, so the full-length batch is the peak)."""
    tokens = config.scoring.batch_tokens
    return max(1, tokens // unit_length) if tokens else config.scoring.batch_size


def run_shape(
    config: AttributeConfig, model: ModelShape, n_queries: int | None, device: str
) -> RunShape:
    """The options of ``config`` the plan depends on; Q is at most the number of queries."""
    states = sum(d in get_variant(config.scoring.score).states for d in (ASCENT, DESCENT))
    per_sweep = config.scoring.queries_per_sweep
    length = config.corpus.unit_length(model.context)
    return RunShape(
        model_bytes=DTYPES[config.model.dtype].itemsize,
        sweep_bytes=DTYPES[sweep_dtype(config)].itemsize,
        optimizer=config.perturb.optimizer,
        queries_per_sweep=min(per_sweep, n_queries) if n_queries else per_sweep,
        states_per_query=max(states, 1),
        batch_size=batch_units(config, length),
        unit_length=length,
        normalize=config.scoring.normalize != "none",
        device_type=device,
        corpus_tokens=_corpus_tokens(config),
        autocast=config.scoring.autocast,
    )


def meta_model(config: AttributeConfig) -> MetaModel:
    """The run's model on the meta device, from its ``config.json`` alone."""
    trust = config.model.trust_remote_code
    meta = MetaModel(read_config(config.model.path, trust), trust)
    if config.perturb.params == "adapter" and config.model.adapter is not None:
        inject_adapter_layers(meta.module, config.model.adapter)  # states are adapter-sized
        meta.sizes = {n: p.numel() for n, p in meta.module.named_parameters()}
    return meta


def plan_run(
    config: AttributeConfig,
    *,
    n_queries: int | None = None,
    device_memory: int | None = None,
    meta: MetaModel | None = None,
) -> Plan:
    """The plan of ``config`` (``meta``: its model on the meta device, when already built)."""
    meta = meta or meta_model(config)
    shape = meta.shape(config.perturb.params)
    name = config.execution.device
    kind = device_type(name)
    memory = device_memory if device_memory is not None else _memory_of(kind, name)
    run = run_shape(config, shape, n_queries, kind)
    return Plan(shape, run, stages(shape, run), kind, memory)
