"""deploy/kuberay/, checked offline the way KubeRay 1.7.0 and Ray 2.60 read it: no Kubernetes,
no Ray cluster, no network.

* Every manifest passes its KubeRay 1.7.0 CRD's ray.io/v1 schema (tests/fixtures/kuberay_crds/),
  strictly (an unknown field is refused, as `kubectl apply` does), and KubeRay's own group rule:
  a group gives Ray its resources in `rayStartParams` or in its `resources:` field, never both.
* Ray's KubeRay autoscaler reads every Ray cluster: `_derive_autoscaling_config_from_ray_cr`,
  the function the autoscaler runs at start on the RayCluster, builds its config without error.
* Every pod's container command is built as KubeRay's pod builder builds it
  (ray-operator/controllers/ray/common/pod.go at v1.7.0, followed function by function below),
  run by real bash with a stub `ray` that records its argv, and parsed by `ray start`'s own
  command-line parser: every flag stays one word, `--resources` is a JSON object of numbers, and
  what each raylet is told (CPU, GPU, memory, custom resources) is what the autoscaler plans with.
* The object store fits /dev/shm: `object-store-memory` is set, the shm volume holds it with room
  to spare, and the shm volume (memory, counted inside the pod's limit) leaves half of the pod's
  memory to its processes.
* `kubectl apply -k deploy/kuberay` applies no RayJob: the jobs are files of their own in
  deploy/kuberay/jobs/, applied one at a time.
* Every RayJob's entrypoint names absolute paths inside the image (deploy/docker/Dockerfile's
  WORKDIR and COPY), each of which is in the repository; the script runs from another folder,
  its parser accepts the command and its config loads.
* Resources: requests == limits in every pod and agree with Ray's view; the worker groups mirror
  cluster.yaml's node types; the Serve deployments and each job's GPU actors fit.
* The RayService's serveConfigV2 is serve_configs/imagenet512.yaml's applications with s3://
  model URIs, and passes Serve's own config schema.
* One pinned image everywhere (the documented placeholder), and secret-looking variables come
  only from Secrets.

Each check is a function returning its problems; a broken copy of a manifest shows that it
reports what it guards against.
"""
from __future__ import annotations

import atexit
import contextlib
import copy
import functools
import io
import json
import math
import os
import re
import resource as rlimit
import shlex
import shutil
import subprocess
import sys
import tempfile
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Iterator

import click
import jsonschema
import pytest
import yaml
from ray._private.utils import parse_resources_json
from ray.autoscaler._private.cli_logger import cf, cli_logger
from ray.autoscaler._private.kuberay.autoscaling_config import \
    _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.kuberay.utils import parse_quantity
from ray.scripts.scripts import start as ray_start_command
from ray.serve.schema import ServeDeploySchema

from adm.config import ConfigError
from helpers import load_job, run_main
from test_cluster_yaml import (capacity_problems, credential_findings, load_cluster, model_paths,
                               pinning_problems)

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "deploy" / "kuberay"
JOBS = KUBERAY / "jobs"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
CRDS = Path(__file__).parent / "fixtures" / "kuberay_crds"
MANIFESTS = sorted(KUBERAY.glob("ray*.yaml")) + sorted(JOBS.glob("ray*.yaml"))
SERVE_CONFIG = ROOT / "serve_configs" / "imagenet512.yaml"
PIPELINE = ("prepare-imagenet", "train-diffusion", "train-classifier", "train-upsampler",
            "sample", "evaluate")

# The one image every manifest names, swapped by the kustomization's images: entry (docs/deploy.md).
IMAGE = "adm-platform:VERSION"
# Where the released model files go in your bucket (docs/deploy.md "Kubernetes").
BUCKET = "s3://YOUR-BUCKET/"
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD", re.IGNORECASE)
# What cluster.yaml's credential scan looks for, less its name patterns: here secret-looking
# names are expected (env entries, secretKeyRef), and secret_problems checks their values.
VALUE_PATTERNS = ("an AWS access key id", "a private key",
                  "a long hex string (Ray tokens are 64 hex digits)")
GI = 2**30
# /dev/shm beyond the object store: Ray wants the whole store free there at start, and NCCL and
# torch's DataLoader workers put their shared memory there too.
SHM_HEADROOM = 1 * GI


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
# Ray clusters: groups and what Ray's KubeRay autoscaler reads.

HEAD = "headgroup"  # the autoscaler's name for the head group's node type


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec" if doc["kind"] == "RayJob" else "rayClusterConfig"]


def groups(doc: dict) -> Iterator[tuple[str, dict]]:
    """(name, group spec) of the head (HEAD) and every worker group."""
    spec = cluster_spec(doc)
    yield HEAD, spec["headGroupSpec"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]


def quantity(value: Any) -> Decimal:
    """A Kubernetes quantity ("8", "500m", "28Gi", "8G") as a number, read by the parser Ray's
    KubeRay autoscaler reads pod resources with (binary suffixes are powers of 1024)."""
    return parse_quantity(value)


