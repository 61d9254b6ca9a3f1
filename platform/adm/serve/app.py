"""The HTTP application: a FastAPI ingress that chains `GuidedSampler` into `Upsampler`
through deployment handles, and the builder `build_app` that `serve run` and the config files
name (`adm.serve:build_app`).

    POST /v1/generate  {class_id | class_name, num_images, guidance_scale, sampler, steps,
                        seed, upsample, response: "png" | "json"}
    GET  /v1/models    sizes, class names, limits and defaults
    GET  /healthz      200 once the model replicas answer, else 503
    GET  /             a page to try it (uses only the API above)

Auth: with an API key in the environment variable `api_key_env` (ADM_SERVE_API_KEY by default;
read by the ingress replica, never from the config file, never logged), /v1/* needs
`Authorization: Bearer <key>`. Without a key nothing is authenticated, and Serve's HTTP proxy
should stay on loopback (its default host, and local.yaml's).
"""
# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations
# (`request: Request`) at import, and as strings they would turn into query parameters.
import asyncio
import base64
import io
import json
import logging
import os
import secrets
import time

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from ray import serve
from ray.serve.handle import DeploymentHandle

from ..diffusion.seeds import index_seeds
from .api import Limits, RequestError, api_key_from, authorized, body_too_large, \
    check_content_type, parse_generate
from ..stage import Job, Output
from .deployments import GuidedSampler, Upsampler
from .page import PAGE
from .settings import Loaded, ServeSettings, load_settings

logger = logging.getLogger("ray.serve")
HEALTH_TIMEOUT_S = 5.0
# An over-limit body is read and dropped up to this size so that the client gets its 413
# (see Ingress._read_body); a larger one is refused at once and its connection closed.
MAX_DRAIN_BYTES = 64 * 2**20


# Module-level helpers sit above the ingress class: with one defined below an @serve.ingress
# class, every request failed in the replica with a NameError for it (Ray 2.60).
def png_bytes(images: np.ndarray) -> bytes:
    """[N, H, W, 3] uint8 -> one PNG, the N images side by side."""
    strip = np.concatenate(list(images), axis=1) if len(images) > 1 else images[0]
    buf = io.BytesIO()
    Image.fromarray(strip).save(buf, format="PNG")
    return buf.getvalue()


def b64_pngs(images: np.ndarray) -> list[str]:
    """Each [H, W, 3] image of [N, H, W, 3] as a base64 PNG."""
    return [base64.b64encode(png_bytes(im[None])).decode() for im in images]


def error_response(err: RequestError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    payload = err.payload()
    if getattr(err, "items", None):
        payload["errors"] = err.items
    return JSONResponse(payload, status_code=err.status, headers=headers)


def batch_info(out: Output) -> dict:
    return {"requests": out.batch_requests, "images": out.batch_images, "groups": out.groups}


api = FastAPI(title="adm.serve", docs_url=None, redoc_url=None)


# A bounded queue: past max_ongoing_requests + max_queued_requests per replica, Serve's proxy
# answers 503 at once (clients back off) instead of holding requests without limit.
@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64,
                  max_queued_requests=64)
