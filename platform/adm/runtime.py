"""How the jobs start or join Ray, and what they let through to the terminal.

By default a user sees one progress bar per stage, one line per log interval and the warnings
that are theirs to act on; Ray's own INFO lines, deprecation notices and the Train controller's
report dumps go to Ray's log files (the `logs/` folder of the Ray session, under Ray's temp
dir). `verbose=True` lets everything through.
"""
from __future__ import annotations

import logging
import os
import warnings

def configure_output(verbose: bool = False) -> None:
    """Set up this process's logging before Ray starts (and hand the same to the processes
    Ray starts from it, through the environment)."""
    if verbose:
        logging.basicConfig(level=logging.INFO)
        return
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module="ray")
    for name in ("ray", "ray.train", "ray.data", "ray.tune", "ray.serve"):
        logging.getLogger(name).setLevel(logging.WARNING)


def init_ray(address: str | None = None, verbose: bool = False) -> None:
    """Connect to the Ray cluster at ``address`` (or ``RAY_ADDRESS``), else start a local one.

    Resources are never passed: a job submitted to a cluster must not ask ``ray.init`` for
    them, and a local Ray detects the machine's. A local Ray gets its dashboard, on loopback:
    Ray Train's state tracking (and its clean-up of placement groups) queries it."""
    import ray

    configure_output(verbose)
    if ray.is_initialized():
        return
    level = "INFO" if verbose else "WARNING"
    # The driver's level, and (logging_config) that of every worker and actor of the job: the
    # Train controller's and Ray Data's INFO lines stay in the log files.
    options = dict(logging_level=getattr(logging, level),
                   logging_config=ray.LoggingConfig(log_level=level))
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, **options)
    else:  # address="local": never a stale `ray start` cluster
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", **options)
    if not verbose:  # the job's own bars are the ones to watch; Data's per-operator bars are not
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
