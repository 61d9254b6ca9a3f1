"""cluster.yaml, checked offline: no network, no AWS call.

* It passes the JSON schema that ships inside the installed Ray package, and Ray's own
  cross-field checks (head type known, min_workers within max_workers).
* Its node types are what the platform needs (a CPU head, 8-GPU training nodes, GPU serving
  nodes) and their declared resources match their instance types.
* Token authentication is on for every node, the dashboard and job API listen on loopback only,
  and no credential or secret value is written in the file.
* Every node installs the project, and the serving nodes get the checkpoints the GPU Serve
  configs name.
* Every serve_configs/*.yaml fits: each replica's num_cpus, num_gpus and custom resources fit
  some node type, and max_replicas of them fit in the max_workers nodes of the types that can
  host them; GPU replicas ask for the serving nodes' custom resource.

The fit check is generic over Serve's config-file schema; a sample config written here shows
that it passes a good config and reports each kind of broken one.
"""
from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jsonschema
import pytest
import ray.autoscaler
import yaml
# Private, but the offline validation Ray itself runs in `ray up`; Ray is pinned (2.60.*).
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import RayActorOptionsSchema, ServeDeploySchema

from adm.config import ConfigError, from_dict
from adm.evaluate.evaluation import FeatureJob
from adm.generate.config import SampleConfig
from adm.nodetypes import (BATCH_RESOURCE, SERVE_RESOURCE, TRAIN_RESOURCE, NodeType,
                           NodeTypeMismatch, NoTrainingNodeType, check_fits, fits, node_types,
                           parse_resources, training_resources, worker_demand)
from adm.simcluster import SimSettings, fake_multinode_config
from adm.train.config import RunSection, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
SERVE_DIR = ROOT / "serve_configs"
SERVE_CONFIGS = sorted(SERVE_DIR.glob("*.yaml"))

# Serve gives a replica 1 CPU when its ray_actor_options leave num_cpus out.
SERVE_DEFAULT_NUM_CPUS = 1.0

# (vCPUs, GPUs) of the instance types cluster.yaml uses or names as alternatives, from AWS's
# instance type pages; a type not listed here fails the test until it is added.
INSTANCE_TYPES = {
    "m5.2xlarge": (8, 0),
    "m5.4xlarge": (16, 0),
    "c6i.8xlarge": (32, 0),
    "g5.2xlarge": (8, 1),
    "g5.12xlarge": (48, 4),
    "g6.2xlarge": (8, 1),
    "g6e.2xlarge": (8, 1),
    "p4d.24xlarge": (96, 8),
    "p5.48xlarge": (192, 8),
}


def load_cluster(path: Path = CLUSTER_YAML) -> dict:
    """cluster.yaml as `ray up` reads it (YAML anchors resolved)."""
    return yaml.safe_load(path.read_text())


def ray_schema() -> dict:
    """The cluster-config JSON schema inside the installed Ray package."""
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


# ---------------------------------------------------------------------------------------------
# Node types and Serve replicas, as resource dictionaries.


@dataclass(frozen=True)
class NodePool:
    """A node type: the resources one node offers and how many such nodes there can be."""

    name: str
    resources: dict[str, float]
    count: int  # the head: 1; a worker type: its max_workers


@dataclass(frozen=True)
class Replica:
    """One Serve deployment: what each replica asks Ray for, and at most how many run."""

    where: str  # "file: app/deployment"
    demand: dict[str, float]  # resource name -> amount (CPU, GPU, custom), only those > 0
    max_replicas: int


def node_pools(cluster: dict) -> list[NodePool]:
    """Every node type of a cluster config, the head first."""
    head = cluster["head_node_type"]
    pools = []
    for name, node_type in cluster["available_node_types"].items():
        count = 1 if name == head else int(node_type.get("max_workers", cluster["max_workers"]))
        pools.append(NodePool(name, {k: float(v) for k, v in node_type["resources"].items()},
                              count))
    return sorted(pools, key=lambda p: p.name != head)


def serve_config(path: Path) -> dict:
    """A Serve config file, checked against Serve's own config schema."""
    raw = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(raw)
    return raw


