"""Serving on Ray Serve: a guided base sampler chained into the upsampler behind an HTTP API.

    serve run adm.serve:build_app base=runs/quickstart/models/diffusion/model.pt \\
        classifier=runs/quickstart/models/classifier/model.pt \\
        upsampler=runs/quickstart/models/upsampler/model.pt
    serve run serve_configs/local.yaml        # or serve deploy ... on a cluster

Deployments: `GuidedSampler` (base model + optional classifier), `Upsampler`, and the FastAPI
`Ingress` (POST /v1/generate, GET /v1/models, GET /healthz, GET /). Requests are checked
against the config's bounds (`adm.serve.api`), batched with `@serve.batch` and grouped by
settings; models load once per replica as the sampling job's stages do (`adm.stage`).
"""
from .api import GenerateRequest, Limits, RequestError, parse_generate
from .app import Ingress, build, build_app
from .deployments import GuidedSampler, Upsampler
from .settings import ServeSettings, load_settings

__all__ = ["build_app", "build", "Ingress", "GuidedSampler", "Upsampler", "ServeSettings",
           "load_settings", "GenerateRequest", "Limits", "RequestError", "parse_generate"]
