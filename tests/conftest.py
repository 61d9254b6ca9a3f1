import os

# Local Ray in tests: no auth token, no usage stats, quiet Ray Data.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest

from s3_server import s3_server  # noqa: F401 - the session's S3 server, for every test module


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray instance for the whole test session (starting Ray costs ~5 s).

    4 logical CPUs on the 2-core CI machine so that 2 Train workers and Ray Data's read/map
    tasks can run at once (see the Ray notes on the 2-core hang). Its workers reach the
    session's S3 server (moto's dummy credentials) through the job's runtime env, one of the
    standard ways the library expects workers to get credentials; the test process's own
    environment stays as it was."""
    import ray

    # address="local": always a fresh cluster of our own, never one `ray start` left behind.
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": s3_server.env})
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    yield ray
    ray.shutdown()
