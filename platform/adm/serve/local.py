"""Run a Serve config file's application from Python, on the Ray this process is connected to
(what `serve run CONFIG` does, for a job that already holds a Ray: the quickstart).

    with run_config_app("serve_configs/local.yaml", {"base": "runs/x/model.pt"}) as url:
        requests.post(f"{url}/v1/generate", json={"class_id": 3})

The config's first application is built with `build` (its `args`, with `overrides` on top) and
its `deployments:` entries as the deployments' options, so autoscaling, replica resources and
request bounds are the file's own.
"""
from __future__ import annotations

import contextlib
import logging
import time
import urllib.error
import urllib.request
from typing import Iterator

import yaml

from ..runtime import free_port
from .app import build
from .settings import ServeSettings, load_settings


def wait_healthy(url: str, timeout_s: float = 300.0) -> None:
    """Poll GET /healthz until it answers 200 (the model replicas are up)."""
    deadline = time.time() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=10) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.time() > deadline:
            raise TimeoutError(f"{url}/healthz did not answer within {timeout_s:g} s")
        time.sleep(0.5)


@contextlib.contextmanager
def run_config_app(config: str, overrides: dict | None = None, host: str = "127.0.0.1",
                   port: int | None = None, log_level: str = "WARNING") -> Iterator[str]:
    """Serve the first application of the Serve config file `config`, with its `args`
    updated by `overrides`, on http://host:port (a free port by default); yields that URL once
    /healthz answers, and deletes the application and stops Serve afterwards. `log_level` is
    that of Serve's controller, proxy and replicas on the console (a job's terminal shows
    warnings; every line still goes to Serve's log files)."""
    from ray import serve

    with open(config) as f:
        spec = yaml.safe_load(f)["applications"][0]
    args = {**(spec.get("args") or {}), **(overrides or {})}
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"}
               for d in spec.get("deployments") or []}
    app = build(load_settings(ServeSettings.from_args(args)), options)
    port = port or free_port(host)
    logging_config = {"log_level": log_level}
    serve.start(http_options={"host": host, "port": port}, logging_config=logging_config)
    logging.getLogger("ray.serve").setLevel(log_level)  # this process's (Serve set it up)
    try:
        serve.run(app, name=spec["name"], route_prefix=spec.get("route_prefix", "/"),
                  logging_config=logging_config)
        url = f"http://{host}:{port}"
        wait_healthy(url)
        yield url
    finally:
        serve.shutdown()
