"""adm.simcluster: the stop that replaces `ray stop --force` (a process tree and a session),
the resource scaling, and `python -m adm.simcluster` as a user runs it. (Autoscaling itself runs
in tests/test_autoscale.py.)"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from adm.nodetypes import node_types
from adm.simcluster import SimSettings, descendants, kill_tree, scale_resources, session_members

ROOT = Path(__file__).resolve().parents[1]

# A parent with a child and a grandchild that starts in a new session (as Ray's workers may):
# all three must go; a process outside the tree must not.
TREE = ("import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import subprocess, sys, time; "
        "subprocess.Popen([sys.executable, \"-c\", \"import time; time.sleep(60)\"], "
        "start_new_session=True); time.sleep(60)'])\n"
        "time.sleep(60)\n")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_kill_tree_ends_the_tree_and_nothing_else() -> None:
    root = subprocess.Popen([sys.executable, "-c", TREE])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        deadline = time.time() + 30
        while len(descendants(root.pid)) < 2 and time.time() < deadline:
            time.sleep(0.1)
        tree = [root.pid, *descendants(root.pid)]
        assert len(tree) == 3, tree
        assert sorted(kill_tree(root.pid)) == sorted(tree)
        root.wait(10)
        time.sleep(0.5)
        assert [p for p in tree if alive(p)] == []
        assert alive(other.pid)
    finally:
        other.kill()
        root.kill()
        other.wait()


def test_scaled_resources_keep_custom_resources_equal_to_gpus() -> None:
    s = SimSettings(max_cpus=2, max_gpus=2)
    assert scale_resources({"CPU": 96, "GPU": 8, "adm_train": 8}, s) == \
        {"CPU": 2, "GPU": 2, "adm_train": 2}
    assert scale_resources({"CPU": 8, "GPU": 1, "adm_serve": 1}, s) == \
        {"CPU": 2, "GPU": 1, "adm_serve": 1}
    assert scale_resources({"CPU": 32}, s) == {"CPU": 2}
    assert scale_resources({"CPU": 1}, s) == {"CPU": 1}


# A parent with a child and a grandchild, all in one session (as a raylet and its workers).
CHAIN = ("import subprocess, sys, time\n"
         "subprocess.Popen([sys.executable, '-c', 'import subprocess, sys, time; "
         "subprocess.Popen([sys.executable, \"-c\", \"import time; time.sleep(60)\"]); "
         "time.sleep(60)'])\n"
         "time.sleep(60)\n")


def test_kill_tree_with_the_session_ends_what_left_the_tree() -> None:
    """A grandchild whose parent was killed (as the workers of a killed raylet) is re-parented
    away: no longer below the root, still in its session. The tree alone misses it."""
    leader = subprocess.Popen([sys.executable, "-c", CHAIN], start_new_session=True)
    orphan = None
    try:
        deadline = time.time() + 30
        while len(descendants(leader.pid)) < 2 and time.time() < deadline:
            time.sleep(0.1)
        child, orphan = descendants(leader.pid)
        os.kill(child, signal.SIGKILL)
        while orphan in descendants(leader.pid) and time.time() < deadline:
            time.sleep(0.1)
        assert orphan not in descendants(leader.pid) and orphan in session_members(leader.pid)
        assert {leader.pid, orphan} <= set(kill_tree(leader.pid, leader.pid))
        leader.wait(10)
        time.sleep(0.5)
        assert session_members(leader.pid) == [] and not alive(orphan)
    finally:
        leader.kill()
        if orphan and alive(orphan):
            os.kill(orphan, signal.SIGKILL)


@pytest.mark.cluster
def test_the_command_starts_the_cluster_prints_its_address_and_stops_on_ctrl_c() -> None:
    """`python -m adm.simcluster cluster.yaml`: the head answers at the printed dashboard URL,
    cluster.yaml's node types are in its GCS under their names, and Ctrl-C (SIGINT) ends every
    process of the cluster and removes its files."""
    from ray._raylet import GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, GCS_AUTOSCALER_STATE_NAMESPACE, \
        GcsClient
    from ray.core.generated import autoscaler_pb2

    cli = subprocess.Popen([sys.executable, "-m", "adm.simcluster", "cluster.yaml"], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, session = [], None
    try:
        deadline = time.time() + 180
        while time.time() < deadline and (not out or "Ctrl-C stops it" not in out[-1]):
            line = cli.stdout.readline()
            assert line, "".join(out)
            out.append(line)
        text = "".join(out)
        gcs = re.search(r"RAY_ADDRESS=(\S+)", text).group(1)
        dashboard = re.search(r"dashboard: (http://\S+)", text).group(1)
        logs = Path(re.search(r"logs: (\S+)", text).group(1))
        heads = [p for p in descendants(cli.pid)
                 if b"--head" in Path(f"/proc/{p}/cmdline").read_bytes()]
        session = heads[0]
        import requests

        assert requests.get(f"{dashboard}/api/jobs/", timeout=10).status_code == 200
        config = autoscaler_pb2.ClusterConfig.FromString(GcsClient(address=gcs).internal_kv_get(
            GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode(), GCS_AUTOSCALER_STATE_NAMESPACE.encode()))
        want = node_types(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
        assert [g.name for g in config.node_group_configs] == [t.name for t in want]
        assert session_members(session), "the cluster's processes"
        cli.send_signal(signal.SIGINT)
        rest, _ = cli.communicate(timeout=60)
    finally:
        cli.kill()
        if session:
            kill_tree(session, session)
    assert cli.returncode == 0, text + rest
    assert "processes of the simulated cluster ended" in rest, rest
    assert session_members(session) == [], session_members(session)
    assert not logs.parent.parent.exists(), logs
