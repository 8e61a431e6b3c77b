"""The Ray actor: one copy of the sweep model, computing blocks with ``compute_block``,
perturbations with ``perturb`` and the normaliser's blocks with ``unit_gradient_norms``
(the same functions this process would run; a block's forwards under
``score.sweep.sweep_autocast`` with ``--autocast``, as this process's sweep), reading
the trunk from the driver's trunk cache where its node can (:mod:`bgotrace.dist.trunk`).

An actor is created from arguments only (the model through the object store, the cache
by path), so Ray can restart it after its process dies (SIGKILL, OOM, node loss) by
running ``__init__`` again. ``__init__`` never raises: whether this node can read the
cache is reported by :meth:`SweepWorker.ready`, so the driver can ship blocks instead
or explain the problem, rather than see an opaque actor-creation failure.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bgotrace.cache.batching import TokenSource
from bgotrace.config import PerturbConfig
from bgotrace.devices import resolve_device, set_tf32
from bgotrace.dist.trunk import TrunkSource, open_trunk_at
from bgotrace.dist.units import UnitSlice, open_cache_at
from bgotrace.perturb.ghost_norms import GhostPlan
from bgotrace.perturb.sensitivity import checked_plan, unit_gradient_norms
from bgotrace.perturb.steps import PerturbedState, perturb
from bgotrace.query import EncodedQuery
from bgotrace.score.executor import Block, BlockResult, compute_block
from bgotrace.score.subset import SubsetUnits
from bgotrace.score.sweep import BoundGroup, bind_group, sweep_autocast


@dataclass(frozen=True)
class WorkerSetup:
    """What every actor is created with (besides the model)."""

    cache_root: str | None
    """Token cache directory on the driver (None: the driver sweeps a subset; ship)."""
    expected_manifest: dict[str, Any]
    """Manifest keys a worker's cache must match to be used by path."""
    try_path: bool
    """False with ``--ship-cache always``: never open the cache, always receive blocks."""
    batch_size: int
    pad_id: int
    device: str
    """``cpu`` or ``cuda`` (a worker given GPUs by Ray sees them as cuda:0..)."""
    threads: int = 1
    """Torch threads: the CPUs Ray reserved for this worker."""
    trunk: TrunkSource | None = None
    """The driver's trunk cache (None: none; the workers compute the trunk)."""
    tf32: bool = True
    """TF32 for float32 matmuls on a CUDA worker (``--no-tf32``: off), as on the driver."""
    batch_tokens: int | None = None
    """``--batch-tokens``: padded tokens per batch instead of ``batch_size`` units (None: off)."""
    autocast: bool = False
    """``--autocast``: each block's forwards under bfloat16 autocast, as on the driver."""


