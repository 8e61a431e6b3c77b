"""The fault-tolerant task loop against a scripted stand-in for Ray (no cluster, fast).

Each fake worker runs a script: for each task key, whether it returns or dies. This pins
the rules of :mod:`bgotrace.dist.scheduler`: a dead worker's task goes to another worker,
each task is yielded exactly once, attempts are bounded with an error naming the task
and the cause, a worker that does not come back is dropped, and a task's own exception
is not retried. The real-cluster behaviour (SIGKILL) is in test_dist.py.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import pytest

from bgotrace.dist import scheduler as sched
from bgotrace.dist.scheduler import Slot, Task, TaskScheduler
from bgotrace.errors import ConfigError, DistributedError


class RayError(Exception):
    pass


class RayActorError(RayError):
    pass


class ActorDiedError(RayActorError):
    pass


class RayTaskError(RayError):
    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


EXCEPTIONS = types.SimpleNamespace(
    RayError=RayError, RayActorError=RayActorError, ActorDiedError=ActorDiedError,
    WorkerCrashedError=type("WorkerCrashedError", (RayError,), {}),
    NodeDiedError=type("NodeDiedError", (RayError,), {}),
    OutOfMemoryError=type("OutOfMemoryError", (RayError,), {}),
    ObjectLostError=type("ObjectLostError", (RayError,), {}),
    RayTaskError=RayTaskError,
)  # fmt: skip


class Ref:
    def __init__(self, outcome: Callable[[], object], ready: bool = True) -> None:
        self.outcome, self.ready = outcome, ready


class FakeRay:
    """``wait`` returns the oldest ready ref; ``get`` runs its outcome."""

    exceptions = EXCEPTIONS

    def __init__(self) -> None:
        self.killed: list[int] = []

    def wait(self, refs, num_returns=1, timeout=None):
        ready = [r for r in refs if r.ready][:num_returns]
        return ready, [r for r in refs if r not in ready]

    def get(self, ref):
        return ref.outcome()

    def kill(self, actor, no_restart=True):
        self.killed.append(actor.index)


class FakeActor:
    """Dies on the task keys in ``dies_on`` (each time they come), else returns key * 10."""

    def __init__(self, index: int, dies_on=(), comes_back: bool = True) -> None:
        self.index, self.dies_on, self.comes_back = index, set(dies_on), comes_back
        self.ran: list[int] = []
        self.ready = types.SimpleNamespace(remote=self._ready)

    def _ready(self) -> Ref:
        info = {"node": f"n{self.index}", "pid": 100 + self.index, "reads_cache": True}
        return Ref(lambda: info, ready=self.comes_back)

    def run(self, key: int) -> Ref:
        self.ran.append(key)
        if key in self.dies_on:

            def die():
                raise ActorDiedError(f"worker {self.index} was SIGKILLed")

            return Ref(die)
        return Ref(lambda: (key * 10, f"n{self.index}"))


@pytest.fixture
def fake_ray(monkeypatch):
    ray = FakeRay()
    monkeypatch.setattr(sched, "import_ray", lambda: ray)
    return ray


def tasks(n: int) -> list[Task]:
    return [Task(k, f"block {k}", lambda slot, k=k: slot.actor.run(k)) for k in range(n)]


def run(actors, n=6, attempts=3, restarts=3, timeout=60.0) -> tuple[dict, TaskScheduler]:
    slots = [Slot(a.index, a) for a in actors]
    scheduler = TaskScheduler(slots, attempts=attempts, restarts=restarts, timeout=timeout)
    results: dict[int, object] = {}
    for task, value in scheduler.run(tasks(n)):
        assert task.key not in results  # each task yielded exactly once
        results[task.key] = value
    return results, scheduler


def test_a_dead_workers_task_is_redone_elsewhere_and_yielded_once(fake_ray):
    flaky, steady = FakeActor(0, dies_on={0}), FakeActor(1)
    results, scheduler = run([flaky, steady])
    assert results == {k: k * 10 for k in range(6)}
    assert scheduler.failures == 1 and 0 in steady.ran
    assert sorted(flaky.ran + steady.ran) == [0, *range(6)]  # only the lost task ran twice


def test_a_task_that_keeps_killing_workers_stops_with_its_name_and_cause(fake_ray):
    actors = [FakeActor(0, dies_on={3}), FakeActor(1, dies_on={3})]
    with pytest.raises(DistributedError, match=r"block 3 failed 2 times.*ActorDiedError.*--resume"):
        run(actors, attempts=2)


def test_when_every_worker_is_gone_the_error_says_so(fake_ray):
    actors = [FakeActor(0, dies_on={0, 1}), FakeActor(1, dies_on={0, 1})]
    with pytest.raises(DistributedError, match="Every Ray worker is gone"):
        run(actors, attempts=5, restarts=0)
    assert sorted(fake_ray.killed) == [0, 1]


def test_a_worker_that_does_not_restart_in_time_is_dropped(fake_ray):
    lost, steady = FakeActor(0, dies_on={0}, comes_back=False), FakeActor(1)
    results, _ = run([lost, steady], timeout=0.0)
    assert results == {k: k * 10 for k in range(6)}
    assert fake_ray.killed == [0] and lost.ran == [0]  # no work after it died


@pytest.mark.parametrize(
    ("cause", "expected"),
    [
        (ConfigError("a user error"), ConfigError),
        (RuntimeError("CUDA out of memory"), DistributedError),
    ],
)
def test_an_exception_inside_a_task_is_not_retried(fake_ray, cause, expected):
    def raising(slot):
        def fail():
            raise RayTaskError(cause)

        return Ref(fail)

    slots = [Slot(0, FakeActor(0)), Slot(1, FakeActor(1))]
    scheduler = TaskScheduler(slots, attempts=3, restarts=3, timeout=60.0)
    with pytest.raises(expected, match="a user error|block 9 failed on worker 0 with RuntimeError"):
        list(scheduler.run([Task(9, "block 9", raising)]))
    assert scheduler.failures == 0


class QueuingActor(FakeActor):
    """Like a real actor: its death fails every task it held, not only the one it died in."""

    def __init__(self, index: int, dies_on=()) -> None:
        super().__init__(index, dies_on)
        self.era = 0

    def run(self, key: int) -> Ref:
        self.ran.append(key)
        born = self.era

        def outcome():
            if self.era != born or key in self.dies_on:
                if self.era == born:
                    self.dies_on.discard(key)  # dies once, then a restarted actor succeeds
                    self.era += 1
                raise ActorDiedError(f"worker {self.index} was SIGKILLed")
            return key * 10, f"n{self.index}"

        return Ref(outcome)


def test_two_tasks_in_flight_per_worker_and_one_death_fails_both(fake_ray):
    flaky, steady = QueuingActor(0, dies_on={0}), QueuingActor(1)
    slots = [Slot(a.index, a) for a in (flaky, steady)]
    scheduler = TaskScheduler(slots, attempts=3, restarts=3, timeout=60.0, depth=2)
    results: dict[int, object] = {}
    for task, value in scheduler.run(tasks(6)):
        assert task.key not in results  # each task yielded exactly once
        results[task.key] = value
    assert results == {k: k * 10 for k in range(6)}
    assert flaky.ran[:2] == [0, 2] and steady.ran[:2] == [1, 3]  # two in flight each
    assert scheduler.failures == 1  # one death, though it failed two tasks
    assert sorted(flaky.ran + steady.ran) == [0, 0, 1, 2, 2, 3, 4, 5]  # both lost tasks redone


def test_states_perturbed_on_workers_come_back_on_the_drivers_device():
    """A CUDA driver with CPU-returning workers used to get CPU states next to its GPU model
    (the top-token step then failed on mixed devices); here "meta" stands in for the GPU."""
    torch = pytest.importorskip("torch")
    from bgotrace.dist.ray_executor import on_device
    from bgotrace.perturb.steps import PerturbedState

    state = PerturbedState("ascent", {"w": torch.ones(3), "b": torch.zeros(2)}, [1.0, 2.0])
    moved = on_device(state, torch.device("meta"))
    assert {t.device.type for t in moved.params.values()} == {"meta"}
    assert moved.loss_trajectory == [1.0, 2.0]


def test_a_private_ray_leaves_the_drivers_gpu_out(monkeypatch):
    """Ray does not see the driver's own GPU work: a private instance gets the other GPUs."""
    from bgotrace.dist import session

    calls: list[dict] = []
    fake = types.SimpleNamespace(is_initialized=lambda: False, init=lambda **kw: calls.append(kw))
    monkeypatch.setattr(session, "import_ray", lambda: fake)
    monkeypatch.setattr(session, "_gpu_count", lambda: 4)
    session.RaySession.open(None, n_cpus=2, driver_gpus=1)
    session.RaySession.open(None, n_cpus=2, driver_gpus=0)
    assert [c["num_gpus"] for c in calls] == [3, 4]
