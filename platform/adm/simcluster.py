"""A simulated multi-node Ray cluster on one machine, built from `cluster.yaml`.

    python -m adm.simcluster [cluster.yaml] [--idle-timeout-s 15] [--max-cpus 2] [--max-gpus 2]

starts one and prints its address (`RAY_ADDRESS` for `ray.init`, the jobs' `--address`,
`ray status`; the dashboard URL for `ray job submit` and `serve deploy`); Ctrl-C stops it and
every process it started. Try cluster.yaml's node types and autoscaling on a laptop that way.

Ray's fake multi-node provider (`fake_multinode`, the one behind
`ray.cluster_utils.AutoscalingCluster`) starts a real raylet per "node" when Ray's own
autoscaler decides to launch one, and stops it when the node has been idle for the idle
timeout. `SimulatedCluster` feeds it `cluster.yaml`'s worker node types (same names, min/max
workers and custom resources) with their CPUs and GPUs scaled down to fit one small machine;
GPUs are declared, so GPU requests schedule, and the models fall back to CPU.

Unlike `AutoscalingCluster`, it never runs `ray stop --force` (which ends every Ray on the
machine): the head is a `ray start --head --block` process in a session of its own, and every
process of the cluster stays in that session (the worker nodes are started by its autoscaler;
Ray's workers change their process group, not their session). `stop` ends exactly that session
and the head's process tree, which includes the workers a killed raylet left behind (no longer
the head's descendants once their raylet is gone). Every port is chosen free, and the cluster
keeps its files in its own temp dir.

The fake provider names the head's type `ray.head.default` (fixed in Ray); the head gets
cluster.yaml's head resources under that name.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

from pydantic import PositiveFloat, PositiveInt

from .config import config_class
from .nodetypes import NodeType, node_types, publish_node_types
from .runtime import free_ports

FAKE_HEAD_TYPE = "ray.head.default"  # ray.autoscaler._private.fake_multi_node's own name


@config_class(frozen=True)
class SimSettings:
    """How cluster.yaml is shrunk onto one machine, and how fast the autoscaler reacts."""

    max_cpus: PositiveInt = 2  # logical CPUs of a node at most (cluster.yaml's count if smaller)
    max_gpus: PositiveInt = 2  # declared GPUs of a node at most; custom resources scale with them
    idle_timeout_minutes: PositiveFloat = 0.25  # cluster.yaml: 5 (a real GPU node costs money)
    upscaling_speed: PositiveFloat = 1.0
    object_store_mb: PositiveInt = 100  # per node (Ray's default takes 30% of the machine's memory)
    autoscaler_interval_s: PositiveInt = 1  # the autoscaler's update loop, s (Ray's default: 5)


def scale_resources(resources: Mapping[str, float], settings: SimSettings) -> dict[str, int]:
    """A node type's resources shrunk onto this machine: CPU and GPU capped, and each custom
    resource scaled by the same factor as the GPUs (so `adm_serve == GPU` stays true), at least
    1 where the type has any. Integers: the cluster config's schema asks for them."""
    gpus = int(resources.get("GPU", 0))
    new_gpus = min(gpus, settings.max_gpus)
    factor = new_gpus / gpus if gpus else 1.0
    out = {"CPU": max(1, min(int(resources.get("CPU", 1)), settings.max_cpus))}
    if gpus:
        out["GPU"] = new_gpus
    for name, amount in resources.items():
        if name not in ("CPU", "GPU") and amount:
            out[name] = max(1, math.floor(amount * factor))
    return out


def fake_multinode_config(cluster: Mapping[str, Any], gcs_address: str,
                          settings: SimSettings = SimSettings()) -> dict:
    """The autoscaling config of the simulated cluster: `cluster`'s worker node types (names,
    min/max workers, custom resources) with scaled resources, under the fake provider; its
    head type is `ray.head.default` (the provider's fixed name) with the head's resources."""
    types = node_types(cluster)
    available = {FAKE_HEAD_TYPE: {"resources": scale_resources(_head(types).resources, settings),
                                  "node_config": {}, "max_workers": 0}}
    for t in types:
        if t.head:
            continue
        resources = scale_resources(t.resources, settings)
        resources["object_store_memory"] = settings.object_store_mb * 1024 * 1024
        available[t.name] = {"resources": resources, "node_config": {},
                             "min_workers": t.min_workers, "max_workers": t.max_workers}
    return {
        "cluster_name": f"sim-{cluster.get('cluster_name', 'adm')}",
        "max_workers": int(cluster.get("max_workers", sum(t.max_workers for t in types))),
        "upscaling_speed": settings.upscaling_speed,
        "idle_timeout_minutes": settings.idle_timeout_minutes,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True,
                     "gcs_address": gcs_address},
        "auth": {"ssh_user": "nobody"},
        "available_node_types": available,
        "head_node_type": FAKE_HEAD_TYPE,
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [],
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


def _head(types: list[NodeType]) -> NodeType:
    return next(t for t in types if t.head)


