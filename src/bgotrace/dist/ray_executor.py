"""Sweep blocks on a Ray cluster: one actor per worker, each with the sweep model.

Each actor receives the base model once through Ray's object store, and reads blocks
either from the token cache by path (a shared file system) or from block slices the
driver ships through the object store (:mod:`bgotrace.dist.units`). With a trunk cache
(validated or built by the driver) an actor reads the trunk rows by path where its node
can, and computes the trunk otherwise (:mod:`bgotrace.dist.trunk`). Per query group the
perturbed states are put in the object store once and every block task refers to them,
so only block indices (or slices) and per-unit loss sums travel. Blocks come back as
they finish; the engine writes each as a resume point. The normaliser's blocks
(``--normalize``) go to the same workers, each computed with the sweep model it holds.
With ``--candidates`` each rerank group sweeps a subset view of the cache on the same
workers (:meth:`RayExecutor.over`: one executor for the run, never a Ray session per
group). With ``--autocast`` the workers run each block under the driver's
``sweep_autocast``.
Dead workers are survived by :mod:`bgotrace.dist.scheduler`.

On one machine: ``--workers N`` starts a private Ray instance and stops it at the end.
On a cluster: ``ray start --head`` (and ``ray start --address HEAD:PORT`` on the other
nodes), then ``--ray-address auto`` (on a node) or ``--ray-address HEAD:PORT``; the
cluster keeps running after the sweep.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bgotrace.cache import TokenCache
from bgotrace.cache.batching import TokenSource
from bgotrace.cache.trunk_cache import TrunkCache
from bgotrace.config import ExecutionConfig
from bgotrace.dist.scheduler import Slot, Task, TaskScheduler
from bgotrace.dist.session import RaySession, import_ray, placement_error
from bgotrace.dist.trunk import TrunkSource
from bgotrace.dist.units import UnitSlice, corpus_indices
from bgotrace.dist.worker import SweepWorker, WorkerSetup
from bgotrace.errors import DistributedError
from bgotrace.perturb.steps import PerturbedState
from bgotrace.score.context import SweepContext
from bgotrace.score.executor import Block, BlockResult
from bgotrace.score.sweep import Overrides

log = logging.getLogger(__name__)

BLOCKS_IN_FLIGHT = 2
"""Block tasks queued per worker: the next block's arguments arrive while one computes."""

MATCHED_MANIFEST_KEYS = ("corpus_fingerprint", "tokenizer_fingerprint", "n_units", "n_tokens")
"""A worker uses the cache at the driver's path only if these manifest keys match."""