class SweepWorker:
    """Holds the sweep model (and the caches when readable); computes blocks on request."""

    def __init__(
        self,
        model: torch.nn.Module,
        setup: WorkerSetup,
        perturb_model: torch.nn.Module | None = None,
    ) -> None:
        torch.set_num_threads(setup.threads)  # as many threads as Ray gave this actor CPUs
        self.setup = setup
        self.device = resolve_device(setup.device)
        set_tf32(self.device, setup.tf32)
        self.model = model.to(self.device).eval()
        # The perturbation's dtype (float32) when the sweep runs in another one.
        self.perturb_model = self.model if perturb_model is None else perturb_model.to(self.device)
        self.cache, self.why_not = None, "--ship-cache always"
        if setup.try_path:
            self.cache, self.why_not = open_cache_at(setup.cache_root, setup.expected_manifest)
        # Read by path or not at all (never shipped: see bgotrace.dist.trunk).
        self.trunk, self.trunk_why_not = open_trunk_at(setup.trunk)
        self.group: tuple[int, BoundGroup] | None = None
        """(sweep group, its states on this worker's device, bound once for its blocks)."""
        self.ghost_plans: dict[tuple[str, ...], GhostPlan] = {}
        """The normaliser's checked ghost-norm plan per parameter selection: this worker's
        model never changes, so it is checked on its first block only."""

    def ready(self) -> dict[str, Any]:
        """Where this worker runs and whether it reads the token and trunk caches by path."""
        import ray

        return {
            "node": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "reads_cache": self.cache is not None,
            "why_not": self.why_not,
            "reads_trunk": self.trunk is not None,
            "trunk_why_not": self.trunk_why_not,
        }

    def run_block(
        self,
        block: Block,
        group: tuple[int, list[Any]],
        source: UnitSlice | np.ndarray | None,
    ) -> tuple[BlockResult, str]:
        """The block's sums and counts (indexed as the driver's block), and this node's id.

        ``group``: (the sweep group's number, [ref of its states]); the states are fetched
        and moved to the device on the group's first block here, then kept for the rest.
        ``source``: where the block's units are (:meth:`_block_units`).
        """
        import ray

        states = self._group_states(group)
        units, local = self._block_units(block, source)
        # A shipped slice or a subset view names its corpus units: the trunk rows follow them.
        rows = None if self.trunk is None else self.trunk.for_units(units)
        with sweep_autocast(self.setup.autocast, self.device):  # the driver's own context
            _, sums, counts = compute_block(
                self.model, units, local, states,
                batch_size=self.setup.batch_size, pad_id=self.setup.pad_id, device=self.device,
                trunk_rows=rows, batch_tokens=self.setup.batch_tokens,
            )  # fmt: skip
        return (block, sums, counts), ray.get_runtime_context().get_node_id()

    def _block_units(
        self, block: Block, source: UnitSlice | np.ndarray | None
    ) -> tuple[TokenSource, Block]:
        """The units ``block`` is read from and the block in their numbering: the cache
        opened by path (None), the block's corpus units of that cache (an array: a subset
        view's block, e.g. a rerank group's candidates), or a shipped slice."""
        if source is None:
            assert self.cache is not None  # the driver sends None only when reads_cache
            return self.cache, block
        if isinstance(source, UnitSlice):
            return source, source.local_block(block)
        assert self.cache is not None  # corpus indices, likewise, only when reads_cache
        view = SubsetUnits(self.cache, source)
        return view, Block(block.index, 0, len(view))

    def unit_norms(
        self,
        indices: np.ndarray,
        names: Sequence[str],
        batching: tuple[int, int | None],
        shipped: UnitSlice | None,
    ) -> tuple[np.ndarray, str]:
        """‖∇L(z)‖ of the corpus units ``indices`` (the normaliser's block) with this worker's
        sweep model, as the driver would compute them (``batching``: units and padded tokens
        per batch); and this node's id."""
        import ray

        units: Any = self.cache if shipped is None else shipped
        local = indices if shipped is None else np.arange(len(indices))
        key = tuple(names)
        if key not in self.ghost_plans:
            self.ghost_plans[key] = checked_plan(self.model, units, names, self.device, local)
        norms, _ = unit_gradient_norms(
            self.model, units, names, self.device, batch_size=batching[0], indices=local,
            batch_tokens=batching[1], plan=self.ghost_plans[key],
        )  # fmt: skip
        return norms, ray.get_runtime_context().get_node_id()

    def _group_states(self, group: tuple[int, list[Any]]) -> BoundGroup:
        import ray

        number, (ref,) = group
        if self.group is None or self.group[0] != number:
            self.group = None  # the last group's states are freed first
            states = [None if s is None else _on(s, self.device) for s in ray.get(ref)]
            self.group = (number, bind_group(self.model, states))
        return self.group[1]

    def perturb(
        self,
        job: tuple[EncodedQuery, PerturbConfig, str],
        names: Sequence[str],
        n_units: int,
        fisher: Mapping[str, torch.Tensor] | None,
    ) -> tuple[PerturbedState, str]:
        """K steps of one query and direction from the base parameters (on CPU for the return)."""
        import ray

        query, cfg, direction = job
        ids, labels = query.input_ids.to(self.device), query.labels.to(self.device)
        query = dataclasses.replace(query, input_ids=ids, labels=labels)
        if fisher is not None:
            fisher = {k: v.to(self.device) for k, v in fisher.items()}
        state = perturb(
            self.perturb_model, query, names, cfg, direction, n_units=n_units, fisher=fisher
        )
        state.params = {k: v.cpu() for k, v in state.params.items()}
        return state, ray.get_runtime_context().get_node_id()


def _on(state: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in state.items()}
