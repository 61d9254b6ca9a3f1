"""Serving (`adm.serve`) with real Ray Serve on the session's local Ray and real HTTP on
127.0.0.1: tiny random-weight models exported as training exports them (state dict +
flags.json + classes.json), the guided base sampler chained into the upsampler, every bad
request a 4xx naming its field, the API key, same seed -> same images whatever the batch, a
bounded load test that batches and autoscales, and the config files."""
from __future__ import annotations

import base64
import http.client
import importlib
import io
import json
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import yaml
from PIL import Image

from helpers import TINY_CLASSIFIER_FLAGS, TINY_UNET_FLAGS, export_random
from adm.compat import openai
from adm.config import ConfigError
from adm.diffusion import SAMPLERS, sample
from adm.diffusion.seeds import index_seeds
from adm.images import to_uint8
from adm.precision import AUTOCAST, auto_precision
from adm.serve import ServeSettings, build, build_app, load_settings
from adm.runtime import free_port
from adm.serve.api import api_key_from, authorized
from adm.stage import Job, Stage, run_batch

ROOT = Path(__file__).resolve().parents[1]
UPSAMPLER_FLAGS = {**{k: v for k, v in TINY_UNET_FLAGS.items() if k != "image_size"},
                   "large_size": 16, "small_size": 8}
CLASSES = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead", "electric ray",
           "stingray", "cock", "hen", "ostrich"]
APP, PREFIX = "adm", "/adm"
KEY = "test-key-9f2c"  # the keyed app's API key (a test value, in the replica's runtime env)
BATCH_KEY = "test-batch-key-41d7"  # its batch-only key

# The limits and batching of the test app, as `serve run ... key=value` hands them: strings.
ARGS = {"max_images": "4", "max_steps": "50", "samplers": "ddim,ddpm", "max_body_bytes": "8192",
        "max_guidance_scale": "10", "default_steps": "10", "upsampler_steps": "4",
        "upsampler_sampler": "ddim", "batch_rows": "8", "max_batch_requests": "8",
        "batch_wait_s": "0.2"}
# Small CPU shares: the session's Ray has 4 logical CPUs; the base scales 1 -> 3 under load, on
# the slots its engine's work fills (adm.serve.autoscaling), not on open requests.
POLICY = "adm.serve.autoscaling:QueuedWorkPolicy"
OPTIONS = {
    "GuidedSampler": {"ray_actor_options": {"num_cpus": 0.25}, "max_ongoing_requests": 16,
                      "autoscaling_config": {
                          "min_replicas": 1, "max_replicas": 3,
                          "upscale_delay_s": 0.5, "downscale_delay_s": 5,
                          "metrics_interval_s": 0.5, "look_back_period_s": 1,
                          "policy": {"policy_function": POLICY,
                                     "policy_kwargs": {"target_load": 1.0, "slots": 8}}}},
    "Upsampler": {"ray_actor_options": {"num_cpus": 0.25}, "max_ongoing_requests": 16},
    "Ingress": {"ray_actor_options": {"num_cpus": 0.1}},
}


# ---------------------------------------------------------------- shared with test_serve_page




def export_tiny_models(root: Path) -> dict:
    """The quickstart's layout (models/{diffusion,classifier,upsampler}/model.pt) with tiny
    8 px -> 16 px random-weight networks; class names beside the base model."""
    out = {"base": export_random(root / "diffusion", openai.create_model(TINY_UNET_FLAGS),
                           TINY_UNET_FLAGS, 1),
           "classifier": export_random(root / "classifier",
                                 openai.create_classifier(TINY_CLASSIFIER_FLAGS),
                                 TINY_CLASSIFIER_FLAGS, 2),
           "upsampler": export_random(root / "upsampler",
                                openai.create_superres_model(UPSAMPLER_FLAGS), UPSAMPLER_FLAGS, 3)}
    for name in ("diffusion", "classifier", "upsampler"):
        (root / name / "classes.json").write_text(json.dumps(CLASSES))
    return out


