"""adm.simcluster without a cluster: the process-tree stop that replaces `ray stop --force`, and
the resource scaling. (The cluster itself runs in tests/test_autoscale.py.)"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from adm.simcluster import SimSettings, descendants, kill_tree, scale_resources

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