def ray_cluster(doc: dict) -> dict:
    """The RayCluster that the RayService or RayJob controller creates from the manifest (the
    autoscaler reads it back from the API server)."""
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster",
            "metadata": {"name": f"{doc['metadata']['name']}-x7k2p", "namespace": "default"},
            "spec": copy.deepcopy(cluster_spec(doc))}


def autoscaler_config(doc: dict) -> dict:
    """The autoscaling config Ray's KubeRay autoscaler builds from the cluster at start (and on
    every iteration); raises what the autoscaler would raise."""
    return _derive_autoscaling_config_from_ray_cr(ray_cluster(doc))


def autoscaler_problems(doc: dict) -> list[str]:
    """The autoscaler reads the cluster, and every group is a node type whose custom resources
    are the workload resource it names, as many as the pod's GPUs (adm_serve, adm_train)."""
    try:
        types = autoscaler_config(doc)["available_node_types"]
    except Exception as e:  # whatever stops the autoscaler stops every scale-up
        return [f"Ray's KubeRay autoscaler cannot read the cluster: {type(e).__name__}: {e}"]
    problems = []
    for name, group in groups(doc):
        offers = types[name]["resources"]
        gpus = quantity(ray_container(group)["resources"]["limits"].get("nvidia.com/gpu", 0))
        for key, amount in offers.items():
            if key.startswith("adm_") and amount != gpus:
                problems.append(f"{name}: {key} {amount} is not the pod's {gpus} GPUs")
    return problems


def offered(doc: dict) -> dict[str, dict[str, float]]:
    """What each group's node offers Ray (CPU, GPU, custom resources; memory apart), as the
    autoscaler plans with it: group name -> resource -> amount, only amounts > 0."""
    types = autoscaler_config(doc)["available_node_types"]
    return {name: {k: float(v) for k, v in types[name]["resources"].items()
                   if k != "memory" and float(v) > 0} for name, _ in groups(doc)}


def kuberay_validation_problems(doc: dict) -> list[str]:
    """KubeRay 1.7.0's own group checks (utils/validation.go, ValidateRayClusterSpec's
    validateRayGroupResources and validateRayGroupLabels): the operator refuses the cluster."""
    problems = []
    for name, group in groups(doc):
        params = group.get("rayStartParams") or {}
        if group.get("resources") and any(params.get(k) for k in
                                          ("num-cpus", "num-gpus", "memory", "resources")):
            problems.append(f"{name}: resource fields in both rayStartParams and resources")
        if "labels" in params:
            problems.append(f"{name}: rayStartParams['labels'] (KubeRay wants the labels field)")
    return problems


# ---------------------------------------------------------------------------------------------
# The Ray container's command, as KubeRay 1.7.0 builds it. Each function follows the Go function
# of ray-operator/controllers/ray/common/pod.go (or utils/) that it names, line by line.

DEFAULT_HEAD_PORT = "6379"  # GetHeadPort without a `port` param
DEFAULT_METRICS_PORT = "8080"  # utils.DefaultMetricsPort
DEFAULT_DASHBOARD_AGENT_LISTEN_PORT = "52365"  # utils.DefaultDashboardAgentListenPort
# convertParamMap's specialParameterOptions: flags that take an explicit true/false value.
BOOLEAN_VALUED = ("log-color", "include-dashboard", "include-log-monitor")
CUSTOM_ACCELERATORS = {"aws.amazon.com/neuroncore": "neuron_cores", "google.com/tpu": "TPU"}
OVERWRITE_CMD = "ray.io/overwrite-container-cmd"  # utils.RayOverwriteContainerCmdAnnotationKey


def go_value(q: Any) -> int:
    """resource.Quantity.Value(): the quantity rounded up to an integer."""
    return math.ceil(quantity(q))


def go_json_floats(values: dict[str, float]) -> str:
    """json.Marshal of a Go map[string]float64: keys sorted, no spaces, integral floats without
    a fraction (the counts written here are integral)."""
    def number(x: float) -> str:
        return str(int(x)) if float(x).is_integer() and abs(x) < 1e21 else repr(float(x))
    return "{" + ",".join(f"{json.dumps(k)}:{number(v)}" for k, v in sorted(values.items())) + "}"


def is_gpu_resource_key(key: str) -> bool:
    """utils.IsGPUResourceKey."""
    return key.endswith("gpu") or re.search(r"nvidia\.com/mig-\d+g\.\d+gb$", key) is not None


def update_ray_start_params_resources(params: dict[str, str], group_resources: dict) -> None:
    """updateRayStartParamsResources: the group's `resources:` field overrides the params."""
    if not group_resources:
        return
    custom = {}
    for name, amount in group_resources.items():
        try:
            value = quantity(amount)
        except ValueError:  # KubeRay logs it and skips the entry
            continue
        lowered = name.lower()
        if lowered == "cpu":
            params["num-cpus"] = str(math.ceil(value))
        elif lowered == "memory":
            params["memory"] = str(math.ceil(value))
        elif is_gpu_resource_key(lowered):
            params["num-gpus"] = str(math.ceil(value))
        else:
            custom[name] = float(value)
    if custom:
        params["resources"] = f"'{go_json_floats(custom)}'"