@dataclass(frozen=True)
class RayOptions:
    """The Ray side of a sweep (from :class:`ExecutionConfig`, resolved for the device)."""

    workers: int
    address: str | None
    cpus_per_worker: float
    gpus_per_worker: float
    ship_cache: str
    block_attempts: int
    timeout: float
    batch_size: int
    pad_id: int
    tf32: bool = True
    batch_tokens: int | None = None
    """``--batch-tokens``: padded tokens per batch instead of ``batch_size`` units (None: off)."""
    autocast: bool = False
    """``--autocast``: the workers sweep under bfloat16 autocast, as the driver would."""

    @classmethod
    def of(
        cls,
        cfg: ExecutionConfig,
        batch_size: int,
        pad_id: int,
        device: torch.device,
        batch_tokens: int | None = None,
        autocast: bool = False,
    ) -> RayOptions:
        gpus = cfg.gpus_per_worker
        if gpus is None:  # a GPU model sweeps on GPU workers unless told otherwise
            gpus = 1.0 if device.type == "cuda" else 0.0
        return cls(
            workers=cfg.workers, address=cfg.ray_address, cpus_per_worker=cfg.cpus_per_worker,
            gpus_per_worker=gpus, ship_cache=cfg.ship_cache, block_attempts=cfg.block_attempts,
            timeout=cfg.ray_timeout, batch_size=batch_size, pad_id=pad_id, tf32=cfg.tf32,
            batch_tokens=batch_tokens, autocast=autocast,
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
        perturb_model: torch.nn.Module | None = None,
        trunk: TrunkCache | None = None,
    ) -> None:
        """``perturb_model``: the base model in the perturbation dtype, when ``model`` (the
        sweep dtype) is another one; the workers then hold both. ``trunk``: the driver's
        trunk cache of ``model`` and these units' token cache, for workers that can read it."""
        self.units, self.options, self.trunk = units, options, TrunkSource.of(trunk)
        self.cache = None if cache_root is None else units
        """The units the workers may open by path (the whole cache; None: always shipped)."""
        self.owns_workers = True
        """False for a view (:meth:`over`): closing it stops nothing."""
        self.driver_device = next(model.parameters()).device
        """Where the driver's model is: perturbed states come back there."""
        self.session = RaySession.open(
            options.address,
            n_cpus=options.workers * options.cpus_per_worker,
            driver_gpus=int(self.driver_device.type == "cuda"),
        )
        self.slots: list[Slot] = []
        self._group_numbers = itertools.count(1)
        """Names each sweep group's states for the workers (shared with every view)."""
        try:
            self._start_workers(model, perturb_model, cache_root, manifest)
        except BaseException:
            self.close()
            raise

    def _start_workers(
        self,
        model: torch.nn.Module,
        perturb_model: torch.nn.Module | None,
        cache_root: Path | None,
        manifest: dict[str, Any],
    ) -> None:
        ray, o = import_ray(), self.options
        setup = WorkerSetup(
            cache_root=None if cache_root is None else str(cache_root),
            expected_manifest={k: manifest.get(k) for k in MATCHED_MANIFEST_KEYS},
            try_path=o.ship_cache != "always",
            batch_size=o.batch_size,
            batch_tokens=o.batch_tokens,
            pad_id=o.pad_id,
            device="cuda" if o.gpus_per_worker > 0 else "cpu",
            threads=max(1, int(o.cpus_per_worker)),
            tf32=o.tf32,
            trunk=self.trunk,
            autocast=o.autocast,
        )
        actor = ray.remote(SweepWorker).options(
            num_cpus=o.cpus_per_worker, num_gpus=o.gpus_per_worker,
            max_restarts=o.block_attempts, max_task_retries=0,
        )  # fmt: skip
        # Kept alive: a restarted actor is created from these refs again.
        self.model_refs = [ray.put(_on_cpu(m)) for m in (model, perturb_model)]
        model_ref, perturb_ref = self.model_refs
        self.slots = [
            Slot(i, actor.remote(model_ref, setup, perturb_ref)) for i in range(o.workers)
        ]
        self._await_ready()

    def _await_ready(self) -> None:
        ray, o = import_ray(), self.options
        probes = {s.actor.ready.remote(): s for s in self.slots}
        done, _ = ray.wait(list(probes), num_returns=len(probes), timeout=o.timeout)
        if len(done) < len(probes):
            raise placement_error(self.session, len(done), len(probes), o.per_worker, o.timeout)
        infos: dict[int, dict[str, Any]] = {}
        for ref in done:
            slot = probes[ref]
            try:
                infos[slot.index] = info = ray.get(ref)
            except ray.exceptions.RayError as err:
                raise DistributedError(
                    f"Ray worker {slot.index} failed to start ({type(err).__name__}: "
                    f"{str(err).splitlines()[0][:300]}): check that bgotrace and its "
                    "dependencies are installed on every node."
                ) from err
            slot.update(info)
            self._check_cache_access(slot, info)
            self._log_worker(slot)
        self._log_trunk_access(infos)

    def _log_worker(self, slot: Slot) -> None:
        trunk = "" if self.trunk is None else "by path" if slot.reads_trunk else "computed"
        log.info(
            "ray worker %d on node %s (pid %d), cache %s%s",
            slot.index, slot.node[:8], slot.pid,
            "by path" if slot.reads_cache else "shipped", trunk and f", trunk {trunk}",
            extra={"worker_pid": slot.pid, "worker_node": slot.node, "worker_trunk": trunk},
        )  # fmt: skip

    def _log_trunk_access(self, infos: dict[int, dict[str, Any]]) -> None:
        """One warning for every worker that cannot read the trunk cache (it computes it)."""
        blind = {i: info["trunk_why_not"] for i, info in infos.items() if not info["reads_trunk"]}
        if self.trunk is None or not blind:
            return
        first = min(blind)
        log.warning(
            "--trunk-cache: %d of %d Ray workers cannot read it (worker %d: %s) and compute "
            "the trunk themselves (slower; scores move by the stored dtype's rounding; a trunk "
            "cache is never shipped): put --cache-dir on a file system every node mounts",
            len(blind), len(infos), first, blind[first],
            extra={"trunk_blind_workers": sorted(blind)},
        )  # fmt: skip

    def _check_cache_access(self, slot: Slot, info: dict[str, Any]) -> None:
        if self.options.ship_cache == "never" and not slot.reads_cache:
            raise DistributedError(
                f"--ship-cache never, but Ray worker {slot.index} cannot use the token cache: "
                f"{info['why_not']}; put --cache-dir on a file system every node mounts, or "
                "use --ship-cache auto."
            )

    def over(self, units: TokenSource) -> RayExecutor:
        """These workers sweeping ``units``, a subset view of the cache (a rerank group's
        candidates, ``SubsetUnits``), for that group's sweep. The view shares the workers,
        the session and the group numbering (a worker keeps one group's states at a time);
        only the executor the run made closes them."""
        view = copy.copy(self)
        view.units, view.owns_workers = units, False
        return view

    def run(self, blocks: Sequence[Block], states: Sequence[Overrides]) -> Iterator[BlockResult]:
        ray = import_ray()
        # The group's states go to the object store once; a worker fetches them on its first
        # block of the group and keeps them on its device for the others (the ref travels in
        # a list, so Ray does not fetch and deserialise it again for every block task).
        number = next(self._group_numbers)
        group = (number, [ray.put([None if s is None else _on_cpu_dict(s) for s in states])])
        shipped: dict[int, Any] = {}

        def task(k: int, block: Block) -> Task:
            def submit(slot: Slot) -> Any:
                source = self._block_source(block, slot, shipped)
                return slot.actor.run_block.remote(block, group, source)

            return Task(k, f"block {block.index} (units {block.start}..{block.stop - 1})", submit)

        scheduler = self._scheduler(depth=BLOCKS_IN_FLIGHT)
        for _, result in scheduler.run([task(k, b) for k, b in enumerate(blocks)]):
            shipped.pop(result[0].index, None)  # frees the slice in the object store
            yield result
        self._log_done("blocks", scheduler)

    def _block_source(
        self, block: Block, slot: Slot, shipped: dict[int, Any]
    ) -> UnitSlice | np.ndarray | None:
        """Where ``slot``'s worker reads ``block`` of ``self.units`` (``SweepWorker.
        _block_units``). A worker that opened the cache reads by path: nothing travels for
        the whole cache; for a subset view the block's corpus unit indices do (8 bytes a
        unit, where shipping would copy every token of every candidate block through the
        object store). Other workers get the block's tokens, put once (reused on a retry)."""
        if slot.reads_cache and self.cache is not None:
            if self.units is self.cache:
                return None
            if getattr(self.units, "source", None) is self.cache:  # a SubsetUnits view
                return corpus_indices(self.units, np.arange(block.start, block.stop))
        if block.index not in shipped:
            shipped[block.index] = import_ray().put(UnitSlice.of_block(self.units, block))
        return shipped[block.index]

    def unit_norms(
        self,
        units: TokenSource,
        blocks: Sequence[np.ndarray],
        names: Sequence[str],
        batch_size: int,
        batch_tokens: int | None = None,
    ) -> Iterator[tuple[int, np.ndarray]]:
        """The normaliser's blocks (corpus unit indices of ``units``) on the workers' sweep
        models: (block number, norms) as each finishes (:class:`~bgotrace.perturb.sensitivity.
        NormWorkers`). A worker reads the tokens by path when ``units`` is the cache it opened
        (a view's too: the normaliser's blocks are corpus units), else they are shipped."""
        ray = import_ray()
        shipped: dict[int, Any] = {}

        def task(k: int, block: np.ndarray) -> Task:
            def submit(slot: Slot) -> Any:
                payload = None
                if not (slot.reads_cache and units is self.cache):
                    if k not in shipped:  # put once, reused if the block is retried
                        shipped[k] = ray.put(UnitSlice.of_units(units, block))
                    payload = shipped[k]
                batching = (batch_size, batch_tokens)
                return slot.actor.unit_norms.remote(block, list(names), batching, payload)

            return Task(k, f"normaliser block {k} ({len(block)} units from {block[0]})", submit)

        scheduler = self._scheduler(depth=BLOCKS_IN_FLIGHT)
        for done, norms in scheduler.run([task(k, b) for k, b in enumerate(blocks)]):
            shipped.pop(done.key, None)
            yield done.key, norms
        self._log_done("normaliser_blocks", scheduler)

    def perturb_many(
        self,
        jobs: Sequence[tuple[Any, Any, str]],
        names: Sequence[str],
        *,
        n_units: int,
        fisher: Mapping[str, torch.Tensor] | None,
        advance: Callable[[int], None],
    ) -> list[PerturbedState]:
        """Each (query, config, direction)'s K steps on a worker (see score.perturbation)."""
        ray = import_ray()
        fisher_ref = ray.put(None if fisher is None else _on_cpu_dict(fisher))

        def task(k: int, job: tuple[Any, Any, str]) -> Task:
            query, cfg, direction = job
            query = dataclasses.replace(
                query, input_ids=query.input_ids.cpu(), labels=query.labels.cpu()
            )

            def submit(slot: Slot) -> Any:
                return slot.actor.perturb.remote(
                    (query, cfg, direction), names, n_units, fisher_ref
                )

            return Task(k, f"the {direction} of query {query.query.query_id!r}", submit)

        scheduler = self._scheduler()
        out: dict[int, PerturbedState] = {}
        for done, state in scheduler.run([task(k, j) for k, j in enumerate(jobs)]):
            out[done.key] = on_device(state, self.driver_device)
            advance(1)
        self._log_done("perturbations", scheduler)
        return [out[k] for k in range(len(jobs))]

    def _scheduler(self, depth: int = 1) -> TaskScheduler:
        o = self.options
        return TaskScheduler(
            self.slots, attempts=o.block_attempts, restarts=o.block_attempts, timeout=o.timeout,
            depth=depth,
        )  # fmt: skip

    def _log_done(self, what: str, scheduler: TaskScheduler) -> None:
        nodes, deaths = dict(scheduler.nodes), scheduler.failures
        log.info(
            "ray: %d %s on %d nodes, %d worker deaths survived",
            sum(nodes.values()), what, len(nodes), deaths,
            extra={f"{what}_per_node": nodes, f"{what}_deaths": deaths},
        )  # fmt: skip

    def close(self) -> None:
        """Stop the workers this run started; stop or leave Ray as the session says."""
        if not self.owns_workers:  # a view: the run's executor closes them
            return
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


