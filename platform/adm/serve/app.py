"""The HTTP application: a FastAPI ingress that chains `GuidedSampler` into `Upsampler`
through deployment handles, and the builder `build_app` that `serve run` and the config files
name (`adm.serve:build_app`).

    POST /v1/generate  {class_id | class_name, num_images, guidance_scale, cfg_scale, sampler,
                        steps, lambda_min, seed, upsample, priority, response: "png" | "json",
                        stream, preview_every}
                       with "stream": true, text/event-stream: events `queued`, `progress`,
                       `preview`, then `result` (the JSON body) or `error`
    GET  /v1/models    sizes, class names, limits and defaults
    GET  /healthz      200 once the model replicas answer, else 503
    GET  /             a page to try it (uses only the API above)

Auth: with an API key in the environment variable `api_key_env` (ADM_SERVE_API_KEY by default;
read by the ingress replica, never from the config file, never logged), /v1/* needs
`Authorization: Bearer <key>`; a second key in `batch_api_key_env` may make batch-class
requests only. Without a key nothing is authenticated, and Serve's HTTP proxy should stay on
loopback (its default host, and local.yaml's).

Cancellation: when a client disconnects, Serve cancels its request, and with it the calls this
ingress made through the deployment handles; the model replicas' generators close and their
step engines drop the rows at the next step (`adm.serve.deployments`). An upsampler call is
only made once the base images are done, so a cancelled request never starts there.
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
from fastapi.sse import EventSourceResponse, format_sse_event
from PIL import Image
from ray import serve
from ray.serve.handle import DeploymentHandle

from ..diffusion.seeds import index_seeds
from ..diffusion.rows import RowSpec
from .api import GenerateRequest, Limits, RequestError, access, api_key_from, body_too_large, \
    check_content_type, check_priority, parse_generate
from ..stage import Job, Output
from .deployments import GuidedSampler, StepJob, Upsampler
from .metrics import IngressMetrics
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


def sse(kind: str, data: dict) -> bytes:
    """One Server-Sent Event: `event: kind`, `data:` the JSON (FastAPI's own framing)."""
    return format_sse_event(data_str=json.dumps(data), event=kind)


def row_spec(req: GenerateRequest) -> RowSpec:
    """How each base row of a request samples (what `sample_args` gives the batched path)."""
    return RowSpec(req.sampler, req.steps, None, req.lambda_min, req.guidance_scale or 0.0,
                   req.guidance_interval, req.cfg_scale, cache_interval=req.cache_interval,
                   lambda_max=req.lambda_max)


def json_body(req: GenerateRequest, seed: int, base: np.ndarray, up: np.ndarray | None,
              batch: dict, arrived: float) -> dict:
    """The JSON answer: the final images (the upsampler's when it ran) as base64 PNGs, the
    settings that decided them, how they were batched and at which priority, and the seconds
    since arrival."""
    final = base if up is None else up
    body = {"seed": seed, "settings": {**req.settings(), "seed": seed},
            "image_size": int(final.shape[1]), "images": b64_pngs(final), "batch": batch,
            "priority": req.priority, "elapsed_s": round(time.perf_counter() - arrived, 3)}
    if up is not None:
        body["base_images"] = b64_pngs(base)
        body["base_size"] = int(base.shape[1])
    return body


def png_response(images: np.ndarray, settings: dict) -> Response:
    """The PNG answer: the images side by side, the seed and settings in headers."""
    return Response(png_bytes(images), media_type="image/png", headers={
        "X-ADM-Seed": str(settings["seed"]), "X-ADM-Settings": json.dumps(settings)})


def event_json(stage: str, kind: str, data: dict) -> dict:
    """An engine event as the API sends it: the stage named, previews as base64 PNGs."""
    out = {"stage": stage, **data}
    if kind == "preview":
        out["images"] = b64_pngs(data["images"])
    return out


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
                 require_api_key: bool = False, batch_api_key_env: str | None = None):
        self.sampler, self.upsampler = sampler, upsampler
        self.info, self.limits, self.upsampler_args = info, limits, upsampler_args
        self.upsampler_spec = RowSpec(upsampler_args.get("sampler") or "ddpm",
                                      upsampler_args.get("steps") or None)
        self.key = api_key_from(os.environ, api_key_env, require_api_key)
        self.batch_key = api_key_from(os.environ, batch_api_key_env, False) \
            if batch_api_key_env else None
        self.metrics = IngressMetrics()
        if self.key:
            logger.info("API key required on /v1/* (from $%s)", api_key_env)
        else:
            logger.warning("no API key ($%s unset): requests are not authenticated; keep "
                           "Serve's HTTP host on loopback (127.0.0.1)", api_key_env)

    def _check_auth(self, request: Request) -> str:
        """"all" or "batch" (what the caller's key may do), else a 401."""
        level = access(request.headers.get("authorization"), self.key, self.batch_key)
        if level is None:
            raise RequestError(401, "authorization", "missing or wrong API key "
                                                     "(Authorization: Bearer <key>)")
        return level

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
        arrived = time.perf_counter()
        try:
            # The body first, whatever the answer: every refusal must reach the client.
            raw, size = await self._read_body(request)
            level = self._check_auth(request)
            if size > self.limits.max_body_bytes:
                raise body_too_large(size, self.limits)
            check_content_type(request.headers.get("content-type"))
            req = parse_generate(raw, self.limits)
            check_priority(req, level)
        except RequestError as e:
            return error_response(e)
        seed = req.seed if req.seed is not None else secrets.randbelow(2**32)
        if not self.limits.engine:
            return await self._batched(req, seed, arrived)
        events = self._chain(req, seed, arrived)
        if req.stream:
            return EventSourceResponse(
                sse(kind, self._json(req, seed, data, arrived) if kind == "result" else data)
                async for kind, data in events)
        async for kind, data in events:
            if kind == "error":
                return JSONResponse({"detail": data["detail"]}, status_code=data["status"])
        return self._answer(req, seed, data, arrived)

    async def _chain(self, req: GenerateRequest, seed: int, arrived: float):
        """The request's events through both stages, each (kind, data) as the API sends it,
        ending with ("result", {stage: the engine's result}) or ("error", {"status",
        "detail"}). Image k draws from (seed, k) alone, in each stage: the same alone or in a
        full engine. The upsampler's rows start as soon as this request's base images are
        done."""
        n, labels = req.num_images, (req.class_id,) * req.num_images
        results, status, first = {}, "ok", True
        try:
            for name in ("base", "upsample") if req.upsample else ("base",):
                if name == "base":
                    handle, job = self.sampler, StepJob(
                        row_spec(req), labels, tuple(index_seeds(seed, range(n))), None,
                        req.priority, req.preview_every or 0)
                else:
                    handle, job = self.upsampler, StepJob(
                        self.upsampler_spec, labels,
                        tuple(index_seeds(seed, range(n), "upsampler")),
                        results["base"]["images"], req.priority, req.preview_every or 0)
                async for kind, data in handle.options(stream=True).generate.remote(job):
                    if kind == "result":
                        results[name] = data
                        break
                    if kind == "error":
                        status = "error"
                        yield kind, {"status": data.get("status", 500), "detail": data["detail"]}
                        return
                    if kind == "progress" and first:
                        first = False
                        self.metrics.first_progress.observe(time.perf_counter() - arrived,
                                                            tags={"class": req.priority})
                    yield kind, event_json(name, kind, data)
            yield "result", results
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        finally:
            self.metrics.requests.inc(tags={"class": req.priority, "status": status})

    def _json(self, req: GenerateRequest, seed: int, results: dict, arrived: float) -> dict:
        """The JSON answer (and the stream's `result` event) from the engines' results."""
        up = results.get("upsample")
        batch = {"base": results["base"]["shared"]}
        if up is not None:
            batch["upsampler"] = up["shared"]
        return json_body(req, seed, results["base"]["images"], up and up["images"], batch,
                         arrived)

    def _answer(self, req: GenerateRequest, seed: int, results: dict,
                arrived: float) -> Response:
        """The non-streamed answer: a PNG strip of the final images, or the JSON body."""
        if req.response == "json":
            return JSONResponse(self._json(req, seed, results, arrived))
        final = results.get("upsample", results["base"])["images"]
        return png_response(final, {**req.settings(), "seed": seed})

    async def _batched(self, req: GenerateRequest, seed: int, arrived: float) -> Response:
        """scheduling "request": the whole request in one @serve.batch call per stage."""
        labels = [req.class_id] * req.num_images
        # Image k of a request draws from (seed, k) alone: the same for any batch it joins.
        base: Output = await self.sampler.run.remote(
            Job.make(req.sample_args(), labels, index_seeds(seed, range(req.num_images))))
        up = None
        if req.upsample:
            up = await self.upsampler.run.remote(Job.make(
                self.upsampler_args, labels,
                index_seeds(seed, range(req.num_images), "upsampler"), base.images))
        if req.response == "png":
            return png_response((up or base).images, {**req.settings(), "seed": seed})
        batch = {"base": batch_info(base)}
        if up is not None:
            batch["upsampler"] = batch_info(up)
        return JSONResponse(json_body(req, seed, base.images, up and up.images, batch,
                                      arrived))


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
        s.batch_rows, s.compile, s.scheduling, s.engine_options())
    upsampler, up_args = None, {}
    if loaded.upsampler is not None:
        upsampler = Upsampler.options(**_options(s, "Upsampler", options)).bind(
            loaded.upsampler, s.precision, s.max_batch_requests, s.batch_wait_s,
            s.upsampler_batch_rows or s.batch_rows, s.compile, s.scheduling,
            s.engine_options())
        up_args = {"sampler": loaded.upsampler_sampler, "steps": loaded.upsampler_steps}
    return Ingress.options(**_options(s, "Ingress", options)).bind(
        sampler, upsampler, loaded.info(), Limits.of(loaded), up_args, s.api_key_env,
        s.require_api_key, s.batch_api_key_env)


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
