"""Connect to a Ray cluster, or start one on this machine, and undo only what we did.

``address=None`` starts a private local Ray instance (``address="local"``: never an
unrelated cluster that happens to run on this machine) sized for the workers and stops it
at the end. ``address="auto"`` or ``"HOST:PORT"`` joins an existing cluster: at the end
this process only disconnects, the cluster keeps running. A Ray already initialised by
the caller (Python API) is used as is and left alone.
"""

from __future__ import annotations

import logging
import math
import socket
from dataclasses import dataclass
from typing import Any

from bgotrace.errors import ConfigError, DistributedError

log = logging.getLogger(__name__)


def import_ray() -> Any:
    """The ``ray`` module, or a clear error saying how to install it."""
    try:
        import ray
    except ImportError as err:
        raise ConfigError(
            "Distributed sweeps need Ray: pip install 'bgotrace[dist]', or drop --workers."
        ) from err
    return ray


@dataclass
class RaySession:
    """A connection to Ray and what this run started on it (``owned``)."""

    address: str
    """What was joined (``local`` for a private instance)."""
    owned: bool
    """True when this run initialised Ray (and so must shut it down)."""

    @classmethod
    def open(cls, address: str | None, *, n_cpus: float, driver_gpus: int = 0) -> RaySession:
        """Join ``address``, or start a private instance with ``n_cpus`` CPUs.

        ``driver_gpus``: GPUs this process itself computes on (1 with a CUDA model). Ray does
        not see them in use, so a private instance is given the machine's other GPUs only,
        and joining a cluster warns that Ray may place a worker on the driver's GPU.
        """
        ray = import_ray()
        if ray.is_initialized():
            return cls("caller's", owned=False)
        if address is None:
            gpus = max(0, _gpu_count() - driver_gpus)
            ray.init(
                address="local",
                num_cpus=max(1, math.ceil(n_cpus)),
                num_gpus=gpus,
                include_dashboard=False,
                log_to_driver=False,
            )
            log.info(
                "started a local Ray instance with %d CPUs and %d GPUs (%d kept for this "
                "process)", max(1, math.ceil(n_cpus)), gpus, driver_gpus,
            )  # fmt: skip
            return cls("local", owned=True)
        if driver_gpus:
            log.warning(
                "the driver computes on a GPU that Ray does not account for: on this node "
                "start Ray with one GPU fewer (`ray start --num-gpus N-1`) so no worker shares it"
            )
        _check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise DistributedError(
                f"Cannot join the Ray cluster at --ray-address={address!r} ({err}): start it "
                "with `ray start --head` (and RAY_ADDRESS / the token if it needs one), or drop "
                "--ray-address to run on this machine."
            ) from err
        log.info("joined the Ray cluster at %s", address)
        return cls(address, owned=True)

    def close(self) -> None:
        """Disconnect (a joined cluster keeps running) or stop the local instance."""
        if self.owned:
            import_ray().shutdown()
            self.owned = False


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail fast on a HEAD:PORT nobody listens on (Ray itself retries for minutes)."""
    host, sep, port = address.rpartition(":")
    if address == "auto" or "://" in address or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise DistributedError(
            f"Nothing answers at --ray-address={address} ({err.strerror or err}): start the "
            "head with `ray start --head --port PORT`, check the host and port, or drop "
            "--ray-address to run on this machine."
        ) from err


def resources_text(resources: dict[str, float]) -> str:
    """``CPU 2, GPU 0`` for an error message (the keys a worker asks for)."""
    return ", ".join(f"{k} {resources.get(k, 0):g}" for k in ("CPU", "GPU"))


def placement_error(
    session: RaySession, placed: int, wanted: int, per_worker: dict[str, float], timeout: float
) -> DistributedError:
    """What is missing when the cluster did not start every worker in time."""
    ray = import_ray()
    need = ", ".join(f"{k} {v:g}" for k, v in per_worker.items() if v)
    return DistributedError(
        f"The Ray cluster ({session.address}) started {placed} of {wanted} workers within "
        f"{timeout:g} s; each needs {need or 'nothing'}, and the cluster has "
        f"{resources_text(ray.cluster_resources())} in total "
        f"({resources_text(ray.available_resources())} free): lower --workers, "
        "--cpus-per-worker or --gpus-per-worker, add nodes, or raise --ray-timeout."
    )
