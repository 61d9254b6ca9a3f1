"""The node types a cluster can ever offer, and the check that a job's request fits one.

A request that no node type can fit is never scheduled: Ray keeps it pending and Ray Train
retries its worker group forever. So the jobs check their per-worker request first (`check_fits`)
and fail at once, naming the resource that is missing and the node types there are.

Where the node types come from, in order:

* The autoscaler's cluster config in the GCS (`ray._private.state.state.get_cluster_config()`,
  Ray's own record, which Ray Data reads too). cluster.yaml's head publishes its node types
  there after `ray start` (`python -m adm.nodetypes publish ~/ray_bootstrap_config.yaml`), and
  so does `adm.simcluster`.
* Else, where Ray's monitor reports that no autoscaler runs (a laptop, a fixed cluster), the
  nodes alive now: nothing will ever be added.
* Else (an autoscaler that did not publish its node types, or no report yet), no check:
  nothing to check against.

Where GPU training runs by default (`training_resources`): a cluster whose node types keep
their GPUs apart by workload (a type offering `adm_train`, `adm_serve` or `adm_batch`, as
cluster.yaml's and the KubeRay groups do) gives `--gpus` Train workers that name no
`run.resources` the training type's resource, `{adm_train: 1}` (one per GPU, as the training
types offer it), so they never take a serving or batch GPU.

Units: the amounts are Ray's (CPU and GPU counts, custom resources as declared).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .config import ConfigError, UserError

# The custom resources that keep each workload on its own node type (cluster.yaml).
TRAIN_RESOURCE = "adm_train"
SERVE_RESOURCE = "adm_serve"
BATCH_RESOURCE = "adm_batch"
WORKLOAD_RESOURCES = (TRAIN_RESOURCE, SERVE_RESOURCE, BATCH_RESOURCE)


@dataclass(frozen=True)
class NodeType:
    """One node type: what one node offers and how many there can be."""

    name: str
    resources: dict[str, float]
    min_workers: int = 0
    max_workers: int = 0
    head: bool = False


class NodeTypeMismatch(UserError):
    """A request that no node type of the cluster can ever fit."""

    def __init__(self, what: str, demand: Mapping[str, float], types: list[NodeType]):
        self.what, self.demand, self.types = what, dict(demand), types
        super().__init__(str(self))

    def __str__(self) -> str:
        offered = {name for t in self.types for name, v in t.resources.items() if v > 0}
        missing = sorted(k for k in self.demand if k not in offered)
        short = sorted(k for k in self.demand if k in offered and
                       all(t.resources.get(k, 0) < self.demand[k] for t in self.types))
        why = (f"no node type offers {', '.join(missing)}" if missing else
               f"no node type has enough {', '.join(short)}" if short else
               "no single node type offers all of it")
        listed = "; ".join(f"{t.name} {_fmt(t.resources)}" for t in self.types)
        return (f"{self.what} ask for {_fmt(self.demand)} each, which no node of this cluster "
                f"can ever fit: {why}. Node types: {listed}")


def _fmt(resources: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


def node_types(cluster: Mapping[str, Any]) -> list[NodeType]:
    """The node types of a cluster launcher config (cluster.yaml), the head first."""
    head = cluster["head_node_type"]
    out = []
    for name, t in cluster["available_node_types"].items():
        resources = {k: float(v) for k, v in t.get("resources", {}).items()
                     if k != "object_store_memory"}
        out.append(NodeType(name, resources, int(t.get("min_workers", 0)),
                            0 if name == head else int(t.get("max_workers", 0)), name == head))
    return sorted(out, key=lambda t: not t.head)


def check_resources(resources: Mapping[str, float], key: str) -> None:
    """A ConfigError naming `key` unless `resources` are custom resource amounts > 0 (CPU and
    GPU have settings of their own)."""
    for name, amount in resources.items():
        if name in ("CPU", "GPU", "memory", "object_store_memory"):
            raise ConfigError(f"{key}.{name}: set CPUs and GPUs with their own settings; "
                              "resources holds custom resources such as adm_train")
        if not amount > 0:
            raise ConfigError(f"{key}.{name}: must be positive, got {amount}")


def parse_resources(text: str) -> dict[str, float]:
    """`adm_batch=1,other=0.5` -> {"adm_batch": 1.0, "other": 0.5} (a command-line flag)."""
    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, amount = item.partition("=")
        try:
            out[name.strip()] = float(amount)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ConfigError(f"resources: {item!r} is not NAME=AMOUNT (e.g. adm_batch=1)")
    return out


def fits(demand: Mapping[str, float], resources: Mapping[str, float]) -> bool:
    return all(resources.get(k, 0.0) >= v for k, v in demand.items() if v > 0)


def worker_demand(cpus: float, gpus: float = 0, resources: Mapping[str, float] | None = None
                  ) -> dict[str, float]:
    """What one worker or actor asks Ray for (only the amounts > 0)."""
    demand = {"CPU": float(cpus), "GPU": float(gpus),
              **{k: float(v) for k, v in (resources or {}).items()}}
    return {k: v for k, v in demand.items() if v > 0}


def check_fits(demand: Mapping[str, float], what: str,
               types: list[NodeType] | None = None) -> None:
    """Raise `NodeTypeMismatch` when no node type of the connected cluster (or of `types`)
    can fit `demand` (one worker's request). Ray must be initialized unless `types` is given."""
    if types is None:
        types = cluster_node_types()
    if types is not None and not any(fits(demand, t.resources) for t in types):
        raise NodeTypeMismatch(what, dict(demand), types)


class NoTrainingNodeType(UserError):
    """GPU training on a cluster that keeps its GPUs apart by workload but has no type for
    training: there is no node type to default to."""


def training_resources(use_gpu: bool, resources: Mapping[str, float],
                       types: list[NodeType] | None = None,
                       published: bool | None = None,
                       log: Callable[[str], None] = print) -> dict[str, float]:
    """The custom resources one Train worker asks for (`run.resources` as it will be used).

    The rule: a config that names `run.resources` keeps exactly them, and CPU training asks
    for none. A GPU worker of a config that names none asks for `{adm_train: 1}` where the
    cluster's node types use workload resources (any type offers adm_train, adm_serve or
    adm_batch) and one of them offers adm_train; where none uses them (a laptop, a plain GPU
    cluster) it asks for none. Workload types without a training type: `NoTrainingNodeType`,
    naming the types, since any GPU the worker could take belongs to serving or batch work.

    The node types are the cluster's config in the GCS when its head published them
    (cluster.yaml, `adm.simcluster`: types with no live node count, as an autoscaler can add
    them), else the live nodes (`published=False`). Ray 2.60's autoscalers record no node
    types of their own, so with an unpublished autoscaler a missing training type may only
    have no node yet: the error then says so and how to publish them.

    :param types: the node types to decide on (default: the connected cluster's; Ray must then
        be initialized). :param published: whether `types` are all the cluster can ever have.
    :param log: where the line goes that says the default could not be decided (an
        unpublished autoscaler with no workload node alive: the worker asks for a bare GPU).
    :return: resource name -> amount per worker.
    """
    if resources or not use_gpu:
        return dict(resources)
    if types is None:
        types = cluster_node_types()
        published = types is not None
        if types is None:
            types = live_node_types()
    offered = {k for t in types for k, v in t.resources.items() if v > 0}
    if not offered & set(WORKLOAD_RESOURCES):
        if published is False:  # an autoscaler may still add serving or batch nodes
            log(f"run.resources: GPU workers ask for no node type: no node alive offers a "
                f"workload resource ({', '.join(WORKLOAD_RESOURCES)}) and this cluster's "
                f"autoscaler did not publish the node types it may add, so a worker may land "
                f"on any GPU node. Name run.resources (e.g. {{{TRAIN_RESOURCE}: 1}}) to choose.")
        return {}
    if TRAIN_RESOURCE in offered:
        return {TRAIN_RESOURCE: 1.0}
    listed = "; ".join(f"{t.name} {_fmt(t.resources)}" for t in types)
    others = sorted(offered & set(WORKLOAD_RESOURCES))
    if published is False:
        where = (f"no node alive offers {TRAIN_RESOURCE}, and this cluster's autoscaler did "
                 f"not publish the node types it may add (python -m adm.nodetypes publish "
                 f"CLUSTER_CONFIG on the head). Nodes alive: {listed}")
    else:
        where = f"no node type of this cluster offers {TRAIN_RESOURCE}. Node types: {listed}"
    raise NoTrainingNodeType(
        f"run.resources: GPU training defaults to the training node type (its nodes offer "
        f"{TRAIN_RESOURCE}), and this cluster keeps GPU nodes apart by workload "
        f"({', '.join(others)}), but {where}. Name the resource of the node type to train on "
        f"in run.resources (e.g. run.resources={{{others[0]}: 1}}), or add a node type that "
        f"offers {TRAIN_RESOURCE}.")


def live_node_types() -> list[NodeType]:
    """The nodes alive now, each as a node type of its own (named by Ray's
    `ray.io/node-type` label where it has one, else by address)."""
    import ray

    return [NodeType(n.get("Labels", {}).get("ray.io/node-type", n["NodeManagerAddress"]),
                     {k: float(v) for k, v in n["Resources"].items()
                      if not k.startswith("node:") and k not in ("memory",
                                                                  "object_store_memory")})
            for n in ray.nodes() if n["Alive"]]


def cluster_node_types() -> list[NodeType] | None:
    """The node types of the connected cluster (see the module's docstring); None when an
    autoscaler runs that did not publish them."""
    from ray._private.state import state

    config = state.get_cluster_config()
    if config is not None and config.node_group_configs:
        return [NodeType(g.name, {k: float(v) for k, v in g.resources.items()},
                         g.min_count, g.max_count, head=g.max_count == 0)
                for g in config.node_group_configs]
    from ray.experimental.internal_kv import _internal_kv_get
    from ray._private import ray_constants

    from ray.autoscaler.v2.utils import is_autoscaler_v2

    # Every Ray runs a monitor, which reports on an autoscaler only when it has one (that may
    # add nodes not foreseeable here). Before its first report nothing is known either (a
    # KubeRay RayJob can start that early): only a report without one means a fixed cluster.
    status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    if (not status or "autoscaler_report" in json.loads(status)
            or is_autoscaler_v2(fetch_from_server=True)):
        return None
    return live_node_types()


def cluster_config_proto(types: list[NodeType]):
    """Ray's `ClusterConfig` message for these node types (the head: max_count 0)."""
    from ray.core.generated import autoscaler_pb2

    config = autoscaler_pb2.ClusterConfig()
    for t in types:
        group = config.node_group_configs.add(name=t.name, min_count=t.min_workers,
                                              max_count=0 if t.head else t.max_workers)
        for k, v in t.resources.items():
            group.resources[k] = int(v)
    return config


def publish_node_types(gcs_address: str, types: list[NodeType]) -> None:
    """Record the node types as the cluster's config in its GCS (where `cluster_node_types`
    and Ray Data read it)."""
    import ray._raylet as raylet
    from ray._raylet import GcsClient

    GcsClient(address=gcs_address).internal_kv_put(
        raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode(),
        cluster_config_proto(types).SerializeToString(), True,
        raylet.GCS_AUTOSCALER_STATE_NAMESPACE.encode())


def main(argv: list[str] | None = None) -> int:
    """`python -m adm.nodetypes publish CONFIG [--address HOST:PORT]`: on a cluster's head
    after `ray start`, record the launcher config's node types in the GCS."""
    p = argparse.ArgumentParser(prog="python -m adm.nodetypes")
    p.add_argument("command", choices=["publish"])
    p.add_argument("config", help="the cluster launcher config (~/ray_bootstrap_config.yaml)")
    p.add_argument("--address", default="127.0.0.1:6379", help="the GCS address")
    args = p.parse_args(argv)
    import yaml

    with open(args.config) as f:
        types = node_types(yaml.safe_load(f))
    publish_node_types(args.address, types)
    print(json.dumps({t.name: t.resources for t in types}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
