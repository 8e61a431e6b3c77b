"""Sweep blocks on a Ray cluster: one actor per worker, each with the sweep model.

Each actor receives the base model once through Ray's object store, and reads blocks
either from the token cache by path (a shared file system) or from block slices the
driver ships through the object store (:mod:`bgotrace.dist.units`). Per query group the
perturbed states are put in the object store once and every block task refers to them,
so only block indices (or slices) and per-unit loss sums travel. Blocks come back as
they finish; the engine writes each as a resume point. Dead workers are survived by
:mod:`bgotrace.dist.scheduler`.

On one machine: ``--workers N`` starts a private Ray instance and stops it at the end.
On a cluster: ``ray start --head`` (and ``ray start --address HEAD:PORT`` on the other
nodes), then ``--ray-address auto`` (on a node) or ``--ray-address HEAD:PORT``; the
cluster keeps running after the sweep.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bgotrace.config import ScoreConfig
from bgotrace.dist.scheduler import BlockScheduler, Slot
from bgotrace.dist.session import RaySession, import_ray, placement_error
from bgotrace.dist.units import UnitSlice
from bgotrace.dist.worker import SweepWorker, WorkerSetup
from bgotrace.errors import DistributedError
from bgotrace.score.batching import TokenSource
from bgotrace.score.executor import Block, BlockResult
from bgotrace.score.sweep import Overrides

log = logging.getLogger(__name__)

MATCHED_MANIFEST_KEYS = ("corpus_fingerprint", "tokenizer_fingerprint", "n_units", "n_tokens")
"""A worker uses the cache at the driver's path only if these manifest keys match."""


@dataclass(frozen=True)
class RayOptions:
    """The Ray side of a sweep (from :class:`ScoreConfig`, resolved for the device)."""

    workers: int
    address: str | None
    cpus_per_worker: float
    gpus_per_worker: float
    ship_cache: str
    block_attempts: int
    timeout: float
    batch_size: int
    pad_id: int

    @classmethod
    def of(cls, cfg: ScoreConfig, pad_id: int, device: torch.device) -> RayOptions:
        gpus = cfg.gpus_per_worker
        if gpus is None:  # a GPU model sweeps on GPU workers unless told otherwise
            gpus = 1.0 if device.type == "cuda" else 0.0
        return cls(
            workers=cfg.workers, address=cfg.ray_address, cpus_per_worker=cfg.cpus_per_worker,
            gpus_per_worker=gpus, ship_cache=cfg.ship_cache, block_attempts=cfg.block_attempts,
            timeout=cfg.ray_timeout, batch_size=cfg.batch_size, pad_id=pad_id,
        )  # fmt: skip

    @property
    def per_worker(self) -> dict[str, float]:
        return {"CPU": self.cpus_per_worker, "GPU": self.gpus_per_worker}


