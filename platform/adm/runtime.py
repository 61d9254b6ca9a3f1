"""How the jobs start or join Ray, and what they let through to the terminal.

By default a user sees one progress bar per stage (`adm.progress`), one line per log interval
and the warnings that are theirs to act on; Ray's own INFO lines, deprecation notices and the
Train controller's report dumps go to Ray's log files (the `logs/` folder of the Ray session,
under Ray's temp dir). `verbose=True` lets everything through.
"""
from __future__ import annotations

import functools
import logging
import os
import socket
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

# Ray Data says this once per process when its own bars are off, which the jobs do on purpose
# (their bars are `adm.progress`'s).
_RAY_NOISE = ("Progress bars disabled. To enable",)
RAY_DATA_LOGGING = str(Path(__file__).with_name("ray_data_logging.yaml"))


class DropRayNoise(logging.Filter):
    """Drops the log records of Ray's that say nothing a user can act on (`_RAY_NOISE`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in _RAY_NOISE)


def _quiet_ray_data() -> None:
    """Ray Data logs to the console at INFO from every process (a line per finished dataset)
    through a logging config of its own, read from RAY_DATA_LOGGING_CONFIG when `ray.data` is
    first imported: point it at ours (warnings only), for this process and the workers of a
    local Ray, which inherit the environment."""
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", RAY_DATA_LOGGING)
    if "ray.data" in sys.modules:  # imported already: configure it again from the variable
        try:
            from ray.data._internal.logging import configure_logging
        except ImportError:  # another Ray version: its own config stays
            return
        configure_logging()


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
    _quiet_ray_data()
    if not sys.stdout.isatty():
        # Ray colours the "(pid=...)" prefix of the lines it forwards from workers unless told
        # not to; in a log file those are escape codes.
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


_started_address: str | None = None  # RAY_ADDRESS of the local Ray this process started


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct TCP ports free on `host` now: all held open while they are picked, since
    the OS may hand a port just closed out again (two of a node's ports once came out equal and
    `ray start` refused them: "trying to use a port number ... used by other components")."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port(host: str = "") -> int:
    """A TCP port free on `host` now (all interfaces by default)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _start_local_ray(options: dict) -> None:
    """Start a local Ray whose address every process of it knows from the start.

    Ray's state API (which Ray Train's controller and its placement-group cleaner query from
    their own actors) finds the cluster by RAY_ADDRESS, else by looking for running GCS
    servers, and fails with "Found multiple active Ray instances" when a second Ray runs on
    the machine. So the GCS port is chosen here and RAY_ADDRESS set before the raylet starts:
    the raylet, and every worker it forks, inherit it."""
    import ray
    from ray._private.services import get_node_ip_address

    port = free_port()
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = f"{get_node_ip_address()}:{port}"
    try:
        # address="local": a cluster of our own, never a stale `ray start` one (RAY_ADDRESS,
        # just set, is not read when the address is "local").
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1",
                 **options)
    except BaseException:
        del os.environ["RAY_ADDRESS"]
        raise
    finally:
        del os.environ["RAY_GCS_SERVER_PORT"]


def init_ray(address: str | None = None, verbose: bool = False) -> None:
    """Connect to the Ray cluster at ``address`` (or ``RAY_ADDRESS``), else start a local one.

    Resources are never passed: a job submitted to a cluster must not ask ``ray.init`` for
    them, and a local Ray detects the machine's. A local Ray gets its dashboard, on loopback:
    Ray Train's state tracking (and its clean-up of placement groups) queries it.

    Afterwards ``RAY_ADDRESS`` names the cluster this process uses, so every lookup that
    resolves the address on its own (Ray's state API, the CLIs a job runs) finds this one,
    even with other Ray instances on the machine."""
    import ray

    configure_output(verbose)
    if ray.is_initialized():
        return
    level = "INFO" if verbose else "WARNING"
    # The driver's level, and (logging_config) that of every worker and actor of the job: the
    # Train controller's and Ray Data's INFO lines stay in the log files.
    options = dict(logging_level=getattr(logging, level),
                   logging_config=ray.LoggingConfig(log_level=level))
    global _started_address
    if _started_address and os.environ.get("RAY_ADDRESS") == _started_address:
        del os.environ["RAY_ADDRESS"]  # the local Ray this process started, since shut down
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, **options)
    else:
        _start_local_ray(options)
        _started_address = os.environ["RAY_ADDRESS"]
    if not (address or "").startswith("ray://"):  # a Ray Client has no GCS address of its own
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    if not verbose:  # the job's own bars are the ones to watch; Data's per-operator bars are not
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False


def run_job(main: Callable[..., int]) -> Callable[..., int]:
    """Decorator for a job's ``main``, which returns the exit status: a problem with what the
    user gave (a `UserError`: a config, a flag, an input file; or a named file that is not
    there) ends the job with one ``error: ...`` line on stderr and status 2, no traceback."""
    from .config import UserError

    @functools.wraps(main)
    def job(*args: Any, **kwargs: Any) -> int:
        try:
            return main(*args, **kwargs)
        except (UserError, FileNotFoundError) as e:
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
            return 2

    return job


CHECK_HELP = ("check the command line and the settings it names, then exit: no data, model or "
              "output location is read, and Ray is not started (for CI and deploy manifests)")


def check_passed(job: str) -> int:
    """What a job's ``--check`` prints when its command line and settings are valid; status 0."""
    print(f"{job}: the command line and its settings are valid (--check: nothing was read, "
          "written or started)", flush=True)
    return 0