def descendants(pid: int) -> list[int]:
    """Every live process below `pid`, parents before children (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name may hold spaces and ')'
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            out.append(child)
            todo.append(child)
    return out


def _stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after the name (state, ppid, pgrp, session, ...); None
    when there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def session_members(sid: int) -> list[int]:
    """Every live (not zombie) process of session `sid`, from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        fields = _stat(entry) if entry.isdigit() else None
        if fields and fields[0] != "Z" and int(fields[3]) == sid:
            out.append(int(entry))
    return out


def kill_tree(root: int, session: int | None = None) -> list[int]:
    """SIGKILL `root`, every process below it and, with `session`, every process of that
    session. They are frozen first (SIGSTOP, repeated until no new process appears), so that
    nothing forks or is re-parented away meanwhile. :return: the pids killed."""
    stopped: list[int] = []
    for _ in range(20):
        members = [root, *descendants(root)]
        if session is not None:
            members += session_members(session)
        new = [p for p in dict.fromkeys(members) if p not in stopped]
        if not new:
            break
        for pid in new:
            try:
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
            except ProcessLookupError:
                pass
    for pid in stopped:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return stopped


class SimulatedCluster:
    """A head (GCS, dashboard and job server on 127.0.0.1, Ray's autoscaler with the fake
    provider) whose worker nodes come and go as Ray's autoscaler decides.

    `address` is the dashboard's (jobs, state API, `serve.status` through a driver);
    `gcs_address` is what `ray.init` and `RAY_ADDRESS` take."""

    def __init__(self, cluster: Mapping[str, Any], settings: SimSettings = SimSettings(),
                 env: Mapping[str, str] | None = None, workdir: str | Path | None = None):
        self.cluster = copy.deepcopy(dict(cluster))
        self.settings = settings
        # Short and private: Ray's unix sockets live under it (paths are limited to ~107 bytes).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="adm-sim-", dir="/tmp"))
        self.workdir = Path(workdir) if workdir else self.temp_dir
        self.gcs_port = self.dashboard_port = 0
        self.env = dict(env if env is not None else os.environ)
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "head.log"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def logs_dir(self) -> Path:
        """Ray's logs dir of the cluster: every node's logs (they share one session dir)."""
        return self.temp_dir / "session_latest" / "logs"

    def env_for_clients(self) -> dict[str, str]:
        """The environment of a process that talks to this cluster (a driver, `serve deploy`,
        `ray job submit`): RAY_ADDRESS is this cluster's."""
        env = {**self.env, "RAY_ADDRESS": self.gcs_address}
        env.setdefault("RAY_AUTH_MODE", "disabled")  # the cluster listens on loopback only
        return env

    def nodes(self, timeout: float = 20) -> list:
        """Every node the cluster has had, from Ray's state API (`NodeState`: node_id, state,
        is_head_node, resources_total, ...)."""
        from ray.util.state import list_nodes

        return list_nodes(address=self.address, detail=True, timeout=timeout,
                          raise_on_missing_output=False)

    def node_types(self) -> list[NodeType]:
        """cluster.yaml's node types as this cluster offers them (scaled resources)."""
        return [dataclasses.replace(t, resources={k: float(v) for k, v in scale_resources(
            t.resources, self.settings).items()}) for t in node_types(self.cluster)]

    def _command(self, config_path: Path) -> list[str]:
        head = scale_resources(_head(node_types(self.cluster)).resources, self.settings)
        cpus, gpus = head.pop("CPU"), head.pop("GPU", 0)
        ports = free_ports(6)
        return [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                f"--temp-dir={self.temp_dir}", f"--port={self.gcs_port}",
                "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", f"--num-gpus={gpus}",
                f"--resources={json.dumps(head)}",
                f"--object-store-memory={self.settings.object_store_mb * 1024 * 1024}",
                "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}", "--disable-usage-stats",
                f"--autoscaling-config={config_path}",
                f"--ray-client-server-port={ports[0]}",
                f"--dashboard-agent-listen-port={ports[1]}",
                f"--dashboard-agent-grpc-port={ports[2]}",
                f"--runtime-env-agent-port={ports[3]}", f"--metrics-export-port={ports[4]}",
                f"--node-manager-port={ports[5]}"]

    def start(self, timeout: float = 120, attempts: int = 3) -> "SimulatedCluster":
        """Start the head and wait until its job server answers; a start that lost a port to
        another process on the machine meanwhile is tried again with new ones."""
        for attempt in range(attempts):
            self.gcs_port, self.dashboard_port = free_ports(2)
            config = fake_multinode_config(self.cluster, self.gcs_address, self.settings)
            config_path = self.temp_dir / "autoscaling.json"
            config_path.write_text(json.dumps(config))
            # RAY_ADDRESS: every process of the cluster (the autoscaler's nodes, Train's
            # controller) finds this cluster, never another Ray on the machine.
            env = {"RAY_USAGE_STATS_ENABLED": "0", **self.env_for_clients(),
                   "RAY_FAKE_CLUSTER": "1",
                   "AUTOSCALER_UPDATE_INTERVAL_S": str(self.settings.autoscaler_interval_s)}
            with open(self.log_path, "w") as log:
                self.proc = subprocess.Popen(self._command(config_path), stdout=log,
                                             stderr=subprocess.STDOUT, env=env,
                                             start_new_session=True)
            if self._wait_ready(timeout):
                publish_node_types(self.gcs_address, self.node_types())
                return self
            text = self.log_path.read_text()
            self.stop()
            retry = any(t in text for t in ("already in use", "used by other components",
                                            "timed out during startup"))
            if not retry or attempt == attempts - 1:
                raise RuntimeError(f"the simulated cluster's head did not start:\n{text[-3000:]}")
        raise AssertionError("unreachable")

    def _wait_ready(self, timeout: float) -> bool:
        import urllib.request

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.address}/api/jobs/", timeout=5) as r:
                    if r.status == 200:
                        return True
            except OSError:
                pass
            time.sleep(1)
        return False

    def raylet_pid(self, node_id: str) -> int | None:
        """The pid of this cluster's raylet of a node (hex id), None if it is not running."""
        if self.proc is None:
            return None
        for pid in descendants(self.proc.pid):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            args = cmd.split("\0")
            if os.path.basename(args[0]) == "raylet" and f"--node_id={node_id}" in args:
                return pid
        return None

    @property
    def session(self) -> int | None:
        """The session id of every process of the cluster (the head's pid: it starts one)."""
        return self.proc.pid if self.proc is not None else None

    def stop(self) -> list[int]:
        """End this cluster's processes, and only those: its session (the head's process
        tree, the worker nodes its autoscaler started, and what a killed raylet left
        behind). :return: the pids ended."""
        if self.proc is None:
            return []
        pids = kill_tree(self.proc.pid, self.session)
        self.proc.wait(30)
        self.proc = None
        return pids

    def cleanup(self) -> None:
        """Stop, and remove the cluster's temp dir."""
        self.stop()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "SimulatedCluster":
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """`python -m adm.simcluster [CLUSTER_YAML]`: start the simulated cluster, print how to
    reach it, and stop it (all of it) on Ctrl-C or SIGTERM. Status 0 when stopped that way,
    1 when the head ended on its own (its log is kept)."""
    import argparse

    import yaml

    p = argparse.ArgumentParser(
        prog="python -m adm.simcluster",
        description="A cluster launcher config's node types and autoscaling, simulated on this "
                    "machine: Ray's own autoscaler starts a raylet per node (fake multi-node "
                    "provider). Ctrl-C stops it.")
    p.add_argument("config", nargs="?", default="cluster.yaml",
                   help="the cluster launcher config (default: cluster.yaml)")
    d = SimSettings()
    p.add_argument("--idle-timeout-s", type=float, default=d.idle_timeout_minutes * 60,
                   help="remove a worker node idle this long, s (%(default)g; cluster.yaml: 300)")
    p.add_argument("--max-cpus", type=int, default=d.max_cpus, help="CPUs of a node at most")
    p.add_argument("--max-gpus", type=int, default=d.max_gpus,
                   help="declared GPUs of a node at most (custom resources scale with them)")
    p.add_argument("--object-store-mb", type=int, default=d.object_store_mb,
                   help="object store per node, MB")
    args = p.parse_args(argv)
    with open(args.config) as f:
        cluster = yaml.safe_load(f)
    settings = SimSettings(max_cpus=args.max_cpus, max_gpus=args.max_gpus,
                           idle_timeout_minutes=args.idle_timeout_s / 60,
                           object_store_mb=args.object_store_mb)
    signal.signal(signal.SIGTERM, _interrupt)  # ends it like Ctrl-C: the cluster goes with it
    sim = SimulatedCluster(cluster, settings)
    status = 1
    try:
        sim.start()
        added = {k: v for k, v in sim.env_for_clients().items() if os.environ.get(k) != v}
        types = "\n".join(f"  {t.name:<16} {_fmt(t.resources)}"
                          + ("" if t.head else f" x {t.min_workers}-{t.max_workers}")
                          for t in sim.node_types())
        print(f"simulated cluster from {args.config}: worker nodes are added on demand and "
              f"removed after {args.idle_timeout_s:g} s idle\n"
              f"node types (resources scaled to this machine; workers: min-max):\n{types}\n"
              f"  export {' '.join(f'{k}={v}' for k, v in sorted(added.items()))}\n"
              f"dashboard: {sim.address} (ray job submit --address, serve deploy --address)\n"
              f"logs: {sim.logs_dir}\n"
              f"Ctrl-C stops it.", flush=True)
        while sim.proc.poll() is None:
            time.sleep(1)
        print(f"error: the head exited (status {sim.proc.returncode}); its log: {sim.log_path}",
              file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        status = 0
    finally:
        ended = len(sim.stop())
        if status == 0:
            shutil.rmtree(sim.temp_dir, ignore_errors=True)
        print(f"stopped: {ended} processes of the simulated cluster ended", flush=True)
    return status


def _fmt(resources: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in resources.items()) + "}"


if __name__ == "__main__":
    raise SystemExit(main())
