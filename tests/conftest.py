import os

# Local Ray in tests: no auth token, no usage stats, quiet Ray Data.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Train's controller polls its workers every 2 s by default, so each of the suite's ~30
# training runs waits up to 2 s to see its workers start, report and finish; 0.2 s cuts that
# (Train hands the variable from the driver to the controller). A warm 1-worker, 2-step run:
# 10.8 s at 0.5, 9.8 s at 0.2.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

import pytest

from adm.runtime import free_port
from s3_server import s3_server  # noqa: F401 - the session's S3 server, for every test module

METRICS_PORT = free_port("127.0.0.1")  # the session Ray's Prometheus endpoint


def pytest_collection_modifyitems(config, items):
    """Mark the tests that use the session's Ray (directly or through a fixture) `cluster`, so
    that `make test-fast` (-m "not cluster and not slow") can leave them out. Deselect the
    `gpu` tests where there is no CUDA device (CI): they run in benchmarks/gpu_check.sh."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)
    import torch

    if not torch.cuda.is_available():
        gpu = [item for item in items if item.get_closest_marker("gpu")]
        if gpu:
            config.hook.pytest_deselected(items=gpu)
            items[:] = [item for item in items if not item.get_closest_marker("gpu")]
            config.stash[GPU_DESELECTED] = len(gpu)


GPU_DESELECTED = pytest.StashKey[int]()
GPU_DESELECTED_LINE = ("{n} gpu test(s) deselected: no CUDA device here "
                       "(benchmarks/gpu_check.sh runs them on a GPU machine)")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Say that GPU tests were left out, and why (-q included: a silent drop reads as "all
    tests passed")."""
    n = config.stash.get(GPU_DESELECTED, 0)
    if n:
        terminalreporter.write_line(GPU_DESELECTED_LINE.format(n=n), yellow=True)


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray instance for the whole test session (starting Ray costs ~5 s).

    4 logical CPUs on the 2-core CI machine so that 2 Train workers and Ray Data's read/map
    tasks can run at once (on 2 CPUs the workers would hold both and the tasks would hang).
    Its workers reach the session's S3 server (moto's dummy credentials) through the job's
    runtime env, one of the standard ways the library expects workers to get credentials; the
    test process's own environment stays as it was."""
    import ray

    # Its metrics on a Prometheus endpoint, reported every second (Ray's default is 10 s), so a
    # test can scrape what the Serve replicas record (`metrics_url`).
    os.environ["RAY_metrics_report_interval_ms"] = "1000"
    # address="local": always a fresh cluster of our own, never one `ray start` left behind.
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": s3_server.env}, _metrics_export_port=METRICS_PORT)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def metrics_url(ray_session) -> str:
    """The session Ray's Prometheus endpoint (what a Prometheus server would scrape)."""
    return f"http://127.0.0.1:{METRICS_PORT}/metrics"


@pytest.fixture(scope="session")
def other_ray(tmp_path_factory):
    """A second Ray on the machine, as a user may have one (a `ray start --head` left over,
    another user's job): a one-CPU head with its own temp dir and ports. Yields a function
    that asserts it is untouched (alive, and no job ever connected to it)."""
    from ray._raylet import GcsClient

    from ray_cluster import local_cluster

    with local_cluster(tmp_path_factory.mktemp("other-ray")) as cluster:
        head = cluster.start_head(num_cpus=1)
        gcs = GcsClient(address=f"127.0.0.1:{cluster.gcs_port}")
        jobs_before = len(gcs.get_all_job_info(timeout=30))

        def untouched() -> None:
            assert head.proc.poll() is None, f"the other Ray died:\n{head.log()}"
            jobs = gcs.get_all_job_info(timeout=30)
            assert len(jobs) == jobs_before, f"jobs connected to the other Ray: {jobs}"

        yield untouched
