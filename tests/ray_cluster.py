"""A Ray cluster of separate `ray start --block` processes on this machine, for end-to-end tests.

The test session already runs a local Ray (tests/conftest.py), so every node started here gets
free ports of its own (GCS, dashboard, the per-node agents, metrics, Ray Client) and a temp dir
of its own (`--temp-dir`): its session dir and logs live there, `ray start` writes its
`ray_current_cluster` file there and not in Ray's default temp dir, and a test can read
exactly this cluster's logs. Each node runs in its own process group, so a test can stop one node (SIGTERM to its
`ray start --block` process) or kill it as a machine crash would (SIGKILL to every process of
the node) without touching the session's Ray or the other nodes.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ray.util.state import list_actors, list_nodes

from adm.runtime import free_ports
# Every live process below a pid (from /proc: no psutil in the venv).
from adm.simcluster import descendants as _descendants

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


class RayNode:
    """One node: a `ray start --block` process (its own session) and everything it started."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], workdir: Path):
        self.name = name
        self._node_id: str | None = None
        # Short and private: Ray's unix sockets live under it (paths are limited to ~107 bytes).
        self.temp_dir = Path(tempfile.mkdtemp(prefix=f"rc-{name}-", dir="/tmp"))
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [RAY, "start", "--block", f"--temp-dir={self.temp_dir}", *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text()

    def raylet_pid(self, timeout: float = 60) -> int:
        """The pid of this node's raylet (a child of `ray start`), waiting for it to start."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for pid in _descendants(self.proc.pid):
                cmd = _cmdline(pid)
                if cmd and os.path.basename(cmd[0]) == "raylet":
                    return pid
            assert self.proc.poll() is None, f"{self.name} exited:\n{self.log()}"
            time.sleep(0.5)
        raise AssertionError(f"{self.name}: no raylet after {timeout} s:\n{self.log()}")

    def node_id(self) -> str:
        """Ray's id of this node (hex), from its raylet's command line (kept: a killed node
        keeps its id)."""
        if self._node_id is None:
            for arg in _cmdline(self.raylet_pid()):
                if arg.startswith("--node_id="):
                    self._node_id = arg.split("=", 1)[1]
                    break
            else:
                raise AssertionError(f"{self.name}: the raylet has no --node_id")
        return self._node_id

    def session_dir(self) -> Path:
        """This node's session dir (`<temp_dir>/session_<...>`: logs, runtime resources)."""
        return (self.temp_dir / "session_latest").resolve()

    def kill(self) -> list[int]:
        """SIGKILL every process of this node at once, as if the machine had died.

        Ray's worker processes may leave the node's process group, so they are found as
        descendants of `ray start` first. :return: the pids killed."""
        pids = [self.proc.pid, *_descendants(self.proc.pid)]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)
        return pids

    def stop(self) -> None:
        """Stop the node the polite way (SIGTERM to `ray start --block`), else kill it."""
        if self.proc.poll() is None:
            left = _descendants(self.proc.pid)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()
            for pid in left:  # any straggler of this node only (never by name)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._log.close()

    def cleanup(self) -> None:
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _agent_ports(*more: str) -> list[str]:
    """Free ports for a node's agents (and for the options in `more`, e.g.
    "--ray-client-server-port"), all distinct: the defaults (e.g. 52365) may be held by the
    test session's Ray, and then the job agent never comes up ("No available agent")."""
    listen, grpc, runtime_env, metrics, *extra = free_ports(4 + len(more))
    return [*(f"{option}={port}" for option, port in zip(more, extra)),
            f"--dashboard-agent-listen-port={listen}", f"--dashboard-agent-grpc-port={grpc}",
            f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}"]


