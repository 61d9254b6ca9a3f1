"""`jobs/evaluate.py`: compare a sample set with a reference set, as the ADM evaluator does.

``make_plan`` checks everything first -- the feature network's file, both inputs, their sizes
and labels -- so bad input fails before any feature is computed. ``run`` takes each set's
features from its cache or from the Ray feature job, then computes:

* FID: pool statistics of the samples against the reference's (the reference .npz's own
  ``mu``/``sigma`` when it carries them and the features are Inception's);
* sFID: the same on the spatial features (Inception only; ``mu_s``/``sigma_s`` likewise);
* Inception Score of the samples (splits of ``split_size``; fewer images give one shorter
  split, as in the evaluator -- the JSON lists the split sizes, since such a score is not
  comparable with a 5,000-split one);
* precision and recall on pool features, k = 3;
* with classifier features and labels: the fraction of images the classifier assigns to their
  label (samples: their intended class; reference: the classifier's own accuracy).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from pydantic import PositiveFloat, PositiveInt

from ..config import ConfigError, config_class
from .. import checkpoints
from ..nodetypes import check_resources
from . import inception
from .features import Features, has_cache, load_cache, run_feature_job, summarize
from .metrics import frechet_distance, inception_score, precision_recall, softmax, split_sizes
from .networks import FeatureNetwork, resolve_network
from .sources import ImageSource, InputError, open_source

K = 3
SPLIT_SIZE = 5000
POOL_DIM, SPATIAL_DIM = 2048, inception.SPATIAL_CHANNELS * 17 * 17


@config_class(frozen=True)
class FeatureJob:
    """How the Ray feature job runs (`jobs/evaluate.py`'s --batch-size, --num-workers,
    --cpus-per-worker, --gpus) and what the Inception is fed (--inception-inputs)."""

    batch_size: PositiveInt = 64  # images per network call
    num_workers: PositiveInt = 1  # feature actors
    cpus_per_worker: PositiveFloat = 1.0  # CPUs each actor reserves
    gpus: bool = False  # one GPU per actor
    # Custom Ray resources each actor asks for ({adm_batch: 1}: cluster.yaml's batch nodes).
    resources: dict[str, float] = field(default_factory=dict)
    # "tf1": the ADM evaluator's graph (TF1 resize, (x - 128) / 128), FIDs comparable with the
    # paper's; "pytorch-fid": F.interpolate and 2x/255 - 1, comparable with pytorch-fid's.
    inception_inputs: Literal["tf1", "pytorch-fid"] = "tf1"

    def __post_init__(self) -> None:
        check_resources(self.resources, "resources")


@dataclass(frozen=True)
class EvalPlan:
    """Two checked inputs and a checked feature network."""

    reference: ImageSource
    samples: ImageSource
    network: FeatureNetwork
    k: int = K
    split_size: int = SPLIT_SIZE

    def use_file_stats(self, source: ImageSource) -> bool:
        """A .npz's own Inception statistics replace computed ones (Inception features only)."""
        return source.stats is not None and self.network.kind == "inception"


def _open_pair(reference: str, samples: str, image_size: int | None
               ) -> tuple[ImageSource, ImageSource]:
    """Both inputs; decoded kinds (shards, image folders) are cropped to ``image_size``, by
    default to the other input's size when that one is an .npz."""
    ref, smp = open_source(reference, image_size), open_source(samples, image_size)
    if image_size is None:
        if ref.decoded and not smp.decoded and smp.image_shape[0] == smp.image_shape[1]:
            ref = open_source(reference, smp.image_shape[0])
        elif smp.decoded and not ref.decoded and ref.image_shape[0] == ref.image_shape[1]:
            smp = open_source(samples, ref.image_shape[0])
    return ref, smp


def _check_stats(source: ImageSource) -> None:
    want = {"mu": (POOL_DIM,), "sigma": (POOL_DIM, POOL_DIM), "mu_s": (SPATIAL_DIM,),
            "sigma_s": (SPATIAL_DIM, SPATIAL_DIM)}
    for name, shape in want.items():
        if source.stats[name].shape != shape:
            raise InputError(f"{source.uri}: {name} has shape {list(source.stats[name].shape)}; "
                             f"the evaluator's Inception statistics are {list(shape)}")


def _check_source(source: ImageSource, role: str, network: FeatureNetwork, k: int) -> None:
    if source.num_images < k + 1:
        raise InputError(f"{role} {source.uri} holds {source.num_images} images; precision and "
                         f"recall (k = {k} nearest neighbours, the image itself counted) need "
                         f"at least {k + 1}")
    if source.stats is not None and network.kind == "inception":
        _check_stats(source)
    if source.labels is not None and network.kind == "classifier" and len(source.labels):
        n = checkpoints.num_classes(network.spec)
        lo, hi = int(source.labels.min()), int(source.labels.max())
        if lo < 0 or hi >= n:
            raise InputError(f"{role} {source.uri}: labels {lo}..{hi} do not index the "
                             f"classifier's {n} classes")


def make_plan(reference: str, samples: str, features: str | None = None, *,
              image_size: int | None = None, k: int = K, split_size: int = SPLIT_SIZE,
              inception_inputs: str = "tf1") -> EvalPlan:
    """Check the network and both inputs (InputError, ConfigError, InceptionWeightsError).
    ``inception_inputs``: ``FeatureJob.inception_inputs``."""
    if k < 1 or split_size < 1:
        raise ConfigError(f"k ({k}) and the Inception Score split ({split_size}) must be >= 1")
    network = resolve_network(features, inception_inputs)
    ref, smp = _open_pair(reference, samples, image_size)
    _check_source(ref, "reference", network, k)
    _check_source(smp, "samples", network, k)
    return EvalPlan(ref, smp, network, k, split_size)


