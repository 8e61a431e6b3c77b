"""Hand blocks to Ray actors and survive their deaths: one ``ray.wait`` loop over every task.

Each live worker holds at most one block, so a failed task means exactly one death of
that worker. A block whose worker died (SIGKILL, OOM, node loss) goes back to the front
of the queue for the next live worker, up to ``attempts`` tries in all; then the run
stops with an error naming the block and the cause. A worker that died is probed
(``ready``) before it gets work again: Ray restarts it up to ``restarts`` times; one that
does not come back within ``timeout`` seconds (its node is gone and nothing else fits)
is dropped. A block is yielded once, when it succeeded, and never resubmitted after.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from bgotrace.dist.session import import_ray
from bgotrace.errors import BgotraceError, DistributedError
from bgotrace.score.executor import Block, BlockResult

log = logging.getLogger(__name__)

POLL_S = 1.0
"""Longest wait between checks of restarting workers' deadlines."""


@dataclass
class Slot:
    """One worker: its actor handle, where it runs, and how often it died."""

    index: int
    actor: Any
    node: str = ""
    pid: int = 0
    reads_cache: bool = False
    deaths: int = 0
    dead: bool = False
    busy: bool = False
    probing_since: float | None = None
    """When the probe of a restarting worker was sent (None: not restarting)."""

    def update(self, info: dict[str, Any]) -> None:
        self.node, self.pid, self.reads_cache = info["node"], info["pid"], info["reads_cache"]


def _retryable() -> tuple[type[BaseException], ...]:
    ex = import_ray().exceptions
    return (
        ex.RayActorError,
        ex.WorkerCrashedError,
        ex.NodeDiedError,
        ex.OutOfMemoryError,
        ex.ObjectLostError,
    )


def _block_text(block: Block) -> str:
    return f"block {block.index} (units {block.start}..{block.stop - 1})"


class BlockScheduler:
    """Runs blocks on ``slots`` until each succeeded once (see the module docstring)."""

    def __init__(
        self,
        slots: Sequence[Slot],
        *,
        attempts: int,
        restarts: int,
        timeout: float,
        payload: Callable[[Block, Slot], Any],
    ) -> None:
        self.slots, self.attempts, self.restarts, self.timeout = slots, attempts, restarts, timeout
        self.payload = payload
        """Block → what ``run_block`` gets as ``shipped`` on that worker (None or a ref)."""
        self.nodes: collections.Counter[str] = collections.Counter()
        """Blocks computed per node id (for the log and the tests)."""
        self.failures = 0

    def run(self, blocks: Sequence[Block], states_ref: Any) -> Iterator[BlockResult]:
        ray = import_ray()
        queue = collections.deque(blocks)
        tries: collections.Counter[int] = collections.Counter()
        inflight: dict[Any, tuple[Slot, Block | None]] = {}  # task → (worker, block | probe)
        while queue or any(b is not None for _, b in inflight.values()):
            for slot in self._idle():
                if not queue:
                    break
                todo = queue.popleft()
                ref = slot.actor.run_block.remote(todo, states_ref, self.payload(todo, slot))
                inflight[ref], slot.busy = (slot, todo), True
            if not inflight:
                raise self._no_workers(queue[0])
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=POLL_S)
            self._expire_probes(inflight)
            for ref in ready:
                slot, block = inflight.pop(ref)
                if block is None:
                    self._probe_done(slot, ref)
                    continue
                result = self._collect(ref, slot, block, tries, queue, inflight)
                if result is not None:
                    yield result

    def _idle(self) -> list[Slot]:
        return [s for s in self.slots if not (s.dead or s.busy or s.probing_since is not None)]

    def _collect(
        self,
        ref: Any,
        slot: Slot,
        block: Block,
        tries: collections.Counter[int],
        queue: collections.deque[Block],
        inflight: dict[Any, tuple[Slot, Block | None]],
    ) -> BlockResult | None:
        """The block's result, or None after re-queueing it because its worker died."""
        ray = import_ray()
        slot.busy = False
        try:
            result, node = ray.get(ref)
        except _retryable() as err:
            tries[block.index] += 1
            self.failures += 1
            cause = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            log.warning("worker %d died during %s: %s", slot.index, _block_text(block), cause)
            if tries[block.index] >= self.attempts:
                raise self._gave_up(block, cause) from err
            queue.appendleft(block)
            self._restart(slot, inflight)
            return None
        except ray.exceptions.RayTaskError as err:  # the block itself raised: no retry
            if isinstance(err.cause, BgotraceError):
                raise err.cause from None
            raise DistributedError(
                f"{_block_text(block)} failed on worker {slot.index} with "
                f"{type(err.cause).__name__}: {err.cause}; if it ran out of memory, lower "
                "--batch-size or --block-units, else report it with the run's config.yaml."
            ) from err
        self.nodes[node] += 1
        return result

    def _restart(self, slot: Slot, inflight: dict[Any, tuple[Slot, Block | None]]) -> None:
        """Probe a dead worker; give up on it after ``restarts`` deaths."""
        slot.deaths += 1
        if slot.deaths > self.restarts:
            self._drop(slot, f"it died {slot.deaths} times")
            return
        slot.probing_since = time.monotonic()
        inflight[slot.actor.ready.remote()] = (slot, None)

    def _probe_done(self, slot: Slot, ref: Any) -> None:
        slot.probing_since = None
        try:
            slot.update(import_ray().get(ref))
        except _retryable() as err:
            self._drop(slot, f"it did not restart ({type(err).__name__})")
            return
        log.info("worker %d is back on node %s (pid %d)", slot.index, slot.node[:8], slot.pid)

    def _expire_probes(self, inflight: dict[Any, tuple[Slot, Block | None]]) -> None:
        now = time.monotonic()
        for ref, (slot, block) in list(inflight.items()):
            since = slot.probing_since
            if block is None and since is not None and now - since > self.timeout:
                del inflight[ref]
                slot.probing_since = None
                self._drop(slot, f"it did not restart within {self.timeout:g} s")

    def _drop(self, slot: Slot, why: str) -> None:
        slot.dead = True
        log.warning("worker %d is gone: %s", slot.index, why)
        import_ray().kill(slot.actor, no_restart=True)

    def _gave_up(self, block: Block, cause: str) -> DistributedError:
        return DistributedError(
            f"{_block_text(block)} of the sweep failed {self.attempts} times because its "
            f"worker died (last cause: {cause}); the finished blocks are kept: fix the "
            "cluster (memory per worker: lower --batch-size or --workers per node) and rerun "
            "with --resume, or raise --block-attempts."
        )

    def _no_workers(self, block: Block) -> DistributedError:
        return DistributedError(
            f"Every Ray worker is gone ({len(self.slots)} started) before {_block_text(block)} "
            "could be computed; the finished blocks are kept: check the cluster's nodes "
            "(`ray status`) and rerun with --resume."
        )
