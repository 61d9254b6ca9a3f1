"""A real S3 API for the tests: moto in server mode, a separate process on 127.0.0.1.

tests/conftest.py makes the fixture available to every test module (``s3_server``). The
session-scoped fixture starts ``python -m moto.server -H 127.0.0.1 -p PORT`` once, polls the port
until it answers, yields an ``S3Server`` (the endpoint URL, ``S3Options`` for ``adm.storage``,
and a bucket factory), and terminates the process at the end of the session. All traffic stays
on the loopback interface; the credentials are moto's dummies.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import pytest

from adm.runtime import free_port
from adm.storage import S3Options, s3_client




@dataclass
class S3Server:
    """A running S3-compatible server: ``endpoint_url``, ``options`` (for ``adm.storage``) and
    ``env`` (the AWS variables a subprocess needs to reach it)."""

    endpoint_url: str
    options: S3Options
    env: dict[str, str]
    _counter = itertools.count()

    def new_bucket(self, prefix: str = "adm-test") -> str:
        """Create a fresh, empty bucket and return its name."""
        name = f"{prefix}-{next(self._counter)}-{os.getpid()}"
        s3_client(self.options).create_bucket(Bucket=name)
        return name


@contextlib.contextmanager
def running_s3_server():
    """A moto server process on a free loopback port, for the duration of the block."""
    port = free_port("127.0.0.1")
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
    }
    # The server logs a line per request to stderr. A pipe nobody drains fills after some
    # thousand requests and then blocks the server mid-response (every S3 call of the session
    # hangs from then on), so the log goes to a file, read back only if the server dies early.
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=log,
        env={**os.environ, **env},
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"moto server exited early: {log.read().decode(errors='replace')}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not listen on {endpoint} within 30 s")
                time.sleep(0.1)
        options = S3Options(endpoint_url=endpoint, region="us-east-1",
                            access_key="testing", secret_key="testing")
        yield S3Server(endpoint, options, env)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="session")
def s3_server():
    with running_s3_server() as server:
        yield server