def update_ray_start_params_labels(params: dict[str, str], labels: dict | None) -> None:
    """updateRayStartParamsLabels."""
    if labels:
        params["labels"] = ",".join(f"{k}={labels[k]}" for k in sorted(labels))


def set_missing_ray_start_params(params: dict[str, str], head: bool, head_port: str,
                                 fqdn_ray_ip: str) -> None:
    """setMissingRayStartParams."""
    if not head and "address" not in params:
        params["address"] = f"{fqdn_ray_ip}:{head_port}"
    if head and "dashboard-host" not in params:
        params["dashboard-host"] = "0.0.0.0"
    params.setdefault("metrics-export-port", DEFAULT_METRICS_PORT)
    params["block"] = "true"
    params.setdefault("dashboard-agent-listen-port", DEFAULT_DASHBOARD_AGENT_LISTEN_PORT)


def get_resources_map(params: dict[str, str]) -> dict[str, float]:
    """getResourcesMap: the `resources` param, outer quotes trimmed, as a JSON object of
    numbers (json.Unmarshal into map[string]float64); ValueError where Go returns an error."""
    if "resources" not in params:
        return {}
    values = json.loads(params["resources"].strip("'\"` "))
    if not isinstance(values, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values.values()):
        raise ValueError(f"not a JSON object of numbers: {params['resources']}")
    return {k: float(v) for k, v in values.items()}


def add_well_known_accelerator_resources(params: dict[str, str], limits: dict) -> None:
    """addWellKnownAcceleratorResources (its error is only logged by the caller)."""
    if not limits:
        return
    try:
        resources = get_resources_map(params)
    except ValueError:
        return
    added = any(r in resources for r in CUSTOM_ACCELERATORS.values())
    for key in sorted(limits):
        value = limits[key]
        if "num-gpus" not in params and is_gpu_resource_key(key) and quantity(value) != 0:
            params["num-gpus"] = str(go_value(value))
        if not added and key in CUSTOM_ACCELERATORS and quantity(value) != 0:
            if CUSTOM_ACCELERATORS[key] not in resources:
                resources[CUSTOM_ACCELERATORS[key]] = float(quantity(value))
                params["resources"] = f"'{go_json_floats(resources)}'"
            added = True


def convert_param_map(params: dict[str, str]) -> str:
    """convertParamMap: ` --key=value ` per param in key order, pasted as is (no quoting);
    true/false values become a bare ` --key ` or nothing, except the BOOLEAN_VALUED flags."""
    flags = ""
    for option in sorted(params):
        argument = params[option]
        if argument.lower() in ("true", "false") and option not in BOOLEAN_VALUED:
            if argument.lower() == "true":
                flags += f" --{option} "
        else:
            flags += f" --{option}={argument} "
    return flags


def generate_ray_start_command(head: bool, params: dict[str, str], resources: dict) -> str:
    """generateRayStartCommand."""
    limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
    if "num-cpus" not in params:
        for source in (limits, requests):
            if quantity(source.get("cpu", 0)) != 0:
                params["num-cpus"] = str(go_value(source["cpu"]))
                break
    if "memory" not in params and quantity(limits.get("memory", 0)) != 0:
        params["memory"] = str(go_value(limits["memory"]))
    add_well_known_accelerator_resources(params, limits)
    return f"ray start {'--head ' if head else ''}{convert_param_map(params)}"


def convert_cmd_to_string(words: list[str]) -> str:
    """convertCmdToString."""
    return "".join(f" {w} " for w in words)


def ray_container_command(doc: dict, name: str, group: dict) -> list[str]:
    """The Ray container's command + args in the pod KubeRay creates for a group: what
    DefaultHeadPodTemplate / DefaultWorkerPodTemplate and then BuildPod make of it."""
    spec = cluster_spec(doc)
    cluster = ray_cluster(doc)["metadata"]
    head = name == HEAD
    params = dict(group.get("rayStartParams") or {})
    head_port = spec["headGroupSpec"].get("rayStartParams", {}).get("port", DEFAULT_HEAD_PORT)
    fqdn = f"{cluster['name']}-head-svc.{cluster['namespace']}.svc.cluster.local"
    update_ray_start_params_resources(params, group.get("resources"))
    update_ray_start_params_labels(params, group.get("labels"))
    set_missing_ray_start_params(params, head, head_port, "" if head else fqdn)
    if head and spec.get("enableInTreeAutoscaling"):
        params["no-monitor"] = "true"  # the autoscaler runs as a sidecar instead
    container = ray_container(group)
    ray_start = generate_ray_start_command(head, params, container.get("resources") or {})
    cmd = (convert_cmd_to_string(container.get("command") or [])
           + convert_cmd_to_string(container.get("args") or []))
    annotations = (group["template"].get("metadata") or {}).get("annotations") or {}
    if annotations.get(OVERWRITE_CMD, "").lower() == "true" or "ray start" in cmd:
        return [*(container.get("command") or []), *(container.get("args") or [])]
    generated = f"ulimit -n ${{RAY_START_ULIMIT_OPEN_FILES:-65536}}; {ray_start}"
    # utils.GetContainerCommand([]) (the operator's ENABLE_LOGIN_SHELL unset): bash -c --
    return ["/bin/bash", "-c", "--", f"{cmd} && {generated}" if cmd else generated]


