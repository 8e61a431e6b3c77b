"""Sweep blocks on a Ray cluster: one actor per worker, each with the model and the cache.

Each actor receives the base model once (through Ray's object store) and opens the
token cache from its directory, which must be readable at the same path on every
node (a shared file system). Per query group, the perturbed states are put in the
object store once and every block task refers to them, so only block indices and
per-unit loss sums travel. Blocks come back as they finish; the engine writes each
as a resume point, so a lost worker costs only its unfinished blocks.

On one machine: ``ray.init(num_cpus=N)``; on a cluster: ``ray start --head`` and
``ray.init(address="auto")`` before calling bgotrace.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from bgotrace.errors import ConfigError
from bgotrace.score.executor import Block, BlockResult, compute_block
from bgotrace.score.sweep import Overrides

log = logging.getLogger(__name__)


class _SweepWorker:
    """Holds one copy of the model and the token cache; computes blocks on request."""

    def __init__(
        self, model: torch.nn.Module, cache_root: str, batch_size: int, pad_id: int, gpu: bool
    ) -> None:
        from bgotrace.cache import TokenCache

        torch.set_num_threads(1)  # one thread per actor; Ray schedules actors on cores
        self.device = torch.device("cuda" if gpu else "cpu")
        self.model = model.to(self.device).eval()
        self.units = TokenCache(Path(cache_root))
        self.batch_size = batch_size
        self.pad_id = pad_id

    def run_block(self, block: Block, states: Sequence[Overrides]) -> BlockResult:
        states = [None if s is None else {k: v.to(self.device) for k, v in s.items()}
                  for s in states]
        return compute_block(
            self.model, self.units, block, states,
            batch_size=self.batch_size, pad_id=self.pad_id, device=self.device,
        )  # fmt: skip


def _ray() -> Any:
    try:
        import ray
    except ImportError as err:
        raise ConfigError(
            "Distributed sweeps need Ray: pip install 'bgotrace[dist]', or drop --workers."
        ) from err
    return ray


class RayExecutor:
    """Spreads blocks over ``n_workers`` Ray actors (starting Ray locally if needed)."""

    def __init__(
        self,
        model: torch.nn.Module,
        cache_root: Path,
        *,
        n_workers: int,
        batch_size: int,
        pad_id: int,
        cpus_per_worker: float = 1.0,
        gpus_per_worker: float = 0.0,
    ) -> None:
        ray = _ray()
        if not ray.is_initialized():
            ray.init(num_cpus=max(n_workers, 1), include_dashboard=False, log_to_driver=False)
        actor = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)(_SweepWorker)
        if next(model.parameters()).device.type != "cpu":
            model = copy.deepcopy(model).cpu()  # never move the caller's model
        model_ref = ray.put(model)
        gpu = gpus_per_worker > 0
        self.workers = [
            actor.remote(model_ref, str(cache_root), batch_size, pad_id, gpu)
            for _ in range(n_workers)
        ]
        log.info("ray sweep on %d workers", n_workers)

    def run(self, blocks: Sequence[Block], states: Sequence[Overrides]) -> Iterator[BlockResult]:
        from ray.util import ActorPool

        ray = _ray()
        cpu_states = [None if s is None else {k: v.cpu() for k, v in s.items()} for s in states]
        states_ref = ray.put(cpu_states)
        pool = ActorPool(self.workers)
        submit = lambda w, b: w.run_block.remote(b, states_ref)  # noqa: E731
        yield from pool.map_unordered(submit, list(blocks))  # type: ignore[arg-type]