@serve.ingress(api)
class Ingress:
    """Checks requests, then base samples -> (upsampler) -> PNG or JSON."""

    def __init__(self, sampler: DeploymentHandle, upsampler: DeploymentHandle | None,
                 info: dict, limits: Limits, upsampler_args: dict, api_key_env: str,
                 require_api_key: bool = False):
        self.sampler, self.upsampler = sampler, upsampler
        self.info, self.limits, self.upsampler_args = info, limits, upsampler_args
        self.key = api_key_from(os.environ, api_key_env, require_api_key)
        if self.key:
            logger.info("API key required on /v1/* (from $%s)", api_key_env)
        else:
            logger.warning("no API key ($%s unset): requests are not authenticated; keep "
                           "Serve's HTTP host on loopback (127.0.0.1)", api_key_env)

    def _check_auth(self, request: Request) -> None:
        if not authorized(request.headers.get("authorization"), self.key):
            raise RequestError(401, "authorization", "missing or wrong API key "
                                                     "(Authorization: Bearer <key>)")

    @api.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(PAGE)

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        try:
            stages = {"base": await asyncio.wait_for(self.sampler.ready.remote(),
                                                     HEALTH_TIMEOUT_S)}
            if self.upsampler is not None:
                stages["upsampler"] = await asyncio.wait_for(self.upsampler.ready.remote(),
                                                             HEALTH_TIMEOUT_S)
        except Exception as e:  # not ready (yet): the load balancer should wait
            return JSONResponse({"status": "unavailable", "detail": type(e).__name__},
                                status_code=503)
        return JSONResponse({"status": "ok", "stages": stages})

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        try:
            self._check_auth(request)
        except RequestError as e:
            return error_response(e)
        return JSONResponse({**self.info, "auth_required": bool(self.key)})

    async def _read_body(self, request: Request) -> tuple[bytes, int]:
        """(the body's first max_body_bytes + 1 bytes, its whole size).

        An over-limit body is still read to its end, and dropped, up to MAX_DRAIN_BYTES: most
        HTTP clients (requests, urllib, browsers) send the whole body before they read the
        answer, and a server that answers and closes while they send makes them see a
        connection reset instead of the 413. Past the cap, or when Content-Length declares
        more, the 413 goes out at once and the connection closes."""
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_DRAIN_BYTES:
            raise body_too_large(int(declared), self.limits)
        body, size = bytearray(), 0
        async for chunk in request.stream():
            size += len(chunk)
            if len(body) <= limit:
                body += chunk[:limit + 1 - len(body)]
            if size > MAX_DRAIN_BYTES:
                raise body_too_large(size, self.limits, at_least=True)
        return bytes(body), size

    @api.post("/v1/generate")
    async def generate(self, request: Request) -> Response:
        try:
            # The body first, whatever the answer: every refusal must reach the client.
            raw, size = await self._read_body(request)
            self._check_auth(request)
            if size > self.limits.max_body_bytes:
                raise body_too_large(size, self.limits)
            check_content_type(request.headers.get("content-type"))
            req = parse_generate(raw, self.limits)
        except RequestError as e:
            return error_response(e)
        start = time.perf_counter()
        seed = req.seed if req.seed is not None else secrets.randbelow(2**32)
        labels = [req.class_id] * req.num_images
        # Image k of a request draws from (seed, k) alone: the same for any batch it joins.
        base: Output = await self.sampler.run.remote(
            Job.make(req.sample_args(), labels, index_seeds(seed, range(req.num_images))))
        final, up = base.images, None
        if req.upsample:
            up = await self.upsampler.run.remote(Job.make(
                self.upsampler_args, labels,
                index_seeds(seed, range(req.num_images), "upsampler"), base.images))
            final = up.images
        settings = {**req.settings(), "seed": seed}
        if req.response == "png":
            return Response(png_bytes(final), media_type="image/png", headers={
                "X-ADM-Seed": str(seed), "X-ADM-Settings": json.dumps(settings)})
        body = {"seed": seed, "settings": settings, "image_size": int(final.shape[1]),
                "images": b64_pngs(final),
                "batch": {"base": batch_info(base)},
                "elapsed_s": round(time.perf_counter() - start, 3)}
        if up is not None:
            body["base_images"] = b64_pngs(base.images)
            body["base_size"] = int(base.images.shape[1])
            body["batch"]["upsampler"] = batch_info(up)
        return JSONResponse(body)


def _options(settings: ServeSettings, name: str, extra: dict | None) -> dict:
    """Deployment options from code: GPUs when asked (`gpus=true`), then `extra` (tests and
    benchmarks); a config file's `deployments:` entries override these."""
    out = {}
    if settings.gpus and name in ("GuidedSampler", "Upsampler"):
        out["ray_actor_options"] = {"num_cpus": 1, "num_gpus": 1}
    out.update((extra or {}).get(name, {}))
    return out


def build(loaded: Loaded, options: dict | None = None):
    """The application of resolved models; `options` maps deployment names to .options()."""
    s = loaded.settings
    sampler = GuidedSampler.options(**_options(s, "GuidedSampler", options)).bind(
        loaded.base, loaded.classifier, s.precision, s.max_batch_requests, s.batch_wait_s,
        s.batch_rows, s.compile)
    upsampler, up_args = None, {}
    if loaded.upsampler is not None:
        upsampler = Upsampler.options(**_options(s, "Upsampler", options)).bind(
            loaded.upsampler, s.precision, s.max_batch_requests, s.batch_wait_s,
            s.upsampler_batch_rows or s.batch_rows, s.compile)
        up_args = {"sampler": loaded.upsampler_sampler, "steps": loaded.upsampler_steps}
    return Ingress.options(**_options(s, "Ingress", options)).bind(
        sampler, upsampler, loaded.info(), Limits.of(loaded), up_args, s.api_key_env,
        s.require_api_key)


def build_app(args: dict):
    """`serve run adm.serve:build_app base=URI [classifier=URI] [upsampler=URI] [key=value]`
    and the config files' `import_path`: arguments as in `ServeSettings` (strings from the
    command line are cast). Every model file is read and checked here, before any replica
    starts; a missing one is named with how to get it."""
    settings = ServeSettings.from_args(dict(args or {}))
    loaded = load_settings(settings)
    if os.environ.get(settings.api_key_env):
        print(f"adm.serve: /v1/* requires the API key in ${settings.api_key_env}", flush=True)
    else:
        print(f"adm.serve: no API key (${settings.api_key_env} unset): requests are not "
              f"authenticated; Serve's HTTP proxy binds to loopback (127.0.0.1) unless "
              f"http_options.host says otherwise", flush=True)
    return build(loaded)