# ---------------------------------------------------------------------------------------------
# That command run by real bash, and `ray start`'s own parser on what bash passes it.

# A stand-in for `ray`: records the argv bash gives it, as JSON.
RECORD_ARGV = """import json, os, sys
with open(os.environ["ADM_RAY_ARGV"], "w") as f:
    json.dump(sys.argv[1:], f)
"""


@functools.lru_cache(maxsize=None)
def stub_folder() -> Path:
    """A folder holding the stub `ray` (kept for the session, removed at exit)."""
    folder = Path(tempfile.mkdtemp(prefix="adm-stub-ray-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    (folder / "record_argv.py").write_text(RECORD_ARGV)
    stub = folder / "ray"
    stub.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -I '
                    f'{shlex.quote(str(folder / "record_argv.py"))} "$@"\n')
    stub.chmod(0o755)
    return folder


def run_in_bash(command: list[str]) -> list[str]:
    """Exec `command` (a container's command + args) with the stub `ray` first on PATH; the
    argv `ray` got (after the program name). AssertionError if `ray` never ran."""
    folder = stub_folder()
    record = folder / f"argv-{os.getpid()}-{len(command)}-{abs(hash(tuple(command)))}.json"
    record.unlink(missing_ok=True)
    soft = rlimit.getrlimit(rlimit.RLIMIT_NOFILE)[0]
    env = {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ.get('PATH', '')}",
           "ADM_RAY_ARGV": str(record), "RAY_START_ULIMIT_OPEN_FILES": str(soft)}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and record.exists(), (command, proc.returncode, proc.stderr)
    return json.loads(record.read_text())


def raylet_resources(argv: list[str]) -> dict[str, float]:
    """What `ray start` makes of `argv` (its words after `ray`), parsed by its own click
    command and its own --resources reader: resource -> amount (CPU, GPU, memory, custom;
    only amounts > 0). ValueError with the reason where `ray start` would refuse."""
    if argv[:1] != ["start"]:
        raise ValueError(f"not `ray start`: {argv[:2]}")
    loose = [w for w in argv[1:] if not w.startswith("--")]
    if loose:  # ray start takes no positional argument: a flag that bash split in two
        raise ValueError(f"words that are no flag: {loose}")
    try:
        params = ray_start_command.make_context("ray start", list(argv[1:])).params
        custom = (parse_resources_json(params["resources"], cli_logger, cf)
                  if params.get("resources") else {})
    except click.ClickException as e:
        raise ValueError(f"ray start refuses {argv[1:]}: {e.format_message()}") from None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in custom.values()):
        raise ValueError(f"--resources is not a JSON object of numbers: {custom}")
    have = {"CPU": params.get("num_cpus"), "GPU": params.get("num_gpus"),
            "memory": params.get("memory"), **custom}
    return {k: float(v) for k, v in have.items() if v is not None and float(v) > 0}


def start_line_problems(doc: dict) -> list[str]:
    """Each group's pod command, run by bash, is a `ray start` that Ray accepts, and tells the
    raylet what the autoscaler plans with (CPU, GPU, memory, every custom resource)."""
    problems = []
    try:
        types = autoscaler_config(doc)["available_node_types"]
    except Exception:  # autoscaler_problems reports it; still check the command lines
        types = None
    for name, group in groups(doc):
        try:
            raylet = raylet_resources(run_in_bash(ray_container_command(doc, name, group)))
        except ValueError as e:
            problems.append(f"{name}: {e}")
            continue
        if types is not None:
            plans = {k: float(v) for k, v in types[name]["resources"].items() if float(v) > 0}
            if plans != raylet:
                problems.append(f"{name}: the autoscaler plans with {plans}, the raylet is "
                                f"told {raylet}")
    return problems


# ---------------------------------------------------------------------------------------------
# Pods: resources, the object store and /dev/shm.


def gib(amount: Decimal | int) -> str:
    """Bytes as Gi, for messages."""
    return f"{float(amount) / GI:.4g}Gi"


def object_store_folder(memory: int, shm: int, store: int | None) -> str:
    """Where Ray 2.60's `ray start` puts the object store in a pod with `memory` bytes of memory
    and a /dev/shm of `shm` bytes, for --object-store-memory `store` (None: Ray's default for a
    fresh pod): Ray's own functions, with its two probes of the machine answering as that pod's
    would. Raises what `ray start` would raise."""
    import ray._common.utils
    import ray._private.utils
    from ray._private.services import determine_plasma_store_config

    with pytest.MonkeyPatch.context() as probes, tempfile.TemporaryDirectory() as temp_dir:
        probes.setattr(ray._private.utils, "get_shared_memory_bytes", lambda: shm)
        probes.setattr(ray._common.utils, "get_system_memory", lambda: memory)
        if store is None:
            store = ray._private.utils.resolve_object_store_memory(memory)
        folder, _, _ = determine_plasma_store_config(store, temp_dir)
        return "/dev/shm" if folder == "/dev/shm" else "disk"


