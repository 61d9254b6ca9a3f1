"""deploy/kuberay/, checked offline: no Kubernetes, no Ray cluster, no network.

* Every manifest passes its KubeRay 1.7.0 CRD's ray.io/v1 schema (tests/fixtures/kuberay_crds/),
  strictly: an unknown field is refused, as `kubectl apply` (strict field validation) does.
* The RayService's serveConfigV2 is serve_configs/imagenet512.yaml's applications with s3://
  model URIs, and passes Serve's own config schema.
* Every RayJob's entrypoint is the job's own command line: its parser accepts it, and the config
  file it names loads with the project's config loader.
* Resources: requests == limits in every pod and agree with rayStartParams; the worker groups
  mirror cluster.yaml's node types; the Serve deployments and each job's GPU actors fit.
* One pinned image everywhere (the documented placeholder), and secret-looking variables come
  only from Secrets.

Each check is a function returning its problems; a broken copy of a manifest shows that it
reports what it guards against.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import re
import shlex
from pathlib import Path
from typing import Any, Callable, Iterator

import jsonschema
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from adm.config import ConfigError
from helpers import load_job, run_main
from test_cluster_yaml import (capacity_problems, credential_findings, load_cluster, model_paths,
                               pinning_problems)

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "deploy" / "kuberay"
CRDS = Path(__file__).parent / "fixtures" / "kuberay_crds"
MANIFESTS = sorted(KUBERAY.glob("ray*.yaml"))
SERVE_CONFIG = ROOT / "serve_configs" / "imagenet512.yaml"

# The one image every manifest names, swapped by the kustomization's images: entry (README).
IMAGE = "adm-platform:VERSION"
# Where the released model files go in your bucket (README "Kubernetes").
BUCKET = "s3://YOUR-BUCKET/"
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD", re.IGNORECASE)
# What cluster.yaml's credential scan looks for, less its name patterns: here secret-looking
# names are expected (env entries, secretKeyRef), and secret_problems checks their values.
VALUE_PATTERNS = ("an AWS access key id", "a private key",
                  "a long hex string (Ray tokens are 64 hex digits)")


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def manifests() -> dict[str, dict]:
    return {p.name: load(p) for p in MANIFESTS}


# ---------------------------------------------------------------------------------------------
# The CRD schemas.


def strict_schema(node: Any) -> Any:
    """A CRD's OpenAPI v3 schema as JSON Schema, with Kubernetes' own extensions applied:
    int-or-string accepts both, preserve-unknown-fields keeps any field, every other object
    refuses fields it does not declare (kubectl's strict field validation); other x- keys go."""
    if isinstance(node, list):
        return [strict_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_schema(v) for k, v in node.items()
           if not k.startswith("x-kubernetes-") and k not in ("properties", "nullable")}
    if "properties" in node:  # field names, not schema keywords: convert only the values
        out["properties"] = {k: strict_schema(v) for k, v in node["properties"].items()}
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        out["type"] = ["integer", "string"]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else out["type"]
    if ("properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def validator(kind: str) -> jsonschema.Draft7Validator:
    """The validator of a KubeRay kind's ray.io/v1 schema (built once: the CRDs are ~1 MB)."""
    crd = yaml.load((CRDS / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=yaml.CSafeLoader)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft7Validator(strict_schema(version["schema"]["openAPIV3Schema"]))


def schema_problems(doc: dict) -> list[str]:
    if doc.get("apiVersion") != "ray.io/v1" or doc.get("kind") not in ("RayJob", "RayService"):
        return [f"apiVersion/kind: {doc.get('apiVersion')}/{doc.get('kind')}"]
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator(doc["kind"]).iter_errors(doc)]


# ---------------------------------------------------------------------------------------------
# Ray clusters: groups, pods, resources.


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec" if doc["kind"] == "RayJob" else "rayClusterConfig"]


def groups(doc: dict) -> Iterator[tuple[str, dict]]:
    """(name, group spec) of the head ("head") and every worker group."""
    spec = cluster_spec(doc)
    yield "head", spec["headGroupSpec"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]


def quantity(value: Any) -> float:
    """A Kubernetes CPU or count quantity ("8", 8, "500m") as a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def offered(group: dict) -> dict[str, float]:
    """What a group's Ray node offers Ray (rayStartParams), as cluster.yaml writes resources."""
    params = group.get("rayStartParams", {})
    resources = {"CPU": quantity(params.get("num-cpus", 0)),
                 "GPU": quantity(params.get("num-gpus", 0)),
                 **json.loads(params.get("resources", "{}"))}
    return {k: float(v) for k, v in resources.items() if float(v) > 0}


def as_cluster_yaml(doc: dict) -> dict:
    """A manifest's Ray cluster in cluster.yaml's shape, for cluster.yaml's fit checks."""
    types = {name: {"resources": offered(g), "max_workers": g.get("maxReplicas", 1)}
             for name, g in groups(doc)}
    return {"head_node_type": "head", "available_node_types": types,
            "max_workers": sum(t["max_workers"] for n, t in types.items() if n != "head")}


def resource_problems(doc: dict) -> list[str]:
    """Pod resources vs what Ray is told: requests == limits, num-cpus/num-gpus agree."""
    problems = []
    for name, group in groups(doc):
        res = ray_container(group).get("resources", {})
        requests, limits = res.get("requests", {}), res.get("limits", {})
        if requests != limits or not {"cpu", "memory"} <= set(limits):
            problems.append(f"{name}: requests {requests} != limits {limits} (cpu, memory)")
            continue
        ray = offered(group)
        cpus = quantity(limits["cpu"])
        # The head may keep CPUs for Ray's control plane (num-cpus below its cores); a worker
        # offers Ray exactly its pod's CPUs.
        if ray.get("CPU", 0.0) > cpus or (name != "head" and ray.get("CPU", 0.0) != cpus):
            problems.append(f"{name}: num-cpus {ray.get('CPU', 0):g} vs cpu limit {cpus:g}")
        gpus = quantity(limits.get("nvidia.com/gpu", 0))
        if ray.get("GPU", 0.0) != gpus:
            problems.append(f"{name}: num-gpus {ray.get('GPU', 0):g} vs nvidia.com/gpu {gpus:g}")
        if name != "head":
            low, high = group.get("minReplicas"), group.get("maxReplicas")
            if not (isinstance(low, int) and isinstance(high, int) and 0 <= low <= high):
                problems.append(f"{name}: minReplicas {low!r}, maxReplicas {high!r}")
    if not cluster_spec(doc).get("enableInTreeAutoscaling"):
        problems.append("enableInTreeAutoscaling is not true")
    return problems


def mirror_problems(doc: dict) -> list[str]:
    """Each worker group is one of cluster.yaml's worker node types: the same GPUs and custom
    resources, at most its CPUs (the kubelet keeps a few), the same maximum count."""
    cluster = load_cluster()
    types = {n: t for n, t in cluster["available_node_types"].items()
             if n != cluster["head_node_type"]}
    problems = []
    for name, group in list(groups(doc))[1:]:
        ray = offered(group)
        matches = [n for n, t in types.items()
                   if {k: v for k, v in ray.items() if k != "CPU"}
                   == {k: float(v) for k, v in t["resources"].items() if k != "CPU"}
                   and ray.get("CPU", 0) <= t["resources"].get("CPU", 0)
                   and group.get("maxReplicas") == t["max_workers"]]
        if not matches:
            problems.append(f"{name}: {ray} x{group.get('maxReplicas')} is no cluster.yaml "
                            f"worker type")
    return problems


# ---------------------------------------------------------------------------------------------
# Images and secrets.


def walk(node: Any) -> Iterator[dict]:
    """Every mapping inside a document."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def image_problems(doc: dict) -> list[str]:
    """Every container runs the one placeholder image; anything else (another image, :latest,
    no tag) is reported."""
    problems = []
    for node in walk(doc):
        for container in node.get("containers", []) + node.get("initContainers", []):
            image = container.get("image", "")
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            if not tag or tag == "latest":
                problems.append(f"{container.get('name')}: {image!r} is untagged or :latest")
            elif image != IMAGE:
                problems.append(f"{container.get('name')}: {image!r}, not the placeholder {IMAGE}")
    return problems


def secret_problems(doc: dict, text: str = "") -> list[str]:
    """Secret-looking variables set only from a Secret (valueFrom.secretKeyRef), and no
    credential-looking value anywhere in the text."""
    problems = []
    for node in walk(doc):
        for var in node.get("env", []):
            if SECRET_NAME.search(var.get("name", "")) and (
                    "value" in var or "secretKeyRef" not in (var.get("valueFrom") or {})):
                problems.append(f"env {var['name']}: not from valueFrom.secretKeyRef")
    problems += [f for f in credential_findings(text)
                 if any(f"{what}:" in f for what in VALUE_PATTERNS)]
    return problems


# ---------------------------------------------------------------------------------------------
# The RayService's Serve config and the RayJobs' entrypoints.


def serve_config(doc: dict) -> dict:
    """The RayService's serveConfigV2, checked against Serve's config schema."""
    config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)
    return config


def drift_problems(config: dict, reference: dict) -> list[str]:
    """serveConfigV2 vs serve_configs/imagenet512.yaml: the same applications, but each model
    URI is the bucket's copy of the file's (`models/x.pt` -> s3://YOUR-BUCKET/models/x.pt)."""
    want = copy.deepcopy(reference["applications"])
    for app in want:
        for key in ("base", "classifier", "upsampler"):
            if app.get("args", {}).get(key):
                app["args"][key] = BUCKET + app["args"][key]
    extra = sorted(set(config) - {"applications"})
    return ([f"serveConfigV2 sets {extra}; the RayService sets them"] if extra else []) + (
        [] if config.get("applications") == want else
        ["serveConfigV2's applications differ from serve_configs/imagenet512.yaml's"])


# A RayJob's job: (script, how its parser is called, how much GPU its actors take).
TRAIN_KINDS = {"train_diffusion.py": "diffusion", "train_classifier.py": "classifier",
               "train_upsampler.py": "upsampler"}


def entrypoint_problems(doc: dict) -> list[str]:
    """The entrypoint is `python jobs/<job>.py ...` that the job's parser accepts, whose config
    file loads, and whose GPU actors fit the cluster's GPUs."""
    argv = shlex.split(doc["spec"].get("entrypoint") or "")
    if len(argv) < 2 or argv[0] != "python" or not argv[1].startswith("jobs/"):
        return [f"entrypoint {argv[:2]} is not `python jobs/<job>.py`"]
    script, args = Path(argv[1]).name, argv[2:]
    if not (ROOT / argv[1]).is_file():
        return [f"entrypoint: {argv[1]} is not in the repository"]
    # The job's own --check: its parser and its settings, nothing read or started.
    err = io.StringIO()
    with contextlib.chdir(ROOT), contextlib.redirect_stderr(err), \
            contextlib.redirect_stdout(io.StringIO()):
        try:
            status = run_main(Path(script).stem, [*args, "--check"])
        except SystemExit as e:  # argparse's way of refusing
            status = e.code
    if status != 0:
        return [f"entrypoint: {script} --check refuses it: {err.getvalue().strip()}"]
    try:
        gpus = job_gpus(script, args)
    except SystemExit:  # argparse's way of refusing
        return [f"entrypoint: {script}'s parser refuses {args}"]
    except ConfigError as e:
        return [f"entrypoint: {script}'s config: {e}"]
    have = sum(g.get("maxReplicas", 1) * offered(g).get("GPU", 0.0) for _, g in groups(doc))
    if gpus > have:
        return [f"{script}: {gpus} GPU actors, the cluster has at most {have:g} GPUs"]
    return []


def job_gpus(script: str, args: list[str]) -> int:
    """How many GPU actors the job's command line asks for, after its parser (and its config
    loader, for a --config file) accepted it."""
    if script in TRAIN_KINDS:
        from adm.train.cli import parse_args
        from adm.train.config import load_config

        ns = parse_args(TRAIN_KINDS[script], args)
        # The job's own options, as adm.train.cli.resolve_config passes them (less the val
        # split, which it looks up in storage).
        cfg = load_config(str(ROOT / ns.config), ns.overrides, run__num_workers=ns.num_workers,
                          run__use_gpu=True if ns.gpus else None, run__storage=ns.storage,
                          data__uri=ns.data)
        assert cfg.kind == TRAIN_KINDS[script], (script, cfg.kind)
        return cfg.run.num_workers if cfg.run.use_gpu else 0
    ns = load_job(script.removesuffix(".py")).parse_args(args)
    if script == "sample.py":
        from adm.generate import load_sample_config

        cfg = load_sample_config(str(ROOT / ns.config), ns.overrides, model=ns.model,
                                 classifier=ns.classifier, upsampler=ns.upsampler, out=ns.out,
                                 num_workers=ns.num_workers, gpus=ns.gpus)
        return (cfg.num_workers + (cfg.upsampler_workers or cfg.num_workers)) if cfg.gpus else 0
    return ns.num_workers if getattr(ns, "gpus", False) else 0


# ---------------------------------------------------------------------------------------------
# The real manifests.


def test_every_job_and_the_endpoint_have_a_manifest() -> None:
    names = {p.name for p in MANIFESTS}
    assert names == {"rayservice-imagenet512.yaml"} | {
        f"rayjob-{j}.yaml" for j in ("prepare-imagenet", "train-diffusion", "train-classifier",
                                     "train-upsampler", "sample", "evaluate")}
    kustomization = load(KUBERAY / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted(names)
    name, tag = IMAGE.split(":")
    assert kustomization["images"] == [{"name": name, "newName": name, "newTag": tag}]


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_manifest_passes_its_crd_and_the_checks(path: Path) -> None:
    doc = load(path)
    assert schema_problems(doc) == []
    assert resource_problems(doc) == []
    assert mirror_problems(doc) == []
    assert image_problems(doc) == []
    assert secret_problems(doc, path.read_text()) == []
    if doc["kind"] == "RayJob":
        assert doc["spec"]["shutdownAfterJobFinishes"] is True
        assert entrypoint_problems(doc) == []


def test_rayservice_serves_the_imagenet512_config() -> None:
    doc = load(KUBERAY / "rayservice-imagenet512.yaml")
    config = serve_config(doc)
    assert drift_problems(config, load(SERVE_CONFIG)) == []
    assert all(m.startswith(BUCKET) for m in model_paths(config))
    cluster = as_cluster_yaml(doc)  # cluster.yaml's own fit checks, on the RayService's groups
    assert capacity_problems(cluster, config) == []
    assert pinning_problems(config) == []
    # The ingress reads the API key from a Secret on every pod that can host a replica.
    for name, group in groups(doc):
        env = {v["name"]: v for v in ray_container(group).get("env", [])}
        assert env["ADM_SERVE_API_KEY"]["valueFrom"]["secretKeyRef"].get("optional") is not True


def test_dockerfile_pins_ray_torch_and_runs_unprivileged() -> None:
    text = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    ray_pin = re.search(r'ray\[[^]]*\]==([\d.]+)\.\*', (ROOT / "pyproject.toml").read_text())
    torch_pin = re.search(r"TORCH_SPEC \?= (torch==\S+)", (ROOT / "Makefile").read_text())
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray_pin.group(1))}\.\d+-py311-gpu$",
                     text, re.M), "the base image is pyproject's Ray, pinned"
    assert f"ARG TORCH_SPEC={torch_pin.group(1)}" in text
    assert re.search(r"^USER ray$", text.strip().splitlines()[-1]), "runs as the image's `ray`"
    assert len(re.findall(r"^FROM ", text, re.M)) == 1, "one stage, from the pinned image"
    assert not re.search(r"(?i)^(ARG|ENV)\s+\w*(KEY|SECRET|TOKEN|PASSWORD)", text, re.M)
    for manifest in MANIFESTS:
        assert f'rayVersion: "{ray_pin.group(1)}.0"' in manifest.read_text(), manifest.name


# ---------------------------------------------------------------------------------------------
# Each guard on a broken copy.


def _rayjob() -> dict:
    return load(KUBERAY / "rayjob-train-diffusion.yaml")


def _worker(doc: dict) -> dict:
    return cluster_spec(doc)["workerGroupSpecs"][0]


BROKEN: dict[str, tuple[Callable[[dict], None], Callable[[dict], list[str]], str]] = {
    "min-replicas-a-word": (lambda d: _worker(d).update(minReplicas="two"), schema_problems,
                            "minReplicas: 'two' is not of type 'integer'"),
    "typo-field": (lambda d: _worker(d).update(maxReplica=3), schema_problems, "maxReplica"),
    "num-cpus-a-number": (lambda d: _worker(d)["rayStartParams"].update({"num-cpus": 90}),
                          schema_problems, "90 is not of type 'string'"),
    "missing-entrypoint": (lambda d: d["spec"].pop("entrypoint"), entrypoint_problems,
                           "is not `python jobs/<job>.py`"),
    "unknown-flag": (lambda d: d["spec"].update(entrypoint=d["spec"]["entrypoint"] + " --nodes 2"),
                     entrypoint_problems, "unrecognized arguments: --nodes"),
    "too-many-gpus": (lambda d: d["spec"].update(entrypoint=d["spec"]["entrypoint"].replace(
        "--num-workers 16", "--num-workers 32")), entrypoint_problems, "32 GPU actors"),
    "bad-override": (lambda d: d["spec"].update(entrypoint=d["spec"]["entrypoint"] + " optim.lr=x"),
                     entrypoint_problems, "optim.lr: expected float"),
    "latest-image": (lambda d: ray_container(_worker(d)).update(image="adm-platform:latest"),
                     image_problems, ":latest"),
    "untagged-image": (lambda d: ray_container(_worker(d)).update(image="rayproject/ray"),
                       image_problems, "untagged"),
    "literal-secret": (lambda d: ray_container(_worker(d))["env"].append(
        {"name": "AWS_SECRET_ACCESS_KEY", "value": "wJalrXUtnFEMI/K7MDENG"}), secret_problems,
        "AWS_SECRET_ACCESS_KEY: not from valueFrom.secretKeyRef"),
    "requests-not-limits": (lambda d: ray_container(_worker(d))["resources"]["requests"].update(
        cpu="8"), resource_problems, "requests .* != limits"),
    "gpus-disagree": (lambda d: _worker(d)["rayStartParams"].update({"num-gpus": "4"}),
                      resource_problems, "num-gpus 4 vs nvidia.com/gpu 8"),
    "no-autoscaling": (lambda d: cluster_spec(d).update(enableInTreeAutoscaling=False),
                       resource_problems, "enableInTreeAutoscaling"),
    "not-cluster-yaml": (lambda d: _worker(d).update(maxReplicas=5), mirror_problems,
                         "gpu-train: .* x5 is no cluster.yaml worker type"),
}


@pytest.mark.parametrize("name", BROKEN)
def test_each_guard_reports_a_broken_copy(name: str) -> None:
    break_it, check, message = BROKEN[name]
    doc = _rayjob()
    assert check(doc) == []
    break_it(doc)
    problems = check(doc)
    assert any(re.search(message, p) for p in problems), problems


def test_drift_and_fit_checks_report_a_changed_serve_config() -> None:
    doc = load(KUBERAY / "rayservice-imagenet512.yaml")
    reference = load(SERVE_CONFIG)
    config = serve_config(doc)
    config["applications"][0]["deployments"][1]["autoscaling_config"]["max_replicas"] = 20
    assert drift_problems(config, reference)
    assert capacity_problems(as_cluster_yaml(doc), config)  # 20 + 4 GPUs > 12 serving pods
    config = serve_config(doc)
    config["applications"][0]["args"]["base"] = "s3://YOUR-BUCKET/models/256x256_diffusion.pt"
    assert drift_problems(config, reference)
    assert drift_problems({**serve_config(doc), "proxy_location": "EveryNode"}, reference)
    text = (KUBERAY / "rayservice-imagenet512.yaml").read_text()
    assert secret_problems(load(KUBERAY / "rayservice-imagenet512.yaml"),
                           text + "\n# AKIAIOSFODNN7EXAMPLE\n")
