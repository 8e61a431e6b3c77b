"""A real two-node Ray cluster on this machine, for the ``dist`` tests.

Each node is one ``ray start --block`` process (127.0.0.1 only, 1 CPU, a 100 MB object
store) in its own process group, so teardown stops exactly the processes it started
(never ``ray stop``, which would stop every Ray on the machine). The second node carries
a custom resource ``node2`` so a test can tell the nodes apart.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

RAY = Path(sys.executable).with_name("ray")
ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
"""Ray >= 2.5x turns token auth on for ``ray start``; a loopback test cluster needs none."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ports() -> list[str]:
    # Two nodes on one machine must not share any listening port.
    names = (
        "--node-manager-port",
        "--object-manager-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--metrics-export-port",
        "--runtime-env-agent-port",
    )
    return [arg for name in names for arg in (name, str(free_port()))]


@dataclass
class LocalCluster:
    """Two ``ray start`` nodes; ``address`` is what ``--ray-address`` takes."""

    root: Path
    port: int = field(default_factory=free_port)
    nodes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _start(self, *args: str, log: str) -> None:
        common = ["--num-cpus", "1", "--object-store-memory", "100000000", "--block"]
        cmd = [str(RAY), "start", *args, *common, "--disable-usage-stats", *_ports()]
        out = open(self.root / log, "w")  # noqa: SIM115  closed with the process
        env = {**os.environ, **ENV}
        self.nodes.append(
            subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        )

    def start(self, timeout: float = 90) -> LocalCluster:
        self._start(
            "--head", "--port", str(self.port), "--include-dashboard", "false",
            "--temp-dir", str(self.root / "ray"), "--node-ip-address", "127.0.0.1",
            log="head.log",
        )  # fmt: skip
        self._wait(lambda n: n >= 1, timeout)
        self._start(
            "--address", self.address, "--resources", '{"node2": 1}',
            "--node-ip-address", "127.0.0.1", log="node2.log",
        )  # fmt: skip
        self._wait(lambda n: n >= 2, timeout)
        return self

    def alive_nodes(self) -> int:
        """Alive nodes as the cluster reports them (-1 while it does not answer)."""
        probe = (
            f"import ray; ray.init(address={self.address!r}, log_to_driver=False); "
            "print(sum(n['Alive'] for n in ray.nodes()))"
        )
        env = {**os.environ, **ENV}
        r = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120
        )
        return int(r.stdout.split()[-1]) if r.returncode == 0 and r.stdout.strip() else -1

    def _wait(self, ok, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.nodes):
                raise RuntimeError(f"a ray node exited; see {self.root}/*.log")
            if ok(self.alive_nodes()):
                return
            time.sleep(1)
        raise TimeoutError(f"ray cluster did not come up in {timeout} s; see {self.root}")

    def stop(self) -> None:
        """SIGTERM each node's process group, SIGKILL what is left after 3 s."""
        for p in reversed(self.nodes):
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + 3
        for p in self.nodes:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(p, signal.SIGKILL)
            p.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass


def start_cluster() -> LocalCluster:
    # Short root: Ray's unix socket paths must stay under ~107 characters.
    root = Path(tempfile.mkdtemp(prefix="bgr", dir="/tmp"))
    cluster = LocalCluster(root)
    try:
        return cluster.start()
    except BaseException:
        cluster.stop()
        raise