def shm_problems(doc: dict) -> list[str]:
    """Every group sets object-store-memory (bytes, as `ray start` takes it) and mounts a
    memory emptyDir at /dev/shm that holds it with SHM_HEADROOM to spare, so Ray keeps the
    store in memory (asked of Ray's own code); that volume counts inside the pod's memory
    limit, so it takes at most half of it, and the store is at least a tenth of it."""
    problems = []
    for name, group in groups(doc):
        container = ray_container(group)
        memory = quantity(container["resources"]["limits"]["memory"])
        mounts = [m["name"] for m in container.get("volumeMounts", [])
                  if m.get("mountPath") == "/dev/shm"]
        volumes = {v["name"]: v for v in group["template"]["spec"].get("volumes", [])}
        shm_dir = (volumes.get(mounts[0], {}).get("emptyDir") or {}) if mounts else {}
        if shm_dir.get("medium") != "Memory" or "sizeLimit" not in shm_dir:
            problems.append(f"{name}: no memory emptyDir with a sizeLimit at /dev/shm")
            continue
        shm = quantity(shm_dir["sizeLimit"])
        store_text = (group.get("rayStartParams") or {}).get("object-store-memory")
        store = Decimal(store_text) if str(store_text).isdigit() else None
        try:
            folder = object_store_folder(int(memory), int(shm), None if store is None else
                                         int(store))
        except ValueError as e:  # `ray start` refuses a store far larger than /dev/shm
            folder = f"nowhere ({e})"
        if folder != "/dev/shm":
            problems.append(f"{name}: Ray puts the object store on {folder}, not /dev/shm")
        if store is None:
            problems.append(f"{name}: object-store-memory {store_text!r} is not a byte count")
            continue
        if store + SHM_HEADROOM > shm:
            problems.append(f"{name}: object store {gib(store)} + {gib(SHM_HEADROOM)} > "
                            f"/dev/shm {gib(shm)}")
        if shm > memory / 2:
            problems.append(f"{name}: /dev/shm {gib(shm)} > half the {gib(memory)} limit")
        if store < memory / 10:
            problems.append(f"{name}: object store {gib(store)} < a tenth of {gib(memory)}")
    return problems


def as_cluster_yaml(doc: dict) -> dict:
    """A manifest's Ray cluster in cluster.yaml's shape, for cluster.yaml's fit checks."""
    offers = offered(doc)
    types = {name: {"resources": offers[name], "max_workers": g.get("maxReplicas", 1)}
             for name, g in groups(doc)}
    return {"head_node_type": HEAD, "available_node_types": types,
            "max_workers": sum(t["max_workers"] for n, t in types.items() if n != HEAD)}


def resource_problems(doc: dict) -> list[str]:
    """Pod resources vs what Ray is told: requests == limits, CPUs and GPUs agree."""
    problems = []
    offers = offered(doc)
    for name, group in groups(doc):
        res = ray_container(group).get("resources", {})
        requests, limits = res.get("requests", {}), res.get("limits", {})
        if requests != limits or not {"cpu", "memory"} <= set(limits):
            problems.append(f"{name}: requests {requests} != limits {limits} (cpu, memory)")
            continue
        ray = offers[name]
        cpus = float(quantity(limits["cpu"]))
        # The head may keep CPUs for Ray's control plane (num-cpus below its cores); a worker
        # offers Ray exactly its pod's CPUs.
        if ray.get("CPU", 0.0) > cpus or (name != HEAD and ray.get("CPU", 0.0) != cpus):
            problems.append(f"{name}: Ray's CPU {ray.get('CPU', 0):g} vs cpu limit {cpus:g}")
        gpus = float(quantity(limits.get("nvidia.com/gpu", 0)))
        if ray.get("GPU", 0.0) != gpus:
            problems.append(f"{name}: Ray's GPU {ray.get('GPU', 0):g} vs nvidia.com/gpu {gpus:g}")
        if name != HEAD:
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
    offers = offered(doc)
    problems = []
    for name, group in list(groups(doc))[1:]:
        ray = offers[name]
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
# The RayService's Serve config.


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


# ---------------------------------------------------------------------------------------------
# The RayJobs' entrypoints, in the image.


def image_folders() -> dict[str, Path]:
    """What deploy/docker/Dockerfile puts in the image: absolute image path -> the repository's
    file or folder it copies (COPY's sources, relative to the build context = the repository
    root, into a destination relative to the WORKDIR in force)."""
    workdir, copied = "/", {}
    for line in DOCKERFILE.read_text().splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["WORKDIR"]:
            workdir = os.path.join(workdir, words[1])
        elif words[:1] == ["COPY"]:
            *sources, dest = [w for w in words[1:] if not w.startswith("--")]
            dest = os.path.normpath(os.path.join(workdir, dest))
            for source in sources:
                target = dest if len(sources) == 1 and not (ROOT / source).is_file() else \
                    os.path.join(dest, Path(source).name)
                copied[target] = ROOT / source
    return copied


def in_repository(image_path: str) -> Path | None:
    """The repository's copy of a path inside the image, or None if the image has none."""
    for folder, source in image_folders().items():
        if image_path == folder or image_path.startswith(folder.rstrip("/") + "/"):
            return source / os.path.relpath(image_path, folder)
    return None


