"""The Ray Data job: sample indices 0..N-1 in, shards of images out.

    unfinished indices, labels from (seed, i)         (driver: in-memory blocks, no tasks)
      -> stage 1: base model (+ classifier)   ActorPoolStrategy pool, own batch size / actors
      -> stage 2: upsampler (optional)        its own pool; batches stream in as stage 1 emits
      -> driver: rows grouped by shard; each complete shard written atomically, at once

Actors are stateful: each loads its networks once (`adm.stage.Stage`). A stage gives index i
slot i of its model calls of exactly batch_size rows (the padding rule of `adm.stage`), so a
sample's bits do not depend on how Ray Data happened to cut the stream either.

Before the pools start, a fresh run with `precision: auto` asks one task that holds what a
stage's actor holds (its CPUs, GPU and custom resources, so it lands on a node of the same
type) which precision that device computes natively (`ask_device`), and records the answer in
settings.json. Both stages ask for the same resources, so one answer serves both. Every actor
then runs at the recorded precision, whichever node it lands on.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import storage
from ..diffusion.seeds import index_seeds
from ..nodetypes import check_fits, worker_demand
from ..precision import NATIVE_BF16_CPU_FLAGS, auto_precision, cpu_flags
from ..progress import progress_bar
from ..stage import Stage, model_calls
from . import output
from .labels import labels_for
from .plan import Plan, StagePlan


def stage_device(gpus: bool) -> torch.device:
    """The device a stage's actor runs its networks on: the GPU Ray gave it (`gpus`), else the
    CPU."""
    return torch.device("cuda" if gpus and torch.cuda.is_available() else "cpu")


def actor_resources(plan: Plan) -> dict:
    """What each actor of either stage holds (Ray's num_cpus, num_gpus, resources)."""
    cfg = plan.cfg
    return dict(num_cpus=cfg.cpus_per_worker, num_gpus=1 if cfg.gpus else None,
                resources=cfg.resources or None)


def probe_device(gpus: bool) -> dict:
    """Runs in the probe task, on a stage's kind of node: the precision "auto" picks on the
    device an actor there would use ("precision"), that device in words ("device"), and what
    Ray gave the task ("resources")."""
    device = stage_device(gpus)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        words = f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    else:
        native = sorted(NATIVE_BF16_CPU_FLAGS & cpu_flags())
        words = f"CPU ({', '.join(native) if native else 'no native bf16'})"
    import ray

    ctx = ray.get_runtime_context()
    return {"precision": auto_precision(device),
            "device": f"{words} on node {ctx.get_node_id()[:12]}",
            "resources": ctx.get_assigned_resources()}


def ask_device(plan: Plan) -> dict:
    """The answer of `probe_device` from a Ray task that holds a stage actor's resources
    (Ray must be running)."""
    import ray

    opts = actor_resources(plan)
    task = ray.remote(probe_device).options(
        num_cpus=opts["num_cpus"], num_gpus=opts["num_gpus"] or 0,
        resources=opts["resources"], name="adm-precision-probe")
    return ray.get(task.remote(plan.cfg.gpus))


class StageSampler:
    """A Ray Data actor for one stage: `__call__` maps a batch {"id" [n], "label" [n]
    [, "image" [n, h, w, 3] uint8]} to the stage's images "image" [n, H, W, 3] uint8 (ids and
    labels passed on). With an input "image" (stage 2) the upsampler is conditioned on it, and
    it is passed on as "base"."""

    def __init__(self, stage: StagePlan, seed: int, clip_denoised: bool, eta: float, gpus: bool):
        self.seed, self.stream = seed, stage.stream
        device = stage_device(gpus)
        self.stage = Stage.load(stage.net, stage.classifier, stage.precision, device,
                                stage.batch_size, stage.compile)
        self.args = dict(sampler=stage.sampler, steps=stage.steps or None,
                         timesteps=stage.timesteps, lambda_min=stage.lambda_min,
                         lambda_max=stage.lambda_max,
                         cfg_scale=stage.cfg_scale, classifier_scale=stage.classifier_scale,
                         guidance_interval=stage.guidance_interval,
                         cache_interval=stage.cache_interval,
                         clip_denoised=clip_denoised,
                         eta=eta if stage.sampler == "ddim" else 0.0)  # DDPM takes no eta

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = np.asarray(batch["id"], dtype=np.int64)
        labels = np.asarray(batch["label"], dtype=np.int64)
        base = batch.get("image")
        if base is not None and base.dtype == object:  # rows of arrays, not a tensor column
            base = np.stack(base) if len(base) else np.zeros((0, 1, 1, 3), np.uint8)
        images = self.stage.sample(labels, index_seeds(self.seed, ids, self.stream), ids,
                                   base, **self.args)
        result = {"id": ids, "label": labels, "image": images}
        if base is not None:
            result["base"] = base
        return result


def _map_stage(ds, stage: StagePlan, plan: Plan):
    cfg = plan.cfg
    import ray

    return ds.map_batches(
        StageSampler, batch_size=stage.batch_size, batch_format="numpy",
        fn_constructor_kwargs=dict(stage=stage, seed=cfg.seed, clip_denoised=cfg.clip_denoised,
                                   eta=cfg.eta, gpus=cfg.gpus),
        compute=ray.data.ActorPoolStrategy(size=stage.workers), **actor_resources(plan))


def build_dataset(plan: Plan, skip: set[int]):
    """The streaming dataset of every unfinished shard's samples (Ray must be running).

    Its source is in-memory blocks of (id, label), one per stage-1 model call (the unfinished
    indices of a range [k·b, (k+1)·b)), made on the driver (labels are cheap: one hash per
    index), not read tasks: nothing upstream of the actor pools needs a CPU, so actors may take
    every CPU of the cluster without starving the pipeline (read tasks waiting for a CPU that
    actors waiting for input hold: the job hangs, as it did on a 2-core machine), and an
    autoscaling cluster is not refused for the CPUs it has not added yet."""
    import pyarrow as pa
    import ray

    cfg = plan.cfg
    ids = np.arange(cfg.num_samples, dtype=np.int64)
    ids = ids[~np.isin(ids // cfg.shard_size, np.array(sorted(skip), dtype=np.int64))]
    classes = plan.classes if isinstance(plan.classes, str) else list(plan.classes)
    labels = labels_for(ids, cfg.seed, classes, plan.num_classes)
    ds = ray.data.from_arrow([pa.table({"id": ids[r], "label": labels[r]})
                              for r in model_calls(ids, plan.base.batch_size)])
    ds = _map_stage(ds, plan.base, plan)
    if plan.upsampler is not None:
        ds = _map_stage(ds, plan.upsampler, plan)
    return ds


class ShardWriter:
    """Collects streamed rows by shard and writes each shard the moment it is complete."""

    def __init__(self, plan: Plan, skip: set[int]):
        self.out, self.size = plan.cfg.out, plan.cfg.shard_size
        ranges = output.shard_ranges(plan.cfg.num_samples, self.size)
        self.expected = {k: len(r) for k, r in enumerate(ranges) if k not in skip}
        self.pending: dict[int, list[dict[str, np.ndarray]]] = {}

    def add(self, batch: dict[str, np.ndarray]) -> None:
        shard_of = np.asarray(batch["id"]) // self.size
        for k in map(int, np.unique(shard_of)):
            if k not in self.expected:  # a repeat of rows already written (a retried task)
                continue
            rows = {name: np.asarray(col)[shard_of == k] for name, col in batch.items()}
            self.pending.setdefault(k, []).append(rows)
            ids = np.concatenate([r["id"] for r in self.pending[k]])
            if len(np.unique(ids)) == self.expected[k]:
                self._write(k)

    def _write(self, k: int) -> None:
        parts = self.pending.pop(k)
        cols = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        _, first = np.unique(cols["id"], return_index=True)  # sorted ids, each once
        rows = {"index": cols["id"][first], "label": cols["label"][first],
                "image": cols["image"][first]}
        if "base" in cols:
            rows["base"] = cols["base"][first]
        output.write_shard(self.out, k, rows)
        del self.expected[k]

    @property
    def missing(self) -> list[int]:
        return sorted(self.expected)


def finished_message(plan: Plan) -> str:
    """What a rerun of a finished run says."""
    return (f"already finished: {storage.join(plan.cfg.out, output.SAMPLES)} holds the "
            f"{plan.cfg.num_samples} samples of these settings; nothing to do")


def check_actors_fit(plan: Plan) -> None:
    """Refuse at once (naming the node types) when no node type can hold a stage's actor,
    instead of a probe or an actor pool that would wait for ever."""
    cfg = plan.cfg
    check_fits(worker_demand(cfg.cpus_per_worker, int(cfg.gpus), cfg.resources),
               "sampling actors")


def decide_on_stage_device(plan: Plan, log=print) -> Plan:
    """`plan` with precision "auto" decided by a stage's own device (`ask_device`); a plan
    with nothing undecided (every resume: its recorded answer) is returned as it is, unasked."""
    if not plan.undecided:
        return plan
    check_actors_fit(plan)
    answer = ask_device(plan)
    log(f"precision auto: {answer['precision']}, as decided on {answer['device']}")
    return plan.decide(answer["precision"], answer["device"])


def generate(plan: Plan, progress: bool = True, log=print) -> str:
    """Run the plan (Ray must be running): decide precision "auto" on a stage's device (a
    fresh run), resume from finished shards, write the rest, merge. Returns the URI of
    samples.npz. A finished run is left as it is."""
    cfg = plan.cfg
    samples_uri = storage.join(cfg.out, output.SAMPLES)
    if output.is_finished(cfg.out):
        log(finished_message(plan))
        return samples_uri
    storage.makedirs(cfg.out)
    plan = decide_on_stage_device(plan, log)
    if not output.check_settings(cfg.out, plan.decisive()):
        output.write_settings(cfg.out, plan.decisive(), plan.execution())
    skip = output.finished_shards(cfg.out)
    done = sum(len(r) for k, r in enumerate(output.shard_ranges(cfg.num_samples,
                                                                cfg.shard_size)) if k in skip)
    if skip:
        log(f"resuming: {len(skip)} finished shard(s), {done} of {cfg.num_samples} samples")
    writer = ShardWriter(plan, skip)
    if writer.missing:
        check_actors_fit(plan)
        with progress_bar(total=cfg.num_samples, initial=done, unit="sample",
                          desc="samples", disable=not progress) as bar:
            for batch in build_dataset(plan, skip).iter_batches(batch_size=None,
                                                                batch_format="numpy"):
                writer.add(batch)
                bar.update(len(batch["id"]))
        if writer.missing:
            raise RuntimeError(f"the pipeline ended with shards {writer.missing} incomplete")
    output.merge(cfg.out, cfg.num_samples, cfg.shard_size, plan.chained)
    log(f"wrote {samples_uri}: {cfg.num_samples} samples")
    return samples_uri
