"""The training job under `ray job submit`, against a `ray start --head` cluster of its own."""
import sys

import pytest
import yaml

from ray_cluster import ROOT, RAY, local_cluster


@pytest.fixture
def head_cluster(tmp_path):
    """A separate local cluster (tests/ray_cluster.py): a `ray start --head --block` process
    with ports and a temp dir of its own, so that stopping it stops this cluster only, not the
    test session's Ray."""
    with local_cluster(tmp_path) as cluster:
        cluster.start_head(num_cpus=4)
        yield cluster.address, cluster


def submit(cmd, cluster, timeout=300):
    """`ray job submit ...` (cmd as `ray job submit --address ADDR ...`), retried while the
    head's job agent is still starting."""
    assert cmd[:5] == [RAY, "job", "submit", "--address", cluster.address]
    return cluster.job("submit", *cmd[5:], timeout=timeout)


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_train_job_under_ray_job_submit(head_cluster, tmp_path):
    address, cluster = head_cluster
    data = tmp_path / "digits"
    prep = submit([RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT),
                   "--", sys.executable, "jobs/prepare_digits.py", "--out", str(data),
                   "--image-size", "16"], cluster)
    assert prep.returncode == 0, prep.stdout[-3000:] + prep.stderr[-3000:]
    cfg = yaml.safe_load((ROOT / "jobs/configs/quickstart/diffusion.yaml").read_text())
    cfg["model"]["flags"].update(image_size=16, channel_mult="1,2", diffusion_steps=100)
    config = tmp_path / "d.yaml"
    config.write_text(yaml.safe_dump(cfg))
    runs = tmp_path / "runs"
    cmd = [RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
           sys.executable, "jobs/train_diffusion.py", "--config", str(config),
           "--data", str(data), "--storage", str(runs), "--num-workers", "2",
           "--max-steps", "3", "optim.batch_size=16", "run.log_interval=1"]
    proc = submit(cmd, cluster)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step 3/3" in proc.stdout
    export = runs / "quickstart-diffusion" / "export"
    assert (export / "model000003.pt").exists() and (export / "flags.json").exists()
    # a bad config fails before any worker starts, naming the key, and the job exits non-zero
    bad = submit(cmd[:-2] + ["optim.batch_size=15"], cluster)
    assert bad.returncode != 0
    assert "optim.batch_size: 15 is not divisible by run.num_workers=2" in bad.stdout + bad.stderr