def local_path(word: str) -> str | None:
    """The file path a command-line word names (a word, or the value of --opt=value), or None
    for flags, numbers, overrides and URIs."""
    value = word.split("=", 1)[1] if word.startswith("--") and "=" in word else word
    if "://" in value or value.startswith("-") or "/" not in value:
        return None
    return value


@functools.lru_cache(maxsize=None)
def help_elsewhere(script: Path) -> str:
    """`python script --help` run as a script from an empty folder: its stderr if it fails,
    else "" (once per script: a training job's --help imports torch)."""
    with tempfile.TemporaryDirectory() as elsewhere:
        run = subprocess.run([sys.executable, str(script), "--help"], cwd=elsewhere,
                             capture_output=True, text=True, timeout=120)
    return "" if run.returncode == 0 and "usage:" in run.stdout else run.stderr or run.stdout


def entrypoint_problems(doc: dict) -> list[str]:
    """The entrypoint is `python <image path of jobs/<job>.py> ...` whose every file path is
    absolute, in the image and in the repository; run from another folder, the script starts
    (--help), its parser and settings accept the command (--check, its config file loaded),
    and its GPU actors fit the cluster's GPUs."""
    argv = shlex.split(doc["spec"].get("entrypoint") or "")  # the job supervisor's shell
    if len(argv) < 2 or argv[0] != "python" or not argv[1].endswith(".py"):
        return ["entrypoint is not `python <job>.py ...`"]
    problems, local = [], list(argv)
    for i, word in enumerate(argv[1:], 1):
        path = local_path(word)
        if path is None:
            continue
        source = in_repository(path) if path.startswith("/") else None
        if not path.startswith("/"):
            problems.append(f"entrypoint: {path} is relative to the driver's folder")
        elif source is None or not source.exists():
            problems.append(f"entrypoint: {path} is not in the image's copy of the repository")
        else:
            local[i] = word.replace(path, str(source))
    if problems:
        return problems
    script, args = Path(local[1]), local[2:]
    failed = help_elsewhere(script)
    if failed:
        return [f"entrypoint: {script.name} --help from another folder: {failed}"]
    with tempfile.TemporaryDirectory() as elsewhere:
        # The job's own --check: its parser and its settings, nothing read or started.
        err = io.StringIO()
        with contextlib.chdir(elsewhere), contextlib.redirect_stderr(err), \
                contextlib.redirect_stdout(io.StringIO()):
            try:
                status = run_main(script.stem, [*args, "--check"])
            except SystemExit as e:  # argparse's way of refusing
                status = e.code
        if status != 0:
            return [f"entrypoint: {script.name} --check refuses it: {err.getvalue().strip()}"]
        try:
            gpus = job_gpus(script.name, args)
        except SystemExit:  # argparse's way of refusing
            return [f"entrypoint: {script.name}'s parser refuses {args}"]
        except ConfigError as e:
            return [f"entrypoint: {script.name}'s config: {e}"]
    have = sum(g.get("maxReplicas", 1) * offered(doc)[n].get("GPU", 0.0) for n, g in groups(doc))
    if gpus > have:
        return [f"{script.name}: {gpus} GPU actors, the cluster has at most {have:g} GPUs"]
    return []


# A RayJob's job: (script, how its parser is called, how much GPU its actors take).
TRAIN_KINDS = {"train_diffusion.py": "diffusion", "train_classifier.py": "classifier",
               "train_upsampler.py": "upsampler"}


def job_gpus(script: str, args: list[str]) -> int:
    """How many GPU actors the job's command line asks for, after its parser (and its config
    loader, for a --config file) accepted it."""
    if script in TRAIN_KINDS:
        from adm.train.cli import parse_args
        from adm.train.config import load_config

        ns = parse_args(TRAIN_KINDS[script], args)
        # The job's own options, as adm.train.cli.resolve_config passes them (less the val
        # split, which it looks up in storage).
        cfg = load_config(ns.config, ns.overrides, run__num_workers=ns.num_workers,
                          run__use_gpu=True if ns.gpus else None, run__storage=ns.storage,
                          data__uri=ns.data)
        assert cfg.kind == TRAIN_KINDS[script], (script, cfg.kind)
        return cfg.run.num_workers if cfg.run.use_gpu else 0
    ns = load_job(script.removesuffix(".py")).parse_args(args)
    if script == "sample.py":
        from adm.generate import load_sample_config

        cfg = load_sample_config(ns.config, ns.overrides, model=ns.model,
                                 classifier=ns.classifier, upsampler=ns.upsampler, out=ns.out,
                                 num_workers=ns.num_workers, gpus=ns.gpus)
        return (cfg.num_workers + (cfg.upsampler_workers or cfg.num_workers)) if cfg.gpus else 0
    return ns.num_workers if getattr(ns, "gpus", False) else 0


# ---------------------------------------------------------------------------------------------
# The kustomization.