def replica_demand(options: dict) -> dict[str, float]:
    """The resources one replica asks for, from its ray_actor_options (and placement group
    bundles, summed: conservatively, they have to fit on one node). Memory is left out: cluster
    nodes advertise it by auto-detection, not in cluster.yaml."""
    demand = {"CPU": float(options.get("num_cpus", SERVE_DEFAULT_NUM_CPUS) or 0.0),
              "GPU": float(options.get("num_gpus") or 0.0)}
    for name, amount in (options.get("resources") or {}).items():
        demand[name] = demand.get(name, 0.0) + float(amount)
    return {k: v for k, v in demand.items() if v > 0}


def max_replicas(deployment: dict) -> int:
    """At most how many replicas Serve runs for a deployment entry of a config file."""
    auto = deployment.get("autoscaling_config")
    if deployment.get("num_replicas") == "auto":
        merged = AutoscalingConfig.default().model_dump(exclude_unset=True)
        merged.update(auto or {})
        return AutoscalingConfig(**merged).max_replicas
    if auto:
        return AutoscalingConfig(**auto).max_replicas
    return int(deployment.get("num_replicas") or 1)


def replicas(config: dict, label: str = "") -> list[Replica]:
    """Every deployment a Serve config lists, as Replica demands."""
    out = []
    for app in config.get("applications", []):
        for dep in app.get("deployments", []):
            options = dict(dep.get("ray_actor_options") or {})
            demand = replica_demand(options)
            for bundle in dep.get("placement_group_bundles") or []:
                for k, v in bundle.items():
                    demand[k] = demand.get(k, 0.0) + float(v)
            out.append(Replica(f"{label}{app.get('name', '?')}/{dep['name']}", demand,
                               max_replicas(dep)))
    return out


def slots(node: dict[str, float], demand: dict[str, float]) -> int:
    """How many replicas with this demand one node holds (0: it does not fit)."""
    return min((math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in demand.items()),
               default=1_000_000)


def capacity_problems(cluster: dict, config: dict, label: str = "") -> list[str]:
    """What in a Serve config the cluster cannot host, one line each (empty: it fits)."""
    pools = node_pools(cluster)
    problems = []
    for dep in (d for app in config.get("applications", []) for d in app.get("deployments", [])):
        unknown = set(dep.get("ray_actor_options") or {}) - set(RayActorOptionsSchema.model_fields)
        if unknown:  # Serve accepts them silently: a typo (num_gpu) would lose the GPU
            problems.append(f"{label}{dep['name']}: unknown ray_actor_options {sorted(unknown)}")
    reps = replicas(config, label)
    for rep in reps:
        fit = {p.name: p.count * slots(p.resources, rep.demand) for p in pools
               if slots(p.resources, rep.demand) > 0}
        if not fit:
            problems.append(f"{rep.where}: a replica needs {rep.demand}, which fits no node type "
                            f"({', '.join(f'{p.name} {p.resources}' for p in pools)})")
        elif rep.max_replicas > sum(fit.values()):
            problems.append(f"{rep.where}: max_replicas {rep.max_replicas}, but the node types "
                            f"that fit a replica hold at most {sum(fit.values())} ({fit})")
    # All deployments of the file run at once: their GPUs and custom resources at max_replicas
    # must fit in the node types that can host them.
    for resource in sorted({k for r in reps for k in r.demand} - {"CPU"}):
        users = [r for r in reps if resource in r.demand]
        hosts = {p.name: p for r in users for p in pools if slots(p.resources, r.demand) > 0}
        need = sum(r.max_replicas * r.demand[resource] for r in users)
        have = sum(p.count * p.resources.get(resource, 0.0) for p in hosts.values())
        if hosts and need > have:
            problems.append(f"{label}all deployments at max_replicas need {need:g} {resource}, "
                            f"the node types that host them have {have:g} ({sorted(hosts)})")
    return problems


def pinning_problems(config: dict, label: str = "") -> list[str]:
    """GPU replicas that do not ask for the serving nodes' custom resource (as many as GPUs)."""
    return [f"{r.where}: num_gpus {r.demand['GPU']:g} but resources {{{SERVE_RESOURCE}: "
            f"{r.demand.get(SERVE_RESOURCE, 0):g}}}; ask for {SERVE_RESOURCE}: {r.demand['GPU']:g}"
            for r in replicas(config, label)
            if r.demand.get("GPU") and r.demand.get(SERVE_RESOURCE) != r.demand["GPU"]]


# ---------------------------------------------------------------------------------------------
# Credentials and commands.