def needs_features(plan: EvalPlan) -> bool:
    """Whether a feature job must run (some set has no valid cache): Ray is needed then."""
    return not all(has_cache(s, plan.network) for s in (plan.reference, plan.samples))


def features_of(sources: list[ImageSource], plan: EvalPlan, **job) -> list[Features]:
    """Each set's cached features, else the Ray job's (one job for all the missing sets,
    whose results are then cached)."""
    found = [load_cache(s, plan.network) for s in sources]
    missing = [i for i, f in enumerate(found) if f is None]
    if missing:
        todo = [sources[i] for i in missing]
        for i, raw in zip(missing, run_feature_job(todo, plan.network, **job)):
            found[i] = summarize(raw, sources[i], plan.network)
    return found


def _accuracy(feats: Features, source: ImageSource) -> float | None:
    if source.labels is None:
        return None
    return float((feats.logits.argmax(axis=1) == source.labels).mean())


def _statistics(plan: EvalPlan, source: ImageSource, feats: Features) -> tuple:
    """(mu, sigma, mu_s, sigma_s): the .npz's own when it carries Inception statistics and
    the features are Inception's (as the evaluator's read_statistics), else the computed."""
    if plan.use_file_stats(source):
        return tuple(source.stats[k] for k in ("mu", "sigma", "mu_s", "sigma_s"))
    return feats.mu, feats.sigma, feats.mu_s, feats.sigma_s


def run(plan: EvalPlan, *, batch_size: int = 64, num_workers: int = 1, gpus: bool = False,
        cpus_per_worker: float = 1.0, resources: dict[str, float] | None = None,
        progress: bool = True) -> dict:
    """Features (cache or Ray job) and the five numbers; returns the JSON report."""
    job = dataclasses.asdict(FeatureJob(batch_size, num_workers, cpus_per_worker, gpus,
                                        resources or {}))
    del job["inception_inputs"]  # part of plan.network, which decides the features
    job["progress"] = progress
    if plan.reference == plan.samples:
        ref = smp = features_of([plan.reference], plan, **job)[0]
    else:
        ref, smp = features_of([plan.reference, plan.samples], plan, **job)
    ref_mu, ref_sigma, ref_mu_s, ref_sigma_s = _statistics(plan, plan.reference, ref)
    smp_mu, smp_sigma, smp_mu_s, smp_sigma_s = _statistics(plan, plan.samples, smp)
    precision, recall = precision_recall(ref.pool, smp.pool, plan.k)
    report = {
        "inception_score": inception_score(softmax(smp.logits), plan.split_size),
        "fid": frechet_distance(smp_mu, smp_sigma, ref_mu, ref_sigma),
        "sfid": (frechet_distance(smp_mu_s, smp_sigma_s, ref_mu_s, ref_sigma_s)
                 if plan.network.has_spatial else None),
        "precision": precision,
        "recall": recall,
    }
    is_classifier = plan.network.kind == "classifier"
    report["sample_accuracy"] = _accuracy(smp, plan.samples) if is_classifier else None
    report["reference_accuracy"] = _accuracy(ref, plan.reference) if is_classifier else None
    report["compared"] = {
        "reference": {**plan.reference.describe(), "features_cache": ref.cache,
                      "from_cache": ref.from_cache,
                      "statistics": "file" if plan.use_file_stats(plan.reference) else "computed"},
        "samples": {**plan.samples.describe(), "features_cache": smp.cache,
                    "from_cache": smp.from_cache,
                    "statistics": "file" if plan.use_file_stats(plan.samples) else "computed"},
        "features": plan.network.describe(),
        "k": plan.k,
        "inception_score_splits": split_sizes(plan.samples.num_images, plan.split_size),
    }
    return report


def format_table(report: dict) -> str:
    """The evaluator's printout ('Inception Score: ...', 'FID: ...'), one figure a line, with
    what was compared above it."""
    c = report["compared"]
    lines = [f"reference: {c['reference']['uri']} ({c['reference']['num_images']} images, "
             f"statistics {c['reference']['statistics']})",
             f"samples:   {c['samples']['uri']} ({c['samples']['num_images']} images)",
             f"features:  {c['features']['kind']} {c['features']['uri']}"]
    splits = c["inception_score_splits"]
    rows = [("Inception Score", report["inception_score"],
             "" if splits[0] >= SPLIT_SIZE else f"  (one split of {splits[0]} images)"),
            ("FID", report["fid"], ""),
            ("sFID", report["sfid"], "" if report["sfid"] is not None
             else "  (Inception features only)"),
            ("Precision", report["precision"], ""), ("Recall", report["recall"], "")]
    if report.get("sample_accuracy") is not None:
        rows.append(("Sample accuracy", report["sample_accuracy"], "  (classifier vs labels)"))
    if report.get("reference_accuracy") is not None:
        rows.append(("Reference accuracy", report["reference_accuracy"], ""))
    width = max(len(r[0]) for r in rows) + 1
    for name, value, note in rows:
        shown = "n/a" if value is None else f"{value:.6g}" if isinstance(value, float) else value
        lines.append(f"{name + ':':<{width}} {shown}{note}")
    return "\n".join(lines)