def kustomization_problems(folder: Path) -> list[str]:
    """What `kubectl apply -k folder` would apply holds no RayJob (applying one starts it), and
    every resource it names exists; a folder it names is read as a kustomization too."""
    problems = []
    for entry in load(folder / "kustomization.yaml").get("resources", []):
        path = folder / entry
        if path.is_dir():
            problems += (kustomization_problems(path) if (path / "kustomization.yaml").exists()
                         else [f"{entry}: a folder without a kustomization"])
        elif not path.is_file():
            problems.append(f"{entry}: no such file")
        else:
            problems += [f"{entry}: a RayJob ({d['metadata']['name']}) starts when applied"
                         for d in yaml.safe_load_all(path.read_text())
                         if d and d.get("kind") == "RayJob"]
    return problems


# ---------------------------------------------------------------------------------------------
# The real manifests.


def test_every_job_and_the_endpoint_have_a_manifest_and_apply_k_starts_no_job() -> None:
    assert [p.name for p in MANIFESTS if p.parent == KUBERAY] == ["rayservice-imagenet512.yaml"]
    assert sorted(p.name for p in MANIFESTS if p.parent == JOBS) == sorted(
        f"rayjob-{j}.yaml" for j in PIPELINE)
    assert all(load(p)["kind"] == "RayJob" for p in MANIFESTS if p.parent == JOBS)
    kustomization = load(KUBERAY / "kustomization.yaml")
    assert kustomization["resources"] == ["rayservice-imagenet512.yaml"]
    assert kustomization_problems(KUBERAY) == []
    # No kustomization beside the jobs: `kubectl apply -k deploy/kuberay/jobs` cannot start
    # all six at once.
    assert not (JOBS / "kustomization.yaml").exists()
    name, tag = IMAGE.split(":")
    assert kustomization["images"] == [{"name": name, "newName": name, "newTag": tag}]


def test_kustomization_check_reports_a_job_it_would_apply(tmp_path: Path) -> None:
    (tmp_path / "jobs").mkdir()
    job = JOBS / "rayjob-sample.yaml"
    (tmp_path / "jobs" / job.name).write_text(job.read_text())
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(
        {"resources": ["jobs/rayjob-sample.yaml", "jobs", "missing.yaml"]}))
    assert kustomization_problems(tmp_path) == [
        "jobs/rayjob-sample.yaml: a RayJob (adm-sample) starts when applied",
        "jobs: a folder without a kustomization", "missing.yaml: no such file"]


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_manifest_passes_its_crd_and_the_checks(path: Path) -> None:
    doc = load(path)
    assert schema_problems(doc) == []
    assert kuberay_validation_problems(doc) == []
    assert autoscaler_problems(doc) == []
    assert start_line_problems(doc) == []
    assert shm_problems(doc) == []
    assert resource_problems(doc) == []
    assert mirror_problems(doc) == []
    assert image_problems(doc) == []
    assert secret_problems(doc, path.read_text()) == []
    if doc["kind"] == "RayJob":
        assert doc["spec"]["shutdownAfterJobFinishes"] is True
        assert entrypoint_problems(doc) == []


def test_workload_resources_reach_the_autoscaler_and_the_raylet() -> None:
    """The figures themselves, for one serving and one training group."""
    service = load(KUBERAY / "rayservice-imagenet512.yaml")
    types = autoscaler_config(service)["available_node_types"]
    assert types["gpu-serve"]["resources"] == {"CPU": 7, "GPU": 1, "memory": 28 * GI,
                                               "adm_serve": 1}
    group = dict(groups(service))["gpu-serve"]
    argv = run_in_bash(ray_container_command(service, "gpu-serve", group))
    assert "--resources={\"adm_serve\":1}" in argv and "--object-store-memory=7516192768" in argv
    train = load(JOBS / "rayjob-train-diffusion.yaml")
    assert offered(train)["gpu-train"] == {"CPU": 90.0, "GPU": 8.0, "adm_train": 8.0}


def test_quantities_are_read_as_kubernetes_reads_them() -> None:
    assert quantity("28Gi") == 28 * 2**30 and quantity("8G") == 8 * 10**9
    assert quantity("500m") == Decimal("0.5") and quantity("16Mi") == 16 * 2**20
    assert quantity("7") == 7


def test_kuberays_escaped_ray_start_params_form_is_read_right_too() -> None:
    """KubeRay's documented rayStartParams form, '"{\\"adm_serve\\": 1}"', passes both readers:
    the reconstruction and the checks read it as the real components do, not one spelling."""
    doc = load(KUBERAY / "rayservice-imagenet512.yaml")
    group = cluster_spec(doc)["workerGroupSpecs"][0]
    del group["resources"]
    group["rayStartParams"].update({"num-cpus": "7", "num-gpus": "1",
                                    "resources": '"{\\"adm_serve\\": 1}"'})
    assert kuberay_validation_problems(doc) == []
    assert autoscaler_problems(doc) == []
    assert start_line_problems(doc) == []


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
    text = DOCKERFILE.read_text()
    ray_pin = re.search(r'ray\[[^]]*\]==([\d.]+)\.\*', (ROOT / "pyproject.toml").read_text())
    torch_pin = re.search(r"TORCH_SPEC \?= (torch==\S+)", (ROOT / "Makefile").read_text())
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray_pin.group(1))}\.\d+-py311-gpu$",
                     text, re.M), "the base image is pyproject's Ray, pinned"
    assert f"ARG TORCH_SPEC={torch_pin.group(1)}" in text
    assert re.search(r"^USER ray$", text.strip().splitlines()[-1]), "runs as the image's `ray`"
    assert len(re.findall(r"^FROM ", text, re.M)) == 1, "one stage, from the pinned image"
    assert not re.search(r"(?i)^(ARG|ENV)\s+\w*(KEY|SECRET|TOKEN|PASSWORD)", text, re.M)
    assert in_repository("/home/ray/adm/jobs/sample.py") == ROOT / "jobs" / "sample.py"
    for manifest in MANIFESTS:
        assert f'rayVersion: "{ray_pin.group(1)}.0"' in manifest.read_text(), manifest.name