CREDENTIAL_PATTERNS = {
    "an AWS key setting": r"(?i)aws_(access_key_id|secret_access_key|session_token)",
    "an AWS access key id": r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",
    "a private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "a Ray token value": r"RAY_AUTH_TOKEN\s*[=:]",
    "an API key value": r"(?i)\b\w*API_KEY\s*=\s*[\"']?[^\s\"'$]",
    "a password or secret setting": r"(?i)(password|passwd|secret)\w*\s*[:=]\s*\S",
    "a long hex string (Ray tokens are 64 hex digits)": r"\b[0-9a-fA-F]{32,}\b",
}


def credential_findings(text: str) -> list[str]:
    """Lines of a config text that hold (or set) a credential, with what each looks like."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for what, pattern in CREDENTIAL_PATTERNS.items():
            if re.search(pattern, line):
                found.append(f"line {number}: {what}: {line.strip()[:80]}")
    return found


def setup_commands(cluster: dict, node_type: str) -> list[str]:
    """The setup commands `ray up` / the autoscaler run on a node of this type."""
    if node_type == cluster["head_node_type"]:
        return cluster.get("setup_commands", []) + cluster.get("head_setup_commands", [])
    own = cluster["available_node_types"][node_type].get("worker_setup_commands")
    if own is not None:  # replaces the global lists for this type
        return own
    return cluster.get("setup_commands", []) + cluster.get("worker_setup_commands", [])


def fetched_files(commands: list[str]) -> set[str]:
    """The file names a `for f in ...; do ... curl ...` command of the list downloads."""
    names = set()
    for command in commands:
        match = re.search(r"for f in (.+?); do", command)
        if match and "curl" in command:
            names.update(match.group(1).split())
    return names


def model_paths(config: dict) -> list[str]:
    """The model URIs a Serve config's applications name (base, classifier, upsampler)."""
    return [app.get("args", {})[key] for app in config.get("applications", [])
            for key in ("base", "classifier", "upsampler") if app.get("args", {}).get(key)]


def starts_in(command: str) -> str | None:
    """The directory a start command `cd`s into before `ray start`."""
    match = re.search(r"\bcd\s+(\S+)\s*&&.*\bray start\b", command)
    return match.group(1) if match else None


# ---------------------------------------------------------------------------------------------
# cluster.yaml itself.


def test_cluster_yaml_passes_rays_schema() -> None:
    raw = load_cluster()
    jsonschema.validate(raw, ray_schema())
    validate_config(prepare_config(copy.deepcopy(raw)))  # Ray's cross-field checks, offline


@pytest.mark.parametrize("break_it, message", [
    (lambda c: c["available_node_types"]["gpu_serve"].update(max_worker=3), "max_worker"),
    (lambda c: c["available_node_types"]["gpu_serve"]["resources"].update(GPU=0.5), "0.5"),
    (lambda c: c.update(head_node_type="nope"), "head_node_type"),
], ids=["typo", "fractional-gpu", "unknown-head"])
def test_schema_checks_catch_a_broken_config(break_it: Callable[[dict], None],
                                              message: str) -> None:
    """The validation above is not vacuous: a typo, a fractional node GPU count or an unknown
    head type is refused."""
    cluster = load_cluster()
    break_it(cluster)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=message):
        jsonschema.validate(cluster, ray_schema())
        validate_config(prepare_config(copy.deepcopy(cluster)))


def test_node_types_are_a_cpu_head_training_and_serving_gpus() -> None:
    cluster = load_cluster()
    pools = {p.name: p for p in node_pools(cluster)}
    head = pools.pop(cluster["head_node_type"])
    assert not head.resources.get("GPU"), "the head is a CPU node"
    assert any(p.resources.get("GPU", 0) >= 8 for p in pools.values()), "an 8-GPU training type"
    serving = [p for p in pools.values() if p.resources.get(SERVE_RESOURCE)]
    assert serving, f"a serving type offering {SERVE_RESOURCE}"
    for p in serving:  # one unit per GPU: replicas ask for as many as their num_gpus
        assert p.resources[SERVE_RESOURCE] == p.resources.get("GPU"), p
    for name, node_type in cluster["available_node_types"].items():
        if name != cluster["head_node_type"]:
            assert 0 <= node_type["min_workers"] <= node_type["max_workers"], name
            assert node_type["max_workers"] >= 1, name
    assert sum(p.count for p in pools.values()) <= cluster["max_workers"], \
        "the global max_workers must let every type reach its own max_workers"
    assert cluster["upscaling_speed"] > 0 and cluster["idle_timeout_minutes"] > 0