def _on_cpu(model: torch.nn.Module | None) -> torch.nn.Module | None:
    """A CPU copy of a model on an accelerator (never move the caller's model)."""
    if model is None or next(model.parameters()).device.type == "cpu":
        return model
    return copy.deepcopy(model).cpu()


def ray_executor_for(
    ctx: SweepContext, cache: TokenCache, execution: ExecutionConfig
) -> RayExecutor | None:
    """Ray workers for the sweep of ``ctx`` over ``cache`` (None: ``--workers 0``, this process).

    ``ctx.units`` is the whole cache (read by path where a node can); a rerank group's
    subset view sweeps on the same workers through :meth:`RayExecutor.over`. Were
    ``ctx.units`` itself a subset view, its blocks would always be shipped.
    """
    if execution.workers == 0:
        return None
    whole = ctx.units is cache
    return RayExecutor(
        ctx.sweep_model, ctx.units,
        RayOptions.of(
            execution, ctx.score_cfg.batch_size, ctx.pad_id, ctx.device,
            batch_tokens=ctx.score_cfg.batch_tokens or None, autocast=ctx.score_cfg.autocast,
        ),
        cache_root=cache.root if whole else None, manifest=cache.manifest,
        perturb_model=None if ctx.model is ctx.sweep_model else ctx.model,
        trunk=ctx.trunk_cache,
    )  # fmt: skip


def on_device(state: PerturbedState, device: torch.device) -> PerturbedState:
    """A worker's state (sent back on the CPU) on the driver's device, where the top-token
    step and a local sweep evaluate it next to the driver's model."""
    state.params = {k: v.to(device) for k, v in state.params.items()}
    return state


def _on_cpu_dict(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.cpu() for k, v in tensors.items()}