# ---------------------------------------------------------------------------------------------
# Each guard on a broken copy.


def _rayjob() -> dict:
    return load(JOBS / "rayjob-train-diffusion.yaml")


def _worker(doc: dict) -> dict:
    return cluster_spec(doc)["workerGroupSpecs"][0]


def _head(doc: dict) -> dict:
    return cluster_spec(doc)["headGroupSpec"]


def _plain_json_resources(doc: dict) -> None:
    """The form these manifests once used: JSON pasted into rayStartParams as is."""
    group = _worker(doc)
    del group["resources"]
    group["rayStartParams"].update({"num-cpus": "90", "num-gpus": "8",
                                    "resources": '{"adm_train": 8}'})


def _entrypoint(old: str, new: str) -> Callable[[dict], None]:
    return lambda d: d["spec"].update(entrypoint=d["spec"]["entrypoint"].replace(old, new))


BROKEN: dict[str, tuple[Callable[[dict], None], Callable[[dict], list[str]], str]] = {
    "plain-json-resources-autoscaler": (_plain_json_resources, autoscaler_problems,
                                        "cannot read the cluster: JSONDecodeError"),
    "plain-json-resources-bash": (_plain_json_resources, start_line_problems,
                                  r"words that are no flag: \['8}'\]"),
    "resources-in-both-places": (lambda d: _worker(d)["rayStartParams"].update(
        {"num-cpus": "90"}), kuberay_validation_problems, "in both rayStartParams and"),
    "lowercase-cpu": (lambda d: _worker(d).update(resources={"cpu": "90", "GPU": "8",
                                                             "adm_train": "8"}),
                      start_line_problems, "the autoscaler plans with .*'cpu': 90"),
    "workload-resource-not-gpus": (lambda d: _worker(d)["resources"].update(adm_train="4"),
                                   autoscaler_problems, "adm_train 4 is not the pod's 8 GPUs"),
    "no-object-store-size": (lambda d: _worker(d)["rayStartParams"].pop("object-store-memory"),
                             shm_problems, "gpu-train: object-store-memory None"),
    "ray-default-store-on-disk": (lambda d: _head(d)["rayStartParams"].pop(
        "object-store-memory"), shm_problems, "headgroup: Ray puts the object store on disk"),
    "store-over-shm": (lambda d: _head(d)["rayStartParams"].update(
        {"object-store-memory": str(8 * GI)}), shm_problems, r"8Gi \+ 1Gi > /dev/shm 8Gi"),
    "shm-in-G-not-Gi": (lambda d: _worker(d)["template"]["spec"]["volumes"][0]["emptyDir"]
                        .update(sizeLimit="200G"), shm_problems, "> /dev/shm 186.3Gi"),
    "shm-over-half-the-memory": (lambda d: _worker(d)["template"]["spec"]["volumes"][0]
                                 ["emptyDir"].update(sizeLimit="600Gi"), shm_problems,
                                 "600Gi > half the 1000Gi"),
    "relative-entrypoint": (_entrypoint("/home/ray/adm/", ""), entrypoint_problems,
                            "jobs/train_diffusion.py is relative to the driver's folder"),
    "config-not-in-image": (_entrypoint("adm128.yaml", "adm999.yaml"), entrypoint_problems,
                            "adm999.yaml is not in the image's copy"),
    "min-replicas-a-word": (lambda d: _worker(d).update(minReplicas="two"), schema_problems,
                            "minReplicas: 'two' is not of type 'integer'"),
    "typo-field": (lambda d: _worker(d).update(maxReplica=3), schema_problems, "maxReplica"),
    "cpu-a-number": (lambda d: _worker(d)["resources"].update(CPU=90), schema_problems,
                     "90 is not of type 'string'"),
    "missing-entrypoint": (lambda d: d["spec"].pop("entrypoint"), entrypoint_problems,
                           "is not `python <job>.py ...`"),
    "unknown-flag": (lambda d: d["spec"].update(entrypoint=d["spec"]["entrypoint"] + " --nodes 2"),
                     entrypoint_problems, "unrecognized arguments: --nodes"),
    "too-many-gpus": (_entrypoint("--num-workers 16", "--num-workers 32"), entrypoint_problems,
                      "32 GPU actors"),
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
    "gpus-disagree": (lambda d: _worker(d)["resources"].update(GPU="4"), resource_problems,
                      "Ray's GPU 4 vs nvidia.com/gpu 8"),
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