def test_declared_resources_match_the_instance_types() -> None:
    """Declared resources override Ray's auto-detection, so they must be the instance's."""
    for name, node_type in load_cluster()["available_node_types"].items():
        instance = node_type["node_config"]["InstanceType"]
        assert instance in INSTANCE_TYPES, f"{name}: add {instance} to INSTANCE_TYPES"
        vcpus, gpus = INSTANCE_TYPES[instance]
        resources = node_type["resources"]
        assert 0 < resources.get("CPU", 0) <= vcpus, f"{name}: CPU vs {instance}'s {vcpus} vCPUs"
        assert resources.get("GPU", 0) == gpus, f"{name}: GPU vs {instance}'s {gpus} GPUs"


def test_token_auth_on_every_node_and_dashboard_on_loopback() -> None:
    cluster = load_cluster()
    text = CLUSTER_YAML.read_text()
    assert "RAY_AUTH_MODE=disabled" not in text
    assert cluster["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token", \
        "the token generated by `ray get-auth-token --generate` goes to every node as a file"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cluster[key] if re.search(r"\bray start\b", c)]
        assert starts, key
        for command in starts:
            assert re.search(r"\bRAY_AUTH_MODE=token\b", command), f"{key}: {command}"
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start, "dashboard and job API on loopback only"
    assert "0.0.0.0" not in head_start


def test_no_credentials_in_cluster_yaml() -> None:
    assert credential_findings(CLUSTER_YAML.read_text()) == []
    for name, node_type in load_cluster()["available_node_types"].items():
        profile = node_type["node_config"].get("IamInstanceProfile", {})
        assert set(profile) <= {"Name", "Arn"}, f"{name}: AWS access comes from instance roles"


@pytest.mark.parametrize("line", [
    "aws_access_key_id: AKIAIOSFODNN7EXAMPLE",
    "  - export AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "  - export RAY_AUTH_TOKEN=c0ffee",
    "  - export ADM_SERVE_API_KEY=hunter2 && ray start --head",
    "  - echo 6f1ed002ab5595859014ebf0951522d96f1ed002ab5595859014ebf0951522d9 > ~/.ray/auth_token",
    "-----BEGIN RSA PRIVATE KEY-----",
    "db_password: swordfish",
])
def test_credential_scan_reports_a_planted_secret(line: str) -> None:
    text = CLUSTER_YAML.read_text() + "\n" + line + "\n"
    assert credential_findings(text), line


def test_every_node_installs_the_project() -> None:
    cluster = load_cluster()
    for remote, local in cluster["file_mounts"].items():  # `ray up` runs from the repo root
        if not local.startswith("~"):
            assert (ROOT / local).exists(), f"file_mounts {remote}: {local} is not in the repo"
    mounted = {local.lstrip("./"): remote for remote, local in cluster["file_mounts"].items()}
    assert "pyproject.toml" in mounted and "platform" in mounted, "the package sources travel"
    project = str(Path(mounted["pyproject.toml"]).parent)
    assert Path(mounted["platform"]).parent == Path(project)
    common = cluster["setup_commands"] + cluster["worker_setup_commands"]
    for node_type in cluster["available_node_types"]:
        commands = " && ".join(setup_commands(cluster, node_type))
        assert re.search(r"pip install[^&]* torch==", commands), node_type
        assert re.search(rf"pip install (-e )?{re.escape(project)}\b", commands), node_type
        if node_type != cluster["head_node_type"]:  # an own list replaces the common one
            own = setup_commands(cluster, node_type)
            assert own[:len(common)] == common, f"{node_type} skips common setup commands"


def test_cluster_yaml_fits_the_sample_and_flags_its_unpinned_variant(tmp_path: Path) -> None:
    """The sample config below fits cluster.yaml; without adm_serve it is flagged."""
    path = tmp_path / "sample.yaml"
    path.write_text(yaml.safe_dump(sample_serve_config()))
    config = serve_config(path)
    assert capacity_problems(load_cluster(), config) == []
    assert pinning_problems(config) == []
    for dep in config["applications"][0]["deployments"]:
        dep["ray_actor_options"].pop("resources", None)
    assert len(pinning_problems(config)) == 2


