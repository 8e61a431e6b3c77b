"""Hand tasks (sweep blocks, perturbations) to Ray actors and survive their deaths.

One ``ray.wait`` loop tracks every task. Each live worker holds up to ``depth`` tasks
(two for sweep blocks: the next block's arguments travel while the current one computes; an
actor runs its tasks one at a time). A worker's death fails every task it held: each goes
back to the front of the queue for the next live worker, up to ``attempts`` tries in all,
and the death is counted (and the worker restarted) once; after ``attempts`` tries the run
stops with an error naming the task and the cause. A worker that died is probed
(``ready``) before it gets work again: Ray restarts it up to ``restarts`` times; one that
does not come back within ``timeout`` seconds (its node is gone and nothing else fits) is
dropped. A task is yielded once, when it succeeded, and never resubmitted after.
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
    reads_trunk: bool = False
    """Whether it reads the trunk cache (else it computes the trunk)."""
    deaths: int = 0
    dead: bool = False
    busy: int = 0
    """Tasks in flight on this worker."""
    probing_since: float | None = None
    """When the probe of a restarting worker was sent (None: not restarting)."""

    def update(self, info: dict[str, Any]) -> None:
        self.node, self.pid, self.reads_cache = info["node"], info["pid"], info["reads_cache"]
        self.reads_trunk = info.get("reads_trunk", False)


def _retryable() -> tuple[type[BaseException], ...]:
    ex = import_ray().exceptions
    return (
        ex.RayActorError,
        ex.WorkerCrashedError,
        ex.NodeDiedError,
        ex.OutOfMemoryError,
        ex.ObjectLostError,
    )


@dataclass(frozen=True)
class Task:
    """One unit of work: ``submit(slot)`` starts it on a worker and returns its ref."""

    key: int
    """Position of the task in its batch (what the caller gets back with the result)."""
    label: str
    """How errors name it, e.g. ``block 3 (units 6..7)``."""
    submit: Callable[[Slot], Any]


class TaskScheduler:
    """Runs tasks on ``slots`` until each succeeded once (see the module docstring)."""

    def __init__(
        self,
        slots: Sequence[Slot],
        *,
        attempts: int,
        restarts: int,
        timeout: float,
        depth: int = 1,
    ) -> None:
        self.slots, self.attempts, self.restarts, self.timeout = slots, attempts, restarts, timeout
        self.depth = depth
        """Most tasks in flight per worker."""
        self._era: dict[Any, int] = {}
        """Per task ref: its worker's death count when it was submitted (a later failure of
        the same era is the same death)."""
        self.nodes: collections.Counter[str] = collections.Counter()
        """Tasks done per node id (for the log and the tests)."""
        self.failures = 0
        """Worker deaths survived."""

    def run(self, tasks: Sequence[Task]) -> Iterator[tuple[Task, Any]]:
        """Yield (task, its result) as each task succeeds, in any order."""
        ray = import_ray()
        queue = collections.deque(tasks)
        tries: collections.Counter[int] = collections.Counter()
        inflight: dict[Any, tuple[Slot, Task | None]] = {}  # ref → (worker, task | probe)
        while queue or any(t is not None for _, t in inflight.values()):
            for slot in self._idle():
                if not queue:
                    break
                todo = queue.popleft()
                ref = todo.submit(slot)
                inflight[ref], self._era[ref] = (slot, todo), slot.deaths
                slot.busy += 1
            if not inflight:
                raise self._no_workers(queue[0])
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=POLL_S)
            self._expire_probes(inflight)
            for ref in ready:
                slot, task = inflight.pop(ref)
                if task is None:
                    self._probe_done(slot, ref)
                    continue
                done, result = self._collect(ref, slot, task, tries, queue, inflight)
                if done:
                    yield task, result

    def _idle(self) -> list[Slot]:
        """Free places on live workers, breadth first (every worker's first task, then
        every worker's second…), so work spreads before it queues."""
        live = [s for s in self.slots if not (s.dead or s.probing_since is not None)]
        return [s for level in range(self.depth) for s in live if s.busy <= level]

    def _collect(
        self,
        ref: Any,
        slot: Slot,
        task: Task,
        tries: collections.Counter[int],
        queue: collections.deque[Task],
        inflight: dict[Any, tuple[Slot, Task | None]],
    ) -> tuple[bool, Any]:
        """(True, the task's result), or (False, None) after re-queueing it: its worker died."""
        ray = import_ray()
        slot.busy -= 1
        era = self._era.pop(ref)
        try:
            result, node = ray.get(ref)
        except _retryable() as err:
            tries[task.key] += 1
            cause = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            log.warning("worker %d died during %s: %s", slot.index, task.label, cause)
            if tries[task.key] >= self.attempts:
                raise self._gave_up(task, cause) from err
            queue.appendleft(task)
            if era == slot.deaths and not slot.dead:  # one death fails all the tasks it held
                self.failures += 1
                self._restart(slot, inflight)
            return False, None
        except ray.exceptions.RayTaskError as err:  # the task itself raised: no retry
            if isinstance(err.cause, BgotraceError):
                raise err.cause from None
            raise DistributedError(
                f"{task.label} failed on worker {slot.index} with "
                f"{type(err.cause).__name__}: {err.cause}; if it ran out of memory, lower "
                "--batch-size or --block-units, else report it with the run's config.yaml."
            ) from err
        self.nodes[node] += 1
        return True, result

    def _restart(self, slot: Slot, inflight: dict[Any, tuple[Slot, Task | None]]) -> None:
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

    def _expire_probes(self, inflight: dict[Any, tuple[Slot, Task | None]]) -> None:
        now = time.monotonic()
        for ref, (slot, task) in list(inflight.items()):
            since = slot.probing_since
            if task is None and since is not None and now - since > self.timeout:
                del inflight[ref]
                slot.probing_since = None
                self._drop(slot, f"it did not restart within {self.timeout:g} s")

    def _drop(self, slot: Slot, why: str) -> None:
        slot.dead = True
        log.warning("worker %d is gone: %s", slot.index, why)
        import_ray().kill(slot.actor, no_restart=True)

    def _gave_up(self, task: Task, cause: str) -> DistributedError:
        return DistributedError(
            f"{task.label} failed {self.attempts} times because its "
            f"worker died (last cause: {cause}); the finished blocks are kept: fix the "
            "cluster (memory per worker: lower --batch-size or --workers per node) and rerun "
            "with --resume, or raise --block-attempts."
        )

    def _no_workers(self, task: Task) -> DistributedError:
        return DistributedError(
            f"Every Ray worker is gone ({len(self.slots)} started) before {task.label} "
            "could be computed; the finished blocks are kept: check the cluster's nodes "
            "(`ray status`) and rerun with --resume."
        )