class LocalCluster:
    """A head node (dashboard and job server on 127.0.0.1) and worker nodes joined to it."""

    def __init__(self, workdir: Path, env: dict[str, str] | None = None):
        self.workdir = workdir
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                    **(env or {})}
        self.env.pop("RAY_ADDRESS", None)
        self.gcs_port, self.dashboard_port = free_ports(2)
        self.address = f"http://127.0.0.1:{self.dashboard_port}"  # dashboard, jobs, state API
        self.head: RayNode | None = None
        self.workers: list[RayNode] = []

    def start_head(self, num_cpus: int, timeout: float = 120) -> RayNode:
        def start() -> RayNode:
            return RayNode("head", [
                "--head", f"--port={self.gcs_port}", f"--num-cpus={num_cpus}",
                "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}", "--node-ip-address=127.0.0.1",
                "--disable-usage-stats", "--object-store-memory=500000000",
                *_agent_ports("--ray-client-server-port")], self.env, self.workdir)

        def ready(node: RayNode) -> bool:
            return subprocess.run([RAY, "job", "list", "--address", self.address],
                                  env=self.env, capture_output=True, text=True).returncode == 0

        self.head = self._start(start, ready, timeout)
        return self.head

    def add_worker(self, num_cpus: int, timeout: float = 120) -> RayNode:
        """Join one more node to the head and wait until the GCS lists it ALIVE."""
        name = f"worker{len(self.workers) + 1}"

        def start() -> RayNode:
            return RayNode(name, [
                f"--address=127.0.0.1:{self.gcs_port}", f"--num-cpus={num_cpus}",
                "--node-ip-address=127.0.0.1", "--disable-usage-stats",
                "--object-store-memory=500000000", *_agent_ports()], self.env, self.workdir)

        node = self._start(start, lambda node: node.node_id() in self.alive_nodes(), timeout)
        self.workers.append(node)
        return node

    @staticmethod
    def _start(start, ready, timeout: float, attempts: int = 3) -> RayNode:
        """Start a node and wait until `ready(node)`. On an overloaded machine `ray start` can
        give up after its fixed 30 s wait for the raylet to register ("The current node timed
        out during startup"); that node is stopped and started again."""
        for attempt in range(attempts):
            node = start()
            deadline = time.time() + timeout
            while time.time() < deadline and node.proc.poll() is None:
                try:
                    if ready(node):
                        return node
                except AssertionError:  # the node exited while being asked
                    pass
                time.sleep(1)
            node.stop()
            retry = ("timed out during startup" in node.log()
                     or "used by other components" in node.log())  # a port taken meanwhile
            if not retry or attempt == attempts - 1:
                raise AssertionError(f"{node.name} did not come up:\n{node.log()}")
            node.cleanup()
        raise AssertionError("unreachable")

    def alive_nodes(self) -> set[str]:
        # raise_on_missing_output=False: with a filter, the state API counts the nodes it
        # filtered out as "missing" and would raise.
        return {n.node_id for n in list_nodes(address=self.address, raise_on_missing_output=False,
                                              filters=[("state", "=", "ALIVE")])}

    def actors(self, class_name: str, state: str | None = "ALIVE") -> list:
        """The actors of a class (`ActorState`: node_id, pid, state, ...), ALIVE ones by
        default, of any state with `state=None`."""
        filters = [("class_name", "=", class_name)] + ([("state", "=", state)] if state else [])
        return list_actors(address=self.address, detail=True, raise_on_missing_output=False,
                           filters=filters)

    def job(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """`ray job <args...>` against this cluster's head, retried while the head's job agent
        is still starting (the dashboard answers before it: "No available agent")."""
        cmd = [RAY, "job", args[0], "--address", self.address, *args[1:]]
        deadline = time.time() + 90
        while True:
            proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True,
                                  timeout=timeout)
            if "No available agent" not in proc.stdout + proc.stderr or time.time() > deadline:
                return proc
            time.sleep(2)

    def nodes(self) -> list[RayNode]:
        """Every node this cluster ever had (killed ones included), the head first."""
        return ([self.head] if self.head else []) + self.workers

    def shutdown(self) -> None:
        """Kill every node (the test is over: a polite `ray stop` of each takes ~15 s)."""
        for node in [*reversed(self.workers), *([self.head] if self.head else [])]:
            if node.proc.poll() is None:
                node.kill()
            node.stop()  # (the node is gone: this only closes its log)

    def cleanup(self) -> None:
        for node in self.nodes():
            node.cleanup()


@contextmanager
def local_cluster(workdir: Path, env: dict[str, str] | None = None) -> Iterator[LocalCluster]:
    """A `LocalCluster` that is shut down (and its temp dirs removed) on exit."""
    cluster = LocalCluster(workdir, env)
    try:
        yield cluster
    finally:
        cluster.shutdown()
        cluster.cleanup()