def sample_serve_config(gpu_max: int = 4) -> dict:
    """A Serve config shaped like serve_configs/imagenet512.yaml: two GPU stages and a CPU
    ingress."""
    gpu = {"num_cpus": 4, "num_gpus": 1, "resources": {SERVE_RESOURCE: 1}}
    return {"applications": [{
        "name": "sample", "route_prefix": "/", "import_path": "adm.serve:build_app",
        "deployments": [
            {"name": "GuidedSampler", "ray_actor_options": dict(gpu),
             "autoscaling_config": {"min_replicas": 1, "max_replicas": gpu_max}},
            {"name": "Upsampler", "ray_actor_options": dict(gpu),
             "autoscaling_config": {"min_replicas": 1, "max_replicas": gpu_max}},
            {"name": "Ingress", "ray_actor_options": {"num_cpus": 1}, "num_replicas": 2},
        ]}]}


def _only_cpu_workers(cluster: dict, config: dict) -> None:
    for name in [n for n, t in cluster["available_node_types"].items() if "GPU" in t["resources"]]:
        del cluster["available_node_types"][name]


def _too_many_replicas(cluster: dict, config: dict) -> None:
    config["applications"][0]["deployments"][1]["autoscaling_config"]["max_replicas"] = 40


def _gpus_over_all_stages(cluster: dict, config: dict) -> None:
    for dep in config["applications"][0]["deployments"][:2]:  # 9 + 9 > the 12 serving GPUs
        dep["autoscaling_config"]["max_replicas"] = 9


def _two_gpus_per_replica(cluster: dict, config: dict) -> None:
    config["applications"][0]["deployments"][0]["ray_actor_options"].update(
        num_gpus=2, resources={SERVE_RESOURCE: 2})


def _unknown_resource(cluster: dict, config: dict) -> None:
    config["applications"][0]["deployments"][0]["ray_actor_options"]["resources"] = {"tpu": 1}


def _typo_in_options(cluster: dict, config: dict) -> None:
    options = config["applications"][0]["deployments"][0]["ray_actor_options"]
    options["num_gpu"] = options.pop("num_gpus")


def _too_many_cpus(cluster: dict, config: dict) -> None:
    config["applications"][0]["deployments"][2]["ray_actor_options"]["num_cpus"] = 200


@pytest.mark.parametrize("break_it, message", [
    (_only_cpu_workers, "GuidedSampler: a replica needs .*fits no node type"),
    (_too_many_replicas, "Upsampler: max_replicas 40, but .* hold at most 12"),
    (_gpus_over_all_stages, "need 18 GPU, the node types that host them have 12"),
    (_two_gpus_per_replica, "GuidedSampler: a replica needs .*'GPU': 2.0.*fits no node type"),
    (_unknown_resource, "GuidedSampler: a replica needs .*'tpu'.*fits no node type"),
    (_typo_in_options, r"GuidedSampler: unknown ray_actor_options \['num_gpu'\]"),
    (_too_many_cpus, "Ingress: a replica needs .*'CPU': 200.0.*fits no node type"),
], ids=["gpu-replica-cpu-workers-only", "too-many-replicas", "gpus-over-all-stages",
        "two-gpus-per-replica", "unknown-resource", "typo-in-options", "too-many-cpus"])
def test_fit_check_reports_what_does_not_fit(tmp_path: Path,
                                              break_it: Callable[[dict, dict], None],
                                              message: str) -> None:
    """Each way a Serve config can outgrow the cluster is reported, naming the deployment."""
    cluster, config = load_cluster(), sample_serve_config()
    break_it(cluster, config)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(config))
    problems = capacity_problems(cluster, serve_config(path))
    assert any(re.search(message, p) for p in problems), problems


# ---------------------------------------------------------------------------------------------
# The real serve_configs/*.yaml.


def test_serve_configs_exist() -> None:
    """`serve deploy serve_configs/imagenet512.yaml` is what cluster.yaml is for."""
    assert (SERVE_DIR / "imagenet512.yaml").is_file(), f"missing {SERVE_DIR / 'imagenet512.yaml'}"


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=[p.name for p in SERVE_CONFIGS])
def test_serve_config_fits_the_cluster(path: Path) -> None:
    """`serve deploy` of the file can reach max_replicas of every deployment."""
    assert capacity_problems(load_cluster(), serve_config(path), f"{path.name}: ") == []


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=[p.name for p in SERVE_CONFIGS])
def test_serve_config_gpu_replicas_ask_for_serving_nodes(path: Path) -> None:
    """GPU replicas ask for adm_serve, so they scale the serving nodes, not training GPUs."""
    assert pinning_problems(serve_config(path), f"{path.name}: ") == []