class RayExecutor:
    """Spreads blocks over Ray actors; survives their deaths; cleans up what it started."""

    def __init__(
        self,
        model: torch.nn.Module,
        units: TokenSource,
        options: RayOptions,
        *,
        cache_root: Path | None,
        manifest: dict[str, Any],
    ) -> None:
        self.units, self.options = units, options
        self.session = RaySession.open(
            options.address,
            n_cpus=options.workers * options.cpus_per_worker,
            n_gpus=options.workers * options.gpus_per_worker,
        )
        self.slots: list[Slot] = []
        try:
            self._start_workers(model, cache_root, manifest)
        except BaseException:
            self.close()
            raise
        self.last_run: BlockScheduler | None = None

    def _start_workers(
        self, model: torch.nn.Module, cache_root: Path | None, manifest: dict[str, Any]
    ) -> None:
        ray, o = import_ray(), self.options
        setup = WorkerSetup(
            cache_root=None if cache_root is None else str(cache_root),
            expected_manifest={k: manifest.get(k) for k in MATCHED_MANIFEST_KEYS},
            try_path=o.ship_cache != "always",
            batch_size=o.batch_size,
            pad_id=o.pad_id,
            device="cuda" if o.gpus_per_worker > 0 else "cpu",
        )
        actor = ray.remote(SweepWorker).options(
            num_cpus=o.cpus_per_worker, num_gpus=o.gpus_per_worker,
            max_restarts=o.block_attempts, max_task_retries=0,
        )  # fmt: skip
        if next(model.parameters()).device.type != "cpu":
            model = copy.deepcopy(model).cpu()  # never move the caller's model
        self.model_ref = ray.put(model)  # kept alive: a restarted actor needs it again
        self.slots = [Slot(i, actor.remote(self.model_ref, setup)) for i in range(o.workers)]
        self._await_ready()

    def _await_ready(self) -> None:
        ray, o = import_ray(), self.options
        probes = {s.actor.ready.remote(): s for s in self.slots}
        done, _ = ray.wait(list(probes), num_returns=len(probes), timeout=o.timeout)
        if len(done) < len(probes):
            raise placement_error(self.session, len(done), len(probes), o.per_worker, o.timeout)
        for ref in done:
            slot = probes[ref]
            try:
                info = ray.get(ref)
            except ray.exceptions.RayError as err:
                raise DistributedError(
                    f"Ray worker {slot.index} failed to start ({type(err).__name__}: "
                    f"{str(err).splitlines()[0][:300]}): check that bgotrace and its "
                    "dependencies are installed on every node."
                ) from err
            slot.update(info)
            self._check_cache_access(slot, info)
            log.info(
                "ray worker %d on node %s (pid %d), cache %s",
                slot.index, slot.node[:8], slot.pid,
                "by path" if slot.reads_cache else "shipped",
                extra={"worker_pid": slot.pid, "worker_node": slot.node},
            )  # fmt: skip

    def _check_cache_access(self, slot: Slot, info: dict[str, Any]) -> None:
        if self.options.ship_cache == "never" and not slot.reads_cache:
            raise DistributedError(
                f"--ship-cache never, but Ray worker {slot.index} cannot use the token cache: "
                f"{info['why_not']}; put --cache-dir on a file system every node mounts, or "
                "use --ship-cache auto."
            )

    def run(self, blocks: Sequence[Block], states: Sequence[Overrides]) -> Iterator[BlockResult]:
        ray = import_ray()
        cpu_states = [None if s is None else {k: v.cpu() for k, v in s.items()} for s in states]
        states_ref = ray.put(cpu_states)
        shipped: dict[int, Any] = {}

        def payload(block: Block, slot: Slot) -> Any:
            if slot.reads_cache:
                return None
            if block.index not in shipped:  # put once, reused if the block is retried
                shipped[block.index] = ray.put(UnitSlice.of_block(self.units, block))
            return shipped[block.index]

        o = self.options
        scheduler = BlockScheduler(
            self.slots, attempts=o.block_attempts, restarts=o.block_attempts,
            timeout=o.timeout, payload=payload,
        )  # fmt: skip
        self.last_run = scheduler
        for result in scheduler.run(blocks, states_ref):
            shipped.pop(result[0].index, None)  # frees the slice in the object store
            yield result
        log.info(
            "ray sweep: %d blocks on %d nodes, %d worker deaths survived",
            sum(scheduler.nodes.values()), len(scheduler.nodes), scheduler.failures,
            extra={"blocks_per_node": dict(scheduler.nodes), "worker_deaths": scheduler.failures},
        )  # fmt: skip

    def close(self) -> None:
        """Stop the workers this run started; stop or leave Ray as the session says."""
        if self.slots:
            ray = import_ray()
            for slot in self.slots:
                try:
                    ray.kill(slot.actor, no_restart=True)
                except ray.exceptions.RayError:  # already gone
                    pass
            self.slots = []
        self.session.close()

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