def wait_healthy(url: str, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if requests.get(f"{url}/healthz", timeout=10).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, f"{url}/healthz not ready after {timeout_s} s"
        time.sleep(0.5)


def start_serve(nets: dict, args: dict, options: dict, name: str, prefix: str,
                port: int | None = None) -> str:
    """Serve on loopback (started once per module) and the application `name` at `prefix`;
    returns its base URL once /healthz answers."""
    from ray import serve

    port = port or free_port("127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    loaded = load_settings(ServeSettings.from_args({**nets, **args}))
    serve.run(build(loaded, options), name=name, route_prefix=prefix, blocking=False)
    url = f"http://127.0.0.1:{port}{prefix.rstrip('/')}"
    wait_healthy(url)
    return url


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    return export_tiny_models(tmp_path_factory.mktemp("serve") / "models")


@pytest.fixture(scope="module")
def url(ray_session, nets):
    from ray import serve

    port = free_port("127.0.0.1")
    try:
        yield start_serve(nets, ARGS, OPTIONS, APP, PREFIX, port)
    finally:
        serve.shutdown()  # other test modules start from a Ray without Serve


def generate(url: str, body, headers=None, timeout=60) -> requests.Response:
    """POST /v1/generate; a streamed answer (body "stream": true) is read as it comes."""
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(f"{url}/v1/generate", data=data, timeout=timeout,
                         stream=isinstance(body, dict) and body.get("stream") is True,
                         headers={"Content-Type": "application/json", **(headers or {})})


# ---------------------------------------------------------------- the chain


def test_chain_returns_upsampled_images(url):
    r = generate(url, {"class_name": "goldfish", "num_images": 2, "seed": 5, "response": "json"})
    assert r.status_code == 200, r.text
    out = r.json()
    images = [decode(s) for s in out["images"]]
    base = [decode(s) for s in out["base_images"]]
    assert [im.shape for im in images] == [(16, 16, 3)] * 2  # the upsampler's large_size
    assert [im.shape for im in base] == [(8, 8, 3)] * 2
    assert out["seed"] == 5 and out["image_size"] == 16 and out["base_size"] == 8
    assert out["settings"] == {"class_id": 1, "class_name": "goldfish", "num_images": 2,
                               "guidance_scale": 1.0, "cfg_scale": 1.0, "sampler": "ddim",
                               "lambda_min": None, "guidance_interval": None,
                               "cache_interval": 1, "lambda_max": None, "quality": "default",
                               "steps": 10, "seed": 5, "upsample": True}
    # response "png" (the default): one PNG, the images side by side; seed in a header
    r = generate(url, {"class_id": 3, "num_images": 2, "seed": 1})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (32, 16)
    assert r.headers["X-ADM-Seed"] == "1"
    # without the upsampler: the base image
    r = generate(url, {"class_id": 3, "upsample": False, "seed": 1})
    assert Image.open(io.BytesIO(r.content)).size == (8, 8)


def test_models_and_health(url):
    info = requests.get(f"{url}/v1/models", timeout=10).json()
    assert info["class_names"] == CLASSES and info["num_classes"] == 10
    assert info["base"]["image_size"] == 8 and info["upsampler"]["image_size"] == 16
    assert info["limits"] == {"max_images": 4, "max_steps": 50, "samplers": ["ddim", "ddpm"],
                              "max_guidance_scale": 10.0, "max_body_bytes": 8192,
                              "max_previews": 10}
    assert info["scheduling"] == "step" and info["defaults"]["priority"] == "interactive"
    assert info["auth_required"] is False
    health = requests.get(f"{url}/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_served_images_are_the_library_samples(url, nets):
    """Image k of a request is, bit for bit, `adm.diffusion.sample` of (seed, k)'s index
    seeds as a padded model call of batch_rows rows (what the generation job computes for
    those indices), although the step engine ran it row by row."""
    seed, n = 11, 2
    out = generate(url, {"class_id": 4, "num_images": n, "seed": seed, "guidance_scale": 2.0,
                         "guidance_interval": [0.3, 5.0], "sampler": "ddpm", "steps": 6,
                         "cache_interval": 2, "response": "json"}).json()
    assert out["settings"]["guidance_interval"] == [0.3, 5.0]
    assert out["settings"]["cache_interval"] == 2
    base_net = openai.load_checkpoint(openai.create_model(TINY_UNET_FLAGS), nets["base"]).eval()
    clf = openai.load_checkpoint(openai.create_classifier(TINY_CLASSIFIER_FLAGS),
                                 nets["classifier"]).eval()
    pad = [0, 1] + [0] * 6  # free rows repeat the call's first input
    precision = AUTOCAST[auto_precision(torch.device("cpu"))]  # the replica's "auto"
    x = sample(base_net, openai.create_diffusion(TINY_UNET_FLAGS), (8, 3, 8, 8), sampler="ddpm",
               steps=6, classifier=clf, classifier_scale=2.0, guidance_interval=(0.3, 5.0),
               cache_interval=2, y=torch.full((8,), 4),
               seeds=[index_seeds(seed, range(n))[i] for i in pad], autocast_dtype=precision)
    want = to_uint8(x)[:n]
    got = np.stack([decode(s) for s in out["base_images"]])
    assert np.array_equal(got, want)


# ---------------------------------------------------------------- bad requests

BAD = [  # (body, status, text the message must contain)
    (b'{"class_id": 1,', 400, "body: malformed JSON"),
    (b"\xff\xfe{}", 400, "body: malformed JSON"),
    (b"[" * 3000, 400, "body: malformed JSON"),
    (b'{"class_id": ' + b"9" * 4400 + b"}", 400, "body: malformed JSON"),
    (b"[1, 2]", 422, "body: expected a JSON object"),
    (b'"hello"', 422, "body: expected a JSON object"),
    ({}, 422, "class_id or class_name"),
    ({"class_id": 1, "class_name": "hen"}, 422, "class_id or class_name"),
    ({"class_id": "1"}, 422, "class_id"),
    ({"class_id": 1.0}, 422, "class_id"),
    ({"class_id": True}, 422, "class_id"),
    ({"class_id": 10}, 422, "class_id: the model has 10 classes"),
    ({"class_id": -1}, 422, "class_id"),
    ({"class_id": 10**30}, 422, "class_id"),
    ({"class_name": "unicorn"}, 422, "class_name: unknown class name 'unicorn'"),
    ({"class_name": 7}, 422, "class_name"),
    ({"class_id": 1, "num_images": 5}, 422, "num_images: at most 4"),
    ({"class_id": 1, "num_images": 0}, 422, "num_images"),
    ({"class_id": 1, "num_images": "2"}, 422, "num_images"),
    ({"class_id": 1, "steps": 51}, 422, "steps: at most 50"),
    ({"class_id": 1, "steps": 10**12}, 422, "steps"),
    ({"class_id": 1, "steps": 30}, 422, "steps: timestep_respacing 'ddim30' on a 100-step"),
    ({"class_id": 1, "steps": 2.5}, 422, "steps"),
    ({"class_id": 1, "sampler": "euler"}, 422, "sampler: 'euler' is not one of ddim, ddpm"),
    ({"class_id": 1, "sampler": None, "response": "gif"}, 422, "response"),
    (b'{"class_id": 1, "guidance_scale": NaN}', 422, "guidance_scale: Input should be a finite"),
    (b'{"class_id": 1, "guidance_scale": Infinity}', 422, "guidance_scale"),
    (b'{"class_id": 1, "guidance_scale": -Infinity}', 422, "guidance_scale"),
    (b'{"class_id": 1, "guidance_scale": 1e999}', 422, "guidance_scale"),
    ({"class_id": 1, "guidance_scale": 11.0}, 422, "guidance_scale: at most 10"),
    ({"class_id": 1, "guidance_scale": -1}, 422, "guidance_scale"),
    ({"class_id": 1, "cfg_scale": 2.0}, 422, "cfg_scale: the base model was not trained with"),
    ({"class_id": 1, "guidance_scale": 2.0, "guidance_interval": [5, 1]}, 422,
     "guidance_interval: [5.0, 1.0]: expected [lo, hi]"),
    ({"class_id": 1, "guidance_scale": 2.0, "guidance_interval": [1]}, 422,
     "guidance_interval: List should have at least 2 items"),
    ({"class_id": 1, "guidance_scale": 2.0, "guidance_interval": [1, "2"]}, 422,
     "guidance_interval.1"),
    ({"class_id": 1, "guidance_scale": 0.0, "guidance_interval": [1, 2]}, 422,
     "guidance_interval: limits classifier guidance"),
    (b'{"class_id": 1, "cfg_scale": NaN}', 422, "cfg_scale"),
    ({"class_id": 1, "lambda_max": 1.0}, 422,
     "lambda_max: sets where dpmpp_2m's log-SNR grid ends; the ddim sampler takes none"),
    ({"class_id": 1, "cache_interval": 0}, 422, "cache_interval: Input should be greater than"),
    ({"class_id": 1, "cache_interval": 11}, 422, "cache_interval: Input should be less than"),
    ({"class_id": 1, "cache_interval": "2"}, 422, "cache_interval"),
    ({"class_id": 1, "cache_interval": 2.0}, 422, "cache_interval"),
    ({"class_id": 1, "quality": "ultra"}, 422, "quality: Input should be 'default' or 'fast'"),
    ({"class_id": 1, "quality": "fast"}, 422,  # this server's samplers are ddim and ddpm
     "quality: the fast preset samples with unipc, which is not one of this server's"),
    ({"class_id": 1, "seed": -3}, 422, "seed"),
    ({"class_id": 1, "seed": 2**64}, 422, "seed"),
    ({"class_id": 1, "upsample": "yes"}, 422, "upsample"),
    ({"class_id": 1, "num_image": 2}, 422, "num_image: Extra inputs are not permitted"),
    ({"class_id": 1, "pad": "x" * 9000}, 413, "body: 90"),
]


def test_bad_requests_get_4xx_naming_the_field(url):
    failures = []
    for body, status, text in BAD:
        r = generate(url, body)
        detail = r.json().get("detail", "") if r.headers.get("content-type", "").startswith(
            "application/json") else r.text
        if r.status_code != status or text not in detail:
            failures.append(f"{str(body)[:60]}: {r.status_code} {detail[:200]}")
    # Chunked (no Content-Length): refused while reading, not after.
    r = requests.post(f"{url}/v1/generate", data=(b"x" * 1024 for _ in range(64)), timeout=30)
    if r.status_code != 413 or "max_body_bytes" not in r.json()["detail"]:
        failures.append(f"chunked huge body: {r.status_code} {r.text[:200]}")
    r = requests.get(f"{url}/v1/generate", timeout=10)  # wrong method
    if r.status_code != 405:
        failures.append(f"GET /v1/generate: {r.status_code}")
    r = requests.put(f"{url}/v1/models", timeout=10)
    if r.status_code != 405:
        failures.append(f"PUT /v1/models: {r.status_code}")
    assert not failures, "\n".join(failures)
    # The replicas kept serving: a good request after all of them succeeds.
    r = generate(url, {"class_name": "hen", "seed": 2, "response": "json"})
    assert r.status_code == 200, r.text
    assert decode(r.json()["images"][0]).shape == (16, 16, 3)


# ---------------------------------------------------------------- over-limit bodies

MiB = 2**20


def _json_detail(status: int, payload: bytes) -> tuple[int, str]:
    """(status, the JSON error's detail); "" for a success's PNG."""
    return status, json.loads(payload).get("detail", "") if status >= 400 else ""


def post_slowly(url: str, size: int, content_type: str = "application/json",
                headers: dict | None = None, chunk: int = 256 * 1024) -> tuple[int, str]:
    """POST `size` bytes with Content-Length, a chunk at a time with a pause between, and read
    the answer only after the last byte (as requests and urllib do). A server that answers and
    closes before the body is in makes this client's next send fail with a reset, every time:
    the race of a fast client, made certain."""
    parts = urllib.parse.urlsplit(url)

    def body():
        for start in range(0, size, chunk):
            time.sleep(0.005)
            yield b" " * min(chunk, size - start)

    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    try:
        conn.request("POST", f"{parts.path}/v1/generate", body=body(), headers={
            "Content-Length": str(size), "Content-Type": content_type, **(headers or {})})
        r = conn.getresponse()
        return _json_detail(r.status, r.read())
    finally:
        conn.close()


def post_urllib(url: str, data: bytes, headers: dict | None = None) -> tuple[int, str]:
    """Plain urllib.request (no Expect: 100-continue; its default form content type)."""
    request = urllib.request.Request(f"{url}/v1/generate", data=data, method="POST",
                                     headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return _json_detail(r.status, r.read())
    except urllib.error.HTTPError as e:
        return _json_detail(e.code, e.read())


def test_over_limit_bodies_get_their_413_from_any_client(url):
    """Bodies past max_body_bytes (8 KiB here) are read to their end and answered 413 naming
    the limit, whichever client sends them; the server keeps serving."""
    failures = []
    for size in (20 * 1024, 8 * MiB, 40 * MiB):
        data = b" " * size
        r = requests.post(f"{url}/v1/generate", data=data, timeout=120,
                          headers={"Content-Type": "application/json"})
        results = {"requests": (r.status_code, r.json().get("detail", "")),
                   "urllib": post_urllib(url, data),
                   "slow sender": post_slowly(url, size)}
        for client, (status, detail) in results.items():
            if status != 413 or "max_body_bytes (8192)" not in detail or str(size) not in detail:
                failures.append(f"{client}, {size} bytes: {status} {detail[:200]}")
    assert not failures, "\n".join(failures)
    # Past the drain cap the 413 goes out at once, from the declared length alone.
    conn = http.client.HTTPConnection("127.0.0.1", urllib.parse.urlsplit(url).port, timeout=30)
    conn.putrequest("POST", f"{PREFIX}/v1/generate")
    conn.putheader("Content-Length", str(65 * MiB))
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and "max_body_bytes" in json.loads(r.read())["detail"]
    conn.close()
    r = generate(url, {"class_name": "hen", "seed": 2, "upsample": False})
    assert r.status_code == 200, r.text


def test_a_body_that_is_not_json_gets_415(url):
    for content_type in ("text/plain", "application/x-www-form-urlencoded",
                         "multipart/form-data; boundary=x"):
        status, detail = post_urllib(url, b'{"class_id": 1}', {"Content-Type": content_type})
        assert status == 415 and detail.startswith("content-type: expected application/json")
        assert content_type.split(";")[0] in detail
    # Sent slowly, the body is read to its end before the answer.
    status, detail = post_slowly(url, 6000, content_type="text/plain", chunk=1000)
    assert status == 415 and "text/plain" in detail
    # Over max_body_bytes as well: the size is refused first.
    status, detail = post_slowly(url, 4 * MiB, content_type="text/plain")
    assert status == 413 and "max_body_bytes" in detail
    for content_type in ("application/json", "application/json; charset=utf-8",
                         "application/vnd.api+json"):
        status, _ = post_urllib(url, b'{"class_id": 1, "upsample": false}',
                                {"Content-Type": content_type})
        assert status == 200, content_type


# ---------------------------------------------------------------- API key


def test_api_key(url, nets):
    """A second application whose ingress has a key in its environment: /v1/* needs it."""
    from ray import serve

    args = {"max_images": "2", "api_key_env": "ADM_TEST_SERVE_KEY", "default_steps": "4",
            "batch_rows": "4", "batch_api_key_env": "ADM_TEST_BATCH_KEY"}
    options = {"GuidedSampler": {"ray_actor_options": {"num_cpus": 0.1}},
               "Ingress": {"ray_actor_options": {"num_cpus": 0.1, "runtime_env": {
                   "env_vars": {"ADM_TEST_SERVE_KEY": KEY, "ADM_TEST_BATCH_KEY": BATCH_KEY}}}}}
    loaded = load_settings(ServeSettings.from_args({"base": nets["base"], **args}))
    serve.run(build(loaded, options), name="keyed", route_prefix="/keyed", blocking=False)
    keyed = url.replace(PREFIX, "/keyed")
    wait_healthy(keyed)  # /healthz is open: load balancers probe it
    try:
        body = {"class_id": 2, "seed": 1}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                        {"Authorization": f"Basic {KEY}"}, {"Authorization": "Bearer "}):
            r = generate(keyed, body, headers)
            assert r.status_code == 401, (headers, r.status_code)
            assert r.headers["WWW-Authenticate"] == "Bearer"
            assert "authorization" in r.json()["detail"]
        assert requests.get(f"{keyed}/v1/models", timeout=10).status_code == 401
        # the key is checked before the body: a bad body without it is still a 401
        assert generate(keyed, b"{", {"Authorization": "Bearer no"}).status_code == 401
        # ... and so is a large one, sent in full before the client reads (no reset)
        status, detail = post_slowly(keyed, 8 * MiB)
        assert status == 401 and "authorization" in detail
        r = generate(keyed, body, {"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (8, 8)
        info = requests.get(f"{keyed}/v1/models", timeout=10,
                            headers={"Authorization": f"Bearer {KEY}"}).json()
        assert info["auth_required"] is True and info["upsampler"] is None
        # The batch-only key: its requests run as batch; asking for interactive is a 403.
        batch = {"Authorization": f"Bearer {BATCH_KEY}"}
        json_body = {**body, "response": "json"}
        assert generate(keyed, json_body, batch).json()["priority"] == "batch"
        assert generate(keyed, {**json_body, "priority": "batch"}, batch).status_code == 200
        r = generate(keyed, {**json_body, "priority": "interactive"}, batch)
        assert r.status_code == 403 and r.json()["errors"] == [
            {"field": "priority", "message": "this API key may only make batch requests "
                                             "(priority: batch)"}]
        full = {"Authorization": f"Bearer {KEY}"}
        assert generate(keyed, json_body, full).json()["priority"] == "interactive"
    finally:
        serve.delete("keyed")


def test_a_full_queue_answers_503_at_once_and_keeps_serving(url, nets):
    """An application whose ingress takes 1 request with 1 queued: of 8 concurrent requests
    the overflow gets Serve's 503 at once (no other 5xx, no wait for the queue), the rest
    200; afterwards it serves again. The configs bound the queue the same way."""
    from ray import serve

    args = {"max_images": "1", "default_steps": "20", "batch_rows": "1"}
    options = {"GuidedSampler": {"ray_actor_options": {"num_cpus": 0.1}},
               "Ingress": {"ray_actor_options": {"num_cpus": 0.1}, "max_ongoing_requests": 1,
                           "max_queued_requests": 1}}
    loaded = load_settings(ServeSettings.from_args({"base": nets["base"], **args}))
    serve.run(build(loaded, options), name="tight", route_prefix="/tight", blocking=False)
    tight = url.replace(PREFIX, "/tight")
    wait_healthy(tight)
    try:
        def one(i: int):
            t = time.monotonic()
            r = generate(tight, {"class_id": i % 10, "seed": i}, timeout=120)
            return r.status_code, time.monotonic() - t

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(8)))
        codes = sorted(c for c, _ in results)
        assert set(codes) == {200, 503} and codes.count(200) >= 2, codes
        served = max(t for c, t in results if c == 200)
        assert all(t < served for c, t in results if c == 503), results  # refused at once
        assert generate(tight, {"class_id": 1, "seed": 1}).status_code == 200
    finally:
        serve.delete("tight")
    for name in ("local", "imagenet256", "imagenet512"):
        config = yaml.safe_load((ROOT / "serve_configs" / f"{name}.yaml").read_text())
        ingress = next(d for d in config["applications"][0]["deployments"]
                       if d["name"] == "Ingress")
        assert 0 < ingress["max_queued_requests"] <= 256, (name, ingress)


def test_api_key_comes_from_the_environment_and_can_be_required():
    assert api_key_from({"K": "s3cret"}, "K", required=True) == "s3cret"
    assert api_key_from({"K": ""}, "K", required=False) is None
    with pytest.raises(RuntimeError, match=r"require_api_key is set but \$K is empty"):
        api_key_from({}, "K", required=True)
    assert authorized("Bearer s3cret", "s3cret") and authorized(None, None)
    assert not authorized("Bearer s3cre", "s3cret") and not authorized(None, "s3cret")


# ---------------------------------------------------------------- same seed, same images


def test_same_seed_same_images_alone_or_batched(url):
    want = {"class_name": "stingray", "num_images": 3, "seed": 42, "guidance_scale": 3.0,
            "response": "json"}
    alone = generate(url, want).json()
    others = [{"class_id": c, "num_images": 2, "seed": 100 + c, "guidance_scale": 3.0,
               "response": "json"} for c in range(5)]
    shared = []
    for _ in range(3):  # until it shares a batch (requests may land on different replicas)
        with ThreadPoolExecutor(6) as pool:
            together = list(pool.map(lambda b: generate(url, b).json(), [*others, want]))[-1]
        assert together["images"] == alone["images"]
        assert together["base_images"] == alone["base_images"]
        assert together["settings"] == alone["settings"]
        shared.append(together["batch"]["base"]["requests"])
        if shared[-1] > 1:
            break
    assert max(shared) > 1, shared  # it was batched with others, and came out the same
    other_seed = generate(url, {**want, "seed": 43}).json()
    assert other_seed["images"] != alone["images"]
    # different settings in one batch are grouped, not mixed
    mixed = [{**want, "steps": 5}, want, {**want, "guidance_scale": 0.0}]
    with ThreadPoolExecutor(3) as pool:
        res = list(pool.map(lambda b: generate(url, b).json(), mixed))
    assert res[1]["images"] == alone["images"]
    assert res[0]["images"] != alone["images"] and res[2]["images"] != alone["images"]


# ---------------------------------------------------------------- the step engine over HTTP

# One replica per model stage with 4 slots, so its engine's counters are the whole story.
ENGINE_ARGS = {**ARGS, "batch_rows": "4", "max_steps": "100", "samplers": "ddim,ddpm,dpmpp_2m",
               "max_previews": "5"}
ENGINE_OPTIONS = {"GuidedSampler": {"ray_actor_options": {"num_cpus": 0.25}, "num_replicas": 1},
                  "Upsampler": {"ray_actor_options": {"num_cpus": 0.25}, "num_replicas": 1},
                  "Ingress": {"ray_actor_options": {"num_cpus": 0.1}}}


@pytest.fixture(scope="module")
def engine_url(url, nets):
    """A second application on the module's Serve: one replica per stage, 4 slots each."""
    from ray import serve

    loaded = load_settings(ServeSettings.from_args({**nets, **ENGINE_ARGS}))
    serve.run(build(loaded, ENGINE_OPTIONS), name="eng", route_prefix="/eng", blocking=False)
    engine = url.replace(PREFIX, "/eng")
    wait_healthy(engine)
    try:
        yield engine
    finally:
        serve.delete("eng")


def engine_stats(stage: str) -> dict:
    """The `adm.engine.Stats` of the "eng" app's only replica of `stage`."""
    from ray import serve

    return serve.get_deployment_handle(stage, app_name="eng").stats.remote().result()


def read_events(response: requests.Response, stop=None):
    """The (event, data) pairs of a text/event-stream answer, as a browser's EventSource
    frames them (an `event:` line, a `data:` line of JSON, a blank line); `stop(event, data)`
    ends the read early."""
    events, kind = [], None
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            kind = line[len("event: "):]
        elif line.startswith("data: "):
            events.append((kind, json.loads(line[len("data: "):])))
            if stop is not None and stop(*events[-1]):
                break
        else:
            assert line == "", line
    return events


def test_stream_sends_progress_previews_and_the_json_answer(engine_url):
    body = {"class_id": 6, "num_images": 2, "seed": 21, "steps": 20, "sampler": "dpmpp_2m",
            "guidance_scale": 2.0, "response": "json"}
    want = generate(engine_url, body).json()
    r = generate(engine_url, {**body, "stream": True, "preview_every": 5})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = read_events(r)
    kinds = [k for k, _ in events]
    assert kinds[-1] == "result" and "error" not in kinds
    progress = [(d["stage"], d["step"], d["steps"]) for k, d in events if k == "progress"]
    base = [p for p in progress if p[0] == "base"]
    assert base[-1][1] == base[-1][2] and progress[-1] == ("upsample", 4, 4)
    assert [p[1] for p in base] == sorted(p[1] for p in base)  # monotonic
    assert progress.index(base[-1]) < progress.index(progress[-1])  # base, then the upsampler
    previews = [d for k, d in events if k == "preview"]
    assert [(d["stage"], d["step"]) for d in previews if d["stage"] == "base"] == [
        ("base", 5), ("base", 10), ("base", 15)]
    assert all(decode(im).shape == ((8, 8, 3) if d["stage"] == "base" else (16, 16, 3))
               for d in previews for im in d["images"])
    assert all(len(d["images"]) == 2 for d in previews)
    result = events[-1][1]
    for key in ("images", "base_images", "settings", "seed", "image_size", "base_size"):
        assert result[key] == want[key], key  # the same JSON as response: json, same bits
    too_many = generate(engine_url, {**body, "stream": True, "preview_every": 2})
    assert too_many.status_code == 422 and "preview_every" in too_many.json()["detail"]
    not_streamed = generate(engine_url, {**body, "preview_every": 5})
    assert not_streamed.status_code == 422 and "stream" in not_streamed.json()["detail"]


def wait_until(condition, timeout_s: float = 30.0):
    """Poll `condition()` (engine counters, not a sleep of a guessed length) until truthy."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
    return value


def test_a_client_that_leaves_frees_its_rows_at_the_next_step(engine_url):
    """Streaming or not, a client that disconnects takes its rows out of the engine within a
    step or two of leaving (the counters say so: the engine's steps between the close and the
    rows' leaving), nothing of it finishes, and the upsampler never starts it."""
    long = {"class_id": 2, "num_images": 4, "seed": 3, "steps": 100, "sampler": "ddpm",
            "guidance_scale": 2.0, "response": "json"}
    for streamed in (True, False):
        base0, up0 = engine_stats("GuidedSampler"), engine_stats("Upsampler")
        if streamed:
            r = generate(engine_url, {**long, "stream": True}, timeout=60)
            read_events(r, stop=lambda kind, data: kind == "progress")
        else:
            worker = threading.Thread(target=lambda: pytest.raises(
                requests.exceptions.ReadTimeout, generate, engine_url, long, timeout=1.0))
            worker.start()
        running = wait_until(lambda: (s := engine_stats("GuidedSampler"))["in_flight"][
            "interactive"] == 4 and s)
        if streamed:
            r.close()  # the client goes away mid-stream
        else:
            worker.join()  # its read timed out and it closed the connection
        at_close = engine_stats("GuidedSampler")
        after = wait_until(lambda: (s := engine_stats("GuidedSampler"))["in_flight"][
            "interactive"] == 0 and s)
        mode, steps = "stream" if streamed else "plain", after["steps"] - at_close["steps"]
        print(f"\ncancel ({mode}): {steps} engine steps after the close, step "
              f"{at_close['last_step_s'] * 1000:.0f} ms")
        assert after["steps"] - at_close["steps"] <= 2
        assert after["steps"] - running["steps"] < 100 - 1  # it did not run to its end
        assert after["rows_cancelled"] - base0["rows_cancelled"] == 4
        assert after["requests_cancelled"] - base0["requests_cancelled"] == 1
        assert after["images"] == base0["images"]
        assert engine_stats("Upsampler")["steps"] == up0["steps"]  # never started there
    ok = generate(engine_url, {"class_id": 1, "seed": 1, "response": "json"})
    assert ok.status_code == 200  # and it keeps serving


def test_interactive_requests_overtake_batch_work(engine_url):
    """A batch request holding every slot is paused for an interactive one, which finishes
    first; the batch request then finishes with the images it has alone."""
    bulk = {"class_id": 5, "num_images": 4, "seed": 8, "steps": 100, "sampler": "ddim",
            "upsample": False, "response": "json", "priority": "batch"}
    alone = generate(engine_url, bulk, timeout=120).json()
    before = engine_stats("GuidedSampler")
    done = {}

    def run(name, body):
        done[name] = (generate(engine_url, body, timeout=120).json(), time.monotonic())

    worker = threading.Thread(target=run, args=("bulk", bulk))
    worker.start()
    wait_until(lambda: engine_stats("GuidedSampler")["in_flight"]["batch"] == 4)
    run("now", {"class_id": 1, "steps": 10, "seed": 2, "upsample": False, "response": "json"})
    worker.join()
    assert done["now"][1] < done["bulk"][1]
    assert engine_stats("GuidedSampler")["preemptions"] - before["preemptions"] >= 1
    assert done["bulk"][0]["images"] == alone["images"]


def scrape(metrics_url: str) -> dict:
    """The "eng" app's adm_* samples from Ray's Prometheus endpoint: {(name, labels): value},
    labels a sorted tuple of the pairs that tell series apart (stage, class, status, le)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(metrics_url, timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ray_adm_") and sample.labels.get("application") == "eng":
                keep = tuple(sorted((k, v) for k, v in sample.labels.items()
                                    if k in ("stage", "class", "status", "le")))
                out[(sample.name, keep)] = out.get((sample.name, keep), 0.0) + sample.value
    return out


def total(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, keep), v in samples.items()
               if n == name and all((k, v2) in keep for k, v2 in labels.items()))


GRAFANA = ROOT / "deploy" / "grafana" / "adm-serve.json"


def test_metrics_move_under_load_and_the_dashboard_charts_them(engine_url, metrics_url):
    """Ray's Prometheus endpoint (the session Ray exports it, reported every second) shows each
    engine and ingress metric moving under a load that queues, pauses and cancels work; every
    series the Grafana dashboard queries is one of them."""
    seen, stop = [], threading.Event()

    def scraper():
        while not stop.is_set():
            seen.append(scrape(metrics_url))
            time.sleep(0.2)

    before = scrape(metrics_url)
    watcher = threading.Thread(target=scraper, daemon=True)
    watcher.start()
    bulk = {"class_id": 5, "num_images": 4, "seed": 8, "steps": 100, "upsample": False,
            "response": "json", "priority": "batch"}
    with ThreadPoolExecutor(3) as pool:
        jobs = [pool.submit(generate, engine_url, bulk, None, 120)]
        wait_until(lambda: engine_stats("GuidedSampler")["in_flight"]["batch"] == 4)
        # It pauses the batch rows; 100 steps keep its rows in flight across several of the
        # replica's metric exports (every 0.5 s) on a fast machine too.
        jobs.append(pool.submit(generate, engine_url, {
            "class_id": 1, "num_images": 4, "steps": 100, "response": "json"}, None, 120))
        r = generate(engine_url, {"class_id": 2, "steps": 50, "stream": True}, timeout=60)
        read_events(r, stop=lambda kind, data: kind in ("progress", "queued"))
        r.close()  # a cancelled request
        assert all(j.result().status_code == 200 for j in jobs)
    final = wait_until(lambda: (s := scrape(metrics_url)) and total(
        s, "ray_adm_requests_cancelled_total") > total(before, "ray_adm_requests_cancelled_total")
        and total(s, "ray_adm_images_total", stage="upsample") > total(
            before, "ray_adm_images_total", stage="upsample") and s)
    stop.set()
    watcher.join(5)
    peak = lambda name, **labels: max(total(x, name, **labels) for x in seen)  # noqa: E731
    assert peak("ray_adm_rows_in_flight", stage="base", **{"class": "batch"}) >= 2
    assert peak("ray_adm_rows_in_flight", stage="base", **{"class": "interactive"}) >= 1
    assert peak("ray_adm_rows_queued", stage="base") >= 1
    assert peak("ray_adm_slots_used", stage="base") == 4
    assert total(final, "ray_adm_slots", stage="base") == 4
    for name in ("ray_adm_engine_steps_total", "ray_adm_row_steps_total", "ray_adm_images_total",
                 "ray_adm_step_seconds_count", "ray_adm_rows_cancelled_total",
                 "ray_adm_requests_cancelled_total", "ray_adm_preemptions_total"):
        assert total(final, name, stage="base") > total(before, name, stage="base"), name
    for name in ("ray_adm_first_progress_seconds_count", "ray_adm_requests_total"):
        assert total(final, name) > total(before, name), name
    assert total(final, "ray_adm_requests_total", status="cancelled") > total(
        before, "ray_adm_requests_total", status="cancelled")
    # The dashboard: valid JSON whose every query names only series seen here.
    dashboard = json.loads(GRAFANA.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    names = {n for n, _ in final}
    queried = {m for e in exprs for m in re.findall(r"ray_adm_[a-z_]+", e)}
    assert queried and queried <= names, queried - names
    assert {"ray_adm_rows_queued", "ray_adm_rows_in_flight", "ray_adm_step_seconds_bucket",
            "ray_adm_first_progress_seconds_bucket", "ray_adm_requests_cancelled_total",
            "ray_adm_images_total", "ray_adm_engine_steps_total"} <= queried


# ---------------------------------------------------------------- load


def test_load_batches_and_scales_without_5xx(url):
    """60 requests from 12 concurrent clients (loopback): no 5xx, base batches of more than
    one request, and the base deployment above its minimum of 1 replica: 12 rows on 8 slots
    is a load of 1.5 (QueuedWorkPolicy; a replica that reports no load is not scaled)."""
    from ray import serve

    replicas, running, stop = [], [], threading.Event()

    def watch():
        while not stop.is_set():
            states = serve.status().applications[APP].deployments["GuidedSampler"].replica_states
            # replicas the autoscaler started (a new one may still be loading torch on 2 cores)
            replicas.append(sum(n for state, n in states.items() if state != "STOPPING"))
            running.append(states.get("RUNNING", 0))
            time.sleep(0.25)

    def one(i: int):
        t = time.monotonic()
        r = generate(url, {"class_id": i % 10, "seed": i, "steps": 20, "response": "json"},
                     timeout=120)
        return r.status_code, (r.json()["batch"] if r.status_code == 200 else None), \
            time.monotonic() - t

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.monotonic()
    try:
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(one, range(60)))
    finally:
        stop.set()
        watcher.join(5)
    elapsed = time.monotonic() - start
    codes = [c for c, _, _ in results]
    sizes = [b["base"]["requests"] for _, b, _ in results if b]
    latencies = sorted(t for _, _, t in results)
    print(f"\nload: 60 requests in {elapsed:.1f} s; base batch sizes seen {sorted(set(sizes))}; "
          f"GuidedSampler replicas max {max(replicas)} ({max(running)} RUNNING); p50 "
          f"{latencies[30]:.2f} s, p95 {latencies[56]:.2f} s")
    assert all(c < 500 for c in codes), codes
    assert codes.count(200) == 60, codes
    assert max(sizes) > 1, sizes
    assert max(replicas) > 1, replicas
    assert elapsed < 120


# ---------------------------------------------------------------- batching (no Ray)


def test_queued_work_policy_counts_slots_not_requests():
    """The autoscaling policy: the replicas' reported loads (slots wanted over slots had) and
    Serve's own queue, over the target load; before any report it keeps the current count."""
    from types import SimpleNamespace

    from adm.engine import Stats
    from adm.serve.autoscaling import LOAD_METRIC, QueuedWorkPolicy, replica_load

    stats = Stats(slots=8, slots_used=8, queued_slots=12)
    assert replica_load(stats) == 2.5
    policy = QueuedWorkPolicy(target_load=1.0, slots=8)

    def ctx(loads, queued=0, current=1):
        return SimpleNamespace(aggregated_metrics={LOAD_METRIC: loads} if loads else {},
                               total_queued_requests=queued, current_num_replicas=current)

    assert policy(ctx({"a": 2.5}))[0] == 3
    assert policy(ctx({"a": 1.0, "b": 0.5}))[0] == 2
    assert policy(ctx({"a": 1.0}))[0] == 1  # exactly full: no extra replica
    assert policy(ctx({"a": 1.0}, queued=8))[0] == 2  # 8 requests queued in Serve: one more
    assert policy(ctx({"a": 0.0, "b": 0.0}, current=2))[0] == 0  # Serve clamps to min
    assert policy(ctx({}, current=2)) == (2, {})
    assert QueuedWorkPolicy(target_load=0.5)(ctx({"a": 1.0}))[0] == 2
    with pytest.raises(ValueError):
        QueuedWorkPolicy(target_load=0)


def test_cfg_scale_and_dpm_solver_requests_are_checked():
    """Without Serve: a base trained with label dropout takes cfg_scale up to max_cfg_scale
    (a sample() keyword, so it batches apart); DPM-Solver++ takes any step count."""
    from helpers import api_limits
    from adm.serve.api import RequestError, parse_generate

    lim = api_limits()
    req = parse_generate(b'{"class_id": 2, "cfg_scale": 3.0, "sampler": "dpmpp_2m", '
                         b'"steps": 7}', lim)
    # dpmpp_2m's grid starts at λ = -5.1 unless lambda_min says otherwise (a batching key too)
    assert req.sample_args() == {"classifier_scale": 0.0, "cfg_scale": 3.0,
                                 "sampler": "dpmpp_2m", "steps": 7, "lambda_min": -5.1,
                                 "guidance_interval": None, "cache_interval": 1,
                                 "lambda_max": None}
    req = parse_generate(b'{"class_id": 2, "sampler": "dpmpp_2m", "lambda_min": -3.5}', lim)
    assert req.sample_args()["lambda_min"] == -3.5 and req.settings()["lambda_min"] == -3.5
    for body, text in ((b'{"class_id": 2, "lambda_min": -3.0}', "lambda_min: sets where "
                        "dpmpp_2m's log-SNR grid starts; the ddim sampler takes none"),
                       (b'{"class_id": 2, "sampler": "dpmpp_2m", "lambda_min": -21}',
                        "lambda_min: Input should be greater than or equal to -20"),
                       (b'{"class_id": 2, "sampler": "dpmpp_2m", "lambda_min": 0.5}',
                        "lambda_min: Input should be less than or equal to 0"),
                       (b'{"class_id": 2, "sampler": "dpmpp_2m", "lambda_min": NaN}',
                        "lambda_min: Input should be a finite number"),
                       (b'{"class_id": 2, "sampler": "dpmpp_2m", "lambda_min": "-3"}',
                        "lambda_min: Input should be a valid number"),
                       (b'{"class_id": 2, "sampler": "dpmpp_2m", "lambda_min": -3, '
                        b'"lambda_max": -4}', "lambda_max: -4.0 is not above lambda_min (-3.0)"),
                       (b'{"class_id": 2, "sampler": "dpmpp_2m", "lambda_max": 21}',
                        "lambda_max: Input should be less than or equal to 20")):
        with pytest.raises(RequestError) as e:
            parse_generate(body, lim)
        assert e.value.status == 422 and text in str(e.value), (body, str(e.value))
    with pytest.raises(RequestError, match="cfg_scale: at most 5.0"):
        parse_generate(b'{"class_id": 2, "cfg_scale": 6.0}', lim)
    with pytest.raises(RequestError, match="steps: timestep_respacing 'ddim30' on a 100-step"):
        parse_generate(b'{"class_id": 2, "sampler": "ddim", "steps": 30}', lim)
    assert parse_generate(b'{"class_id": 2, "sampler": "dpmpp_2m", "steps": 30}', lim).steps == 30


def test_run_batch_groups_by_settings_and_pads(monkeypatch):
    """Each settings group runs in model calls of exactly `rows` rows, the free rows repeating
    the call's first input; outputs go back to their jobs in order; a job's rows do not depend
    on the other jobs."""
    import adm.stage

    calls = []

    def fake_sample(net, diffusion, shape, *, steps, y, seeds, **kwargs):
        calls.append((steps, shape[0], list(seeds)))
        # a row's "image" is its seed and label: visible if rows were mixed up
        v = torch.tensor([s % 251 + int(lab) for s, lab in zip(seeds, y)], dtype=torch.float32)
        return ((v + 0.5) / 127.5 - 1).view(-1, 1, 1, 1).expand(-1, 3, 1, 1)

    monkeypatch.setattr(adm.stage, "sample", fake_sample)
    jobs = [Job.make({"steps": 10}, [1, 1], [5, 6]), Job.make({"steps": 20}, [2], [7]),
            Job.make({"steps": 10}, [3, 3, 3], [8, 9, 10])]
    out = run_batch(Stage(net=None, diffusion=None, size=1, rows=4), jobs)
    # 5 rows of steps=10 -> two calls of 4, the second padded with its first (only) row
    assert calls == [(10, 4, [5, 6, 8, 9]), (10, 4, [10] * 4), (20, 4, [7] * 4)]
    for job, o in zip(jobs, out):
        want = [s % 251 + lab for s, lab in zip(job.seeds, job.labels)]
        assert o.images[:, 0, 0, 0].tolist() == want
        assert (o.batch_requests, o.batch_images, o.groups) == (3, 6, 2)


# ---------------------------------------------------------------- settings and config files


def _config(name: str) -> dict:
    return yaml.safe_load((ROOT / "serve_configs" / name).read_text())


@pytest.mark.parametrize("name", ["local.yaml", "imagenet256.yaml", "imagenet512.yaml"])
def test_config_files_parse(name):
    """Serve's own schema accepts each file; its args build valid settings; every deployment
    has autoscaling (min, max, delays; the model stages on QueuedWorkPolicy with their slots),
    ray_actor_options and max_ongoing_requests."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    raw = _config(name)
    schema = ServeDeploySchema.model_validate(raw)
    (app,) = schema.applications
    assert app.import_path == "adm.serve:build_app"
    settings = ServeSettings.from_args(app.args)
    assert set(settings.samplers) <= set(SAMPLERS)
    # never a key in the file: only the NAME of the variable that holds it
    assert not {"api_key", "key", "token"} & set(app.args)
    assert settings.api_key_env == "ADM_SERVE_API_KEY"
    names = {d.name for d in app.deployments}
    assert {"GuidedSampler", "Ingress"} <= names
    assert ("Upsampler" in names) == bool(settings.upsampler)
    for dep in raw["applications"][0]["deployments"]:
        assert {"ray_actor_options", "max_ongoing_requests"} <= set(dep), dep["name"]
        assert "num_cpus" in dep["ray_actor_options"], dep["name"]
        auto = dep["autoscaling_config"]
        assert {"min_replicas", "max_replicas", "upscale_delay_s",
                "downscale_delay_s"} <= set(auto), dep["name"]
        if dep["name"] == "Ingress":
            assert "target_ongoing_requests" in auto
            continue
        # A model stage scales on the slots its engine's work fills, with its own slot count;
        # it takes more requests than it has slots, so that work waits in the engine.
        slots = settings.batch_rows if dep["name"] == "GuidedSampler" else (
            settings.upsampler_batch_rows or settings.batch_rows)
        parsed = AutoscalingConfig(**auto)
        assert parsed.policy.policy_function == POLICY, dep["name"]
        assert parsed.policy.policy_kwargs == {"target_load": 1.0, "slots": slots}
        module, _, attribute = POLICY.partition(":")
        assert callable(getattr(importlib.import_module(module), attribute))
        assert dep["max_ongoing_requests"] >= 4 * slots, dep["name"]
    assert settings.scheduling == "step"
    gpu = name != "local.yaml"
    for dep in raw["applications"][0]["deployments"]:
        if dep["name"] != "Ingress":
            assert (dep["ray_actor_options"].get("num_gpus", 0) == 1) == gpu, dep["name"]
    host = raw["http_options"]["host"]
    assert host == "127.0.0.1" if not settings.require_api_key else host == "0.0.0.0"


@pytest.mark.parametrize("name,missing,how", [
    ("local.yaml", "runs/quickstart/models/diffusion/model.pt", "make quickstart"),
    ("imagenet512.yaml", "models/128x128_diffusion.pt",
     "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/128x128_diffusion.pt"),
    ("imagenet256.yaml", "models/256x256_diffusion.pt",
     "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion.pt"),
])
def test_config_without_models_fails_at_startup_naming_the_file(name, missing, how, tmp_path,
                                                                 monkeypatch):
    """The builder Serve calls for the file (in an empty working directory)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        build_app(_config(name)["applications"][0]["args"])
    assert str(tmp_path / missing) in str(e.value) and how in str(e.value)


def test_local_config_builds_from_the_quickstart_layout(tmp_path, monkeypatch):
    """local.yaml's args against models in the quickstart's layout: the builder resolves all
    three and gives the app of the three deployments."""
    export_tiny_models(tmp_path / "runs" / "quickstart" / "models")
    monkeypatch.chdir(tmp_path)
    app = build_app(_config("local.yaml")["applications"][0]["args"])
    from ray.serve._private.build_app import build_app as serve_build

    names = {d.name for d in serve_build(app, name="x").deployments}
    assert names == {"GuidedSampler", "Upsampler", "Ingress"}


def test_cli_arguments_are_cast_and_checked(nets):
    s = ServeSettings.from_args({"base": nets["base"], "max_images": "3", "samplers": "ddim",
                                 "default_sampler": "ddim", "max_guidance_scale": "2.5",
                                 "upsampler_steps": "ddim4", "require_api_key": "true"})
    assert (s.max_images, s.samplers, s.max_guidance_scale, s.upsampler_steps,
            s.require_api_key) == (3, ("ddim",), 2.5, "ddim4", True)
    for bad, field in [({"max_images": "many"}, "max_images"), ({"samplers": "euler"},
                       "samplers"), ({"colour": "red"}, "colour"), ({"base": ""}, "base"),
                       ({"default_sampler": "ddpm", "samplers": "ddim"}, "default_sampler"),
                       ({"precision": "fp8"}, "precision")]:
        with pytest.raises(ConfigError, match=field):
            ServeSettings.from_args({"base": nets["base"], **bad})


def test_the_fast_quality_preset_fills_in_what_a_request_leaves_out():
    """Without Serve: quality "fast" sets the preset's sampler, steps, grid start, guidance
    interval (guided requests only) and cache interval (adm.diffusion.quality.FAST), each one
    a request gives still wins; the default sets nothing; a preset the server's samplers or
    max_steps cannot run is a 422 naming quality."""
    from helpers import api_limits
    from adm.checkpoints import ModelSpec
    from adm.diffusion.quality import FAST
    from adm.serve.api import RequestError, parse_generate

    lim = api_limits(samplers=("ddim", "unipc"), has_classifier=True, has_null_class=False,
                     default_steps=25, default_guidance_scale=2.0,
                     base=ModelSpec("model", "m.pt", "diffusion", {"diffusion_steps": 1000}, ""))
    args = parse_generate(b'{"class_id": 2, "quality": "fast"}', lim).sample_args()
    interval = None if FAST["guidance_interval"] is None else tuple(FAST["guidance_interval"])
    assert args == {"classifier_scale": 2.0, "cfg_scale": 1.0, "sampler": FAST["sampler"],
                    "steps": FAST["steps"], "lambda_min": FAST["lambda_min"],
                    "lambda_max": FAST["lambda_max"], "guidance_interval": interval,
                    "cache_interval": FAST["cache_interval"]}
    unguided = parse_generate(b'{"class_id": 2, "quality": "fast", "guidance_scale": 0}',
                              lim).sample_args()
    assert unguided["guidance_interval"] is None and unguided["steps"] == FAST["steps"]
    mine = parse_generate(b'{"class_id": 2, "quality": "fast", "steps": 9, "cache_interval": 1, '
                          b'"guidance_interval": [0.5, 3.0]}', lim).sample_args()
    assert (mine["steps"], mine["cache_interval"], mine["guidance_interval"]) == (
        9, 1, (0.5, 3.0)) and mine["sampler"] == FAST["sampler"]
    other = parse_generate(b'{"class_id": 2, "quality": "fast", "sampler": "ddim"}',
                           lim).sample_args()  # the preset's grid start goes with its sampler
    assert other["sampler"] == "ddim" and other["lambda_min"] is other["lambda_max"] is None
    default = parse_generate(b'{"class_id": 2}', lim).sample_args()
    assert (default["sampler"], default["steps"], default["cache_interval"],
            default["guidance_interval"]) == ("ddim", 25, 1, None)
    for limits, text in ((replace(lim, samplers=("ddim",)), "not one of this server's"),
                         (replace(lim, max_steps=FAST["steps"] - 1), "exceed max_steps")):
        with pytest.raises(RequestError) as e:
            parse_generate(b'{"class_id": 2, "quality": "fast"}', limits)
        assert e.value.status == 422 and e.value.field == "quality" and text in str(e.value)