def relative_model_paths(config: dict) -> list[str]:
    """The model paths of a Serve config that resolve against the directory Ray starts in."""
    return [m for m in model_paths(config) if "://" not in m and not m.startswith(("/", "~"))]


def gpu_replicas(config: dict) -> list[Replica]:
    return [r for r in replicas(config) if r.demand.get("GPU")]


# GPU configs reading relative model paths: the ones whose files the nodes must fetch (a CPU
# config runs on a laptop; s3:// and absolute paths are not fetched by setup commands).
LOCAL_GPU_CONFIGS = [p for p in SERVE_CONFIGS if gpu_replicas(serve_config(p))
                     and relative_model_paths(serve_config(p))]


def test_the_cluster_configs_with_checkpoints_to_fetch_are_the_imagenet_ones() -> None:
    assert [p.name for p in LOCAL_GPU_CONFIGS] == ["imagenet256.yaml", "imagenet512.yaml"]


@pytest.mark.parametrize("path", LOCAL_GPU_CONFIGS, ids=[p.name for p in LOCAL_GPU_CONFIGS])
def test_nodes_that_run_a_gpu_serve_config_have_its_checkpoints(path: Path) -> None:
    """Relative model paths (models/...) resolve against the directory Ray starts in; the head
    (Serve's application builder reads every file) and the node types hosting the GPU replicas
    must download them there."""
    cluster, config = load_cluster(), serve_config(path)
    gpu, local = gpu_replicas(config), relative_model_paths(config)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert {starts_in(c) for c in cluster[key] if "ray start" in c} == {"~/adm"}, key
    hosts = {p.name for p in node_pools(cluster) for r in gpu if slots(p.resources, r.demand)}
    for node_type in {cluster["head_node_type"]} | hosts:
        commands = setup_commands(cluster, node_type)
        assert any("~/adm/models" in c for c in commands if "curl" in c), \
            f"{path.name}: {node_type} nodes can host its GPU replicas but fetch no checkpoints"
        missing = {Path(m).name for m in local} - fetched_files(commands)
        assert all(Path(m).parent == Path("models") for m in local), local
        assert not missing, f"{path.name}: {node_type} nodes do not fetch {sorted(missing)}"


# ---------------------------------------------------------------------------------------------
# Every workload on its own node type: training, serving and batch work each ask for a custom
# resource that only their node type offers (adm.nodetypes), so none takes another's GPU.

WORKLOADS = {TRAIN_RESOURCE: "training workers", SERVE_RESOURCE: "Serve replicas",
             BATCH_RESOURCE: "generation and evaluation actors"}
TRAIN_CONFIGS = sorted((ROOT / "jobs/configs/imagenet").glob("*.yaml"))


def hosts(cluster: dict, demand: dict[str, float]) -> set[str]:
    """The node types one worker with this demand can be placed on."""
    return {t.name for t in node_types(cluster) if fits(demand, t.resources)}


def offering(cluster: dict, resource: str) -> set[str]:
    return {t.name for t in node_types(cluster) if t.resources.get(resource)}


def landing_problems(cluster: dict, where: str, demand: dict[str, float]) -> list[str]:
    """A GPU demand must land on exactly the node types of one workload resource it asks
    for; anything else could take another workload's GPU."""
    if not demand.get("GPU"):
        return []
    asked = [r for r in WORKLOADS if demand.get(r)]
    if len(asked) != 1:
        return [f"{where}: asks for GPU {demand['GPU']:g} but for {asked or 'no'} workload "
                f"resource; it could land on {sorted(hosts(cluster, demand))}"]
    own = offering(cluster, asked[0])
    if hosts(cluster, demand) != own or demand[asked[0]] != demand["GPU"]:
        return [f"{where}: {demand} lands on {sorted(hosts(cluster, demand))}, not only on "
                f"{sorted(own)}"]
    return []


def train_demand(path: Path) -> dict[str, float]:
    """One Train worker's request under a training config's run section."""
    run = from_dict(RunSection, yaml.safe_load(path.read_text()).get("run", {}))
    return worker_demand(run.cpus_per_worker, int(run.use_gpu), run.resources)


def test_each_gpu_node_type_offers_one_workload_resource_as_many_as_its_gpus() -> None:
    cluster = load_cluster()
    for t in node_types(cluster):
        offered = [r for r in WORKLOADS if t.resources.get(r)]
        if t.resources.get("GPU"):
            assert len(offered) == 1, f"{t.name}: offers {offered}, not one of {list(WORKLOADS)}"
            assert t.resources[offered[0]] == t.resources["GPU"], t
        else:
            assert not offered, f"{t.name} has no GPU but offers {offered}"
    for resource in WORKLOADS:
        assert offering(cluster, resource), f"no node type offers {resource}"


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=[p.name for p in TRAIN_CONFIGS])
def test_imagenet_training_workers_land_on_training_nodes_only(path: Path) -> None:
    cluster, demand = load_cluster(), train_demand(path)
    assert demand.get("GPU") and demand.get(TRAIN_RESOURCE), f"{path.name}: {demand}"
    assert landing_problems(cluster, path.name, demand) == []
    assert hosts(cluster, demand) == {"gpu_train"}


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=[p.name for p in SERVE_CONFIGS])
def test_serve_replicas_land_on_serving_nodes_only(path: Path) -> None:
    cluster = load_cluster()
    for rep in replicas(serve_config(path), f"{path.name}: "):
        assert landing_problems(cluster, rep.where, rep.demand) == []
        if rep.demand.get("GPU"):
            assert hosts(cluster, rep.demand) == {"gpu_serve"}, rep


def test_training_never_takes_a_serving_gpu_and_the_reverse() -> None:
    """Even an idle serving node (one waiting out its idle timeout, every GPU free) cannot take
    a Train worker, nor a training node a replica or a batch actor; without the custom
    resource, the same demands could (the check is not vacuous)."""
    cluster = load_cluster()
    types = {t.name: t.resources for t in node_types(cluster)}
    train = train_demand(ROOT / "jobs/configs/imagenet/adm256.yaml")
    serve = next(r.demand for r in replicas(serve_config(SERVE_DIR / "imagenet256.yaml"))
                 if r.demand.get("GPU"))
    batch = worker_demand(1, 1, {BATCH_RESOURCE: 1})
    for demand, own in ((train, "gpu_train"), (serve, "gpu_serve"), (batch, "gpu_batch")):
        for name, resources in types.items():
            assert fits(demand, resources) == (name == own), (demand, name)
        bare = {k: v for k, v in demand.items() if k not in WORKLOADS}  # GPU only
        assert hosts(cluster, bare) >= {"gpu_train", "gpu_serve", "gpu_batch"}
        assert landing_problems(cluster, "bare", bare), bare


def test_gpu_training_that_names_no_resource_lands_on_training_nodes_only() -> None:
    """`--gpus` with a config that names no run.resources (the quickstart's, a user's own):
    the workers ask for the training type's resource, so no serving or batch GPU can take
    them, an idle serving node included; without the default they could land on any GPU type
    (see the test above)."""
    cluster = load_cluster()
    quickstart = yaml.safe_load((ROOT / "jobs/configs/quickstart/diffusion.yaml").read_text())
    run = from_dict(RunSection, {**quickstart.get("run", {}), "use_gpu": True})
    assert run.resources == {}
    resources = training_resources(run.use_gpu, run.resources, node_types(cluster))
    demand = worker_demand(run.cpus_per_worker, 1, resources)
    assert landing_problems(cluster, "quickstart --gpus", demand) == []
    assert hosts(cluster, demand) == {"gpu_train"}


def test_the_training_default_leaves_named_resources_cpu_runs_and_plain_clusters_alone() -> None:
    types = node_types(load_cluster())
    assert training_resources(True, {"adm_batch": 1}, types) == {"adm_batch": 1}
    assert training_resources(False, {}, types) == {}
    plain = [NodeType("head", {"CPU": 4}, head=True), NodeType("gpu", {"CPU": 8, "GPU": 8})]
    said: list[str] = []
    assert training_resources(True, {}, plain, published=True, log=said.append) == {}
    assert not said
    # Live nodes of an autoscaler that did not publish its types (a KubeRay cluster whose GPU
    # groups are at 0): no default can be decided, and the job says so in one line.
    assert training_resources(True, {}, plain[:1], published=False, log=said.append) == {}
    assert len(said) == 1 and "did not publish the node types" in said[0], said


def test_gpu_training_is_refused_where_workload_types_have_no_training_type() -> None:
    """Only serving and batch types (a RayService's cluster, a cluster.yaml without
    gpu_train): the error names the missing resource, the types, and what to set."""
    types = [t for t in node_types(load_cluster()) if not t.resources.get(TRAIN_RESOURCE)]
    with pytest.raises(NoTrainingNodeType) as e:
        training_resources(True, {}, types)
    text = str(e.value)
    assert "no node type of this cluster offers adm_train" in text
    assert all(t.name in text for t in types) and "run.resources" in text, text
    with pytest.raises(NoTrainingNodeType, match="did not publish the node types"):
        training_resources(True, {}, types, published=False)


def test_the_head_publishes_the_node_types_after_ray_start() -> None:
    """A job asking for what no node type offers fails at once (adm.nodetypes.check_fits)
    only if the node types are in the GCS: the head records them right after `ray start`."""
    start = " ".join(c for c in load_cluster()["head_start_ray_commands"] if "ray start" in c)
    assert re.search(r"ray start --head.*&&\s*\S*python -m adm\.nodetypes publish "
                     r"~/ray_bootstrap_config\.yaml --address 127\.0\.0\.1:6379", start), start
    assert "RAY_AUTH_MODE=token" in start.split("ray start")[0]


def test_on_a_laptop_nothing_asks_for_a_custom_resource() -> None:
    assert RunSection().resources == {} and SampleConfig(model="m.pt").resources == {}
    assert FeatureJob().resources == {}
    for path in sorted((ROOT / "jobs/configs/quickstart").glob("*.yaml")):
        run = yaml.safe_load(path.read_text()).get("run", {})
        assert not run.get("resources") and not run.get("use_gpu"), path.name
    local = serve_config(SERVE_DIR / "local.yaml")
    assert all(set(r.demand) == {"CPU"} for r in replicas(local)), replicas(local)


def test_a_request_no_node_type_fits_names_the_resource_and_the_types() -> None:
    types = node_types(load_cluster())
    check_fits(worker_demand(1, 1, {TRAIN_RESOURCE: 1}), "training workers", types)
    with pytest.raises(NodeTypeMismatch) as e:
        check_fits(worker_demand(1, 1, {"adm_tpu": 1}), "training workers", types)
    text = str(e.value)
    assert "no node type offers adm_tpu" in text
    assert all(t.name in text for t in types), text
    with pytest.raises(NodeTypeMismatch, match="no node type has enough GPU"):
        check_fits(worker_demand(1, 16), "sampling actors", types)
    with pytest.raises(NodeTypeMismatch, match="no single node type offers all"):
        check_fits(worker_demand(1, 1, {TRAIN_RESOURCE: 1, SERVE_RESOURCE: 1}), "x", types)
    assert parse_resources("adm_batch=1, b=0.5") == {"adm_batch": 1.0, "b": 0.5}
    with pytest.raises(ConfigError, match="NAME=AMOUNT"):
        parse_resources("adm_batch")
    with pytest.raises(ConfigError, match=r"run\.resources\.GPU"):
        from_dict(TrainConfig, {"kind": "diffusion", "data": {"uri": "d"},
                                "run": {"resources": {"GPU": 1}}})


def test_the_simulated_cluster_keeps_cluster_yamls_node_types() -> None:
    """Same worker type names, min/max workers and custom resources; CPUs and GPUs scaled
    down to this machine; a config Ray's autoscaler accepts."""
    cluster = load_cluster()
    sim = fake_multinode_config(cluster, "127.0.0.1:1", SimSettings(max_cpus=2, max_gpus=2))
    jsonschema.validate(sim, ray_schema())
    want = {t.name: t for t in node_types(cluster) if not t.head}
    got = {n: t for n, t in sim["available_node_types"].items() if n != sim["head_node_type"]}
    assert set(got) == set(want)
    for name, t in got.items():
        assert (t["min_workers"], t["max_workers"]) == (want[name].min_workers,
                                                         want[name].max_workers)
        res = t["resources"]
        assert 1 <= res["CPU"] <= 2 and res.get("GPU", 0) <= 2
        assert bool(res.get("GPU")) == bool(want[name].resources.get("GPU")), name
        for r in WORKLOADS:
            assert bool(res.get(r)) == bool(want[name].resources.get(r)), (name, r)
            if res.get(r):
                assert res[r] == res["GPU"], name
    assert sim["provider"]["type"] == "fake_multinode"
    assert sim["provider"]["gcs_address"] == "127.0.0.1:1"
    assert sim["max_workers"] == cluster["max_workers"]
