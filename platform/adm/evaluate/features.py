"""Features of an image set, computed by a Ray Data job and cached beside the input.

    chunks of row indices (driver) -> FeatureWorker actors (ActorPoolStrategy, CPU or GPU):
        each reads its chunk's images itself (npz rows, shard rows, image files), runs the
        feature network in batches -> rows {index, pool, logits[, spatial]} -> driver: placed
        by index, statistics (float64), cache file written atomically

The cache (``sources.cache_uri``) holds ``pool`` and ``logits`` (float32, for precision,
recall, Inception Score and accuracy) and the float64 statistics ``mu``, ``sigma`` and, for
Inception, ``mu_s``, ``sigma_s`` (sFID needs no more than those), with the input's fingerprint
and the network's hash: a second evaluation reads it back instead of running the network.
"""
from __future__ import annotations

import io
import sys
from dataclasses import dataclass

import numpy as np

from .. import storage
from ..nodetypes import check_fits, worker_demand
from ..progress import progress_bar
from .metrics import fid_statistics
from .networks import FeatureExtractor, FeatureNetwork
from .sources import Chunk, ImageSource, cache_uri, read_rows

CACHE_FORMAT = "adm-features/1"


@dataclass
class Features:
    """A set's features: ``pool`` [N, D] and ``logits`` [N, C] float32, statistics of pool
    (``mu`` [D], ``sigma`` [D, D]) and of the spatial features (``mu_s``, ``sigma_s``; None
    without them), float64; ``cache`` where they are kept and whether they came from it."""

    pool: np.ndarray
    logits: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray | None
    sigma_s: np.ndarray | None
    cache: str
    from_cache: bool = False


class FeatureWorker:
    """A Ray Data actor: loads the feature network once; ``__call__`` maps a batch of chunks
    (columns source, start, stop, part, offset) to their rows' features, with each row's
    ``source`` (position in ``sources``) and ``index`` in it."""

    def __init__(self, sources: list[ImageSource], net: FeatureNetwork, batch_size: int,
                 gpus: bool):
        self.sources = sources
        self.extract = FeatureExtractor(net, batch_size, "cuda" if gpus else "cpu")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = []
        for i, start, stop, part, offset in zip(batch["source"], batch["start"], batch["stop"],
                                                batch["part"], batch["offset"]):
            chunk = Chunk(int(start), int(stop), int(part), int(offset))
            out = self.extract(read_rows(self.sources[int(i)], chunk))
            out["index"] = np.arange(chunk.start, chunk.stop, dtype=np.int64)
            out["source"] = np.full(len(out["index"]), i, dtype=np.int64)
            outs.append(out)
        return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def _cache_bytes(feats: dict[str, np.ndarray], source: ImageSource, net: FeatureNetwork) -> bytes:
    meta = {"format": CACHE_FORMAT, "fingerprint": source.fingerprint, "network": net.key,
            "num_images": source.num_images}
    buf = io.BytesIO()
    np.savez(buf, **feats, **{k: np.array(str(v)) for k, v in meta.items()})
    return buf.getvalue()


def _open_cache(uri: str):
    """The cache file as a lazy ``NpzFile`` (a local file is read member by member)."""
    if storage.is_s3(uri):
        return np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False)
    return np.load(storage.resolve_filesystem(uri)[1], allow_pickle=False)


def _fresh(z, source: ImageSource, net: FeatureNetwork) -> bool:
    want = {"format": CACHE_FORMAT, "fingerprint": source.fingerprint, "network": net.key,
            "num_images": str(source.num_images)}
    return all(k in z.files and str(z[k]) == v for k, v in want.items())


def has_cache(source: ImageSource, net: FeatureNetwork) -> bool:
    """Whether valid cached features exist (reads only the cache's small entries locally)."""
    uri = cache_uri(source, net.key)
    if not storage.is_file(uri):
        return False
    try:
        with _open_cache(uri) as z:
            return _fresh(z, source, net)
    except (OSError, ValueError):
        return False


def load_cache(source: ImageSource, net: FeatureNetwork) -> Features | None:
    """The cached features of ``source``, or None when there are none or they are stale (the
    input changed, another network, another format) or damaged."""
    uri = cache_uri(source, net.key)
    if not storage.is_file(uri):
        return None
    try:
        with _open_cache(uri) as z:
            if not _fresh(z, source, net):
                return None
            data = {k: z[k] for k in ("pool", "logits", "mu", "sigma")}
            if net.has_spatial:
                data.update(mu_s=z["mu_s"], sigma_s=z["sigma_s"])
    except (OSError, ValueError, KeyError):
        return None  # a damaged cache is recomputed
    return Features(data["pool"], data["logits"], data["mu"], data["sigma"],
                    data.get("mu_s"), data.get("sigma_s"), uri, from_cache=True)


def run_feature_job(sources: list[ImageSource], net: FeatureNetwork, *, batch_size: int = 64,
                    num_workers: int = 1, gpus: bool = False, cpus_per_worker: float = 1.0,
                    resources: dict[str, float] | None = None,
                    chunk_rows: int | None = None, progress: bool = True
                    ) -> list[dict[str, np.ndarray]]:
    """Every image's features, per source in index order: ``pool``, ``logits`` (and
    ``spatial``), from one Ray Data job over ``num_workers`` actors, so the network is loaded
    once per actor for all the sources (Ray must be running)."""
    import ray

    check_fits(worker_demand(cpus_per_worker, int(gpus), resources), "feature actors")
    rows = chunk_rows or batch_size * 4
    chunks = [{"source": i, **c.__dict__} for i, s in enumerate(sources) for c in s.chunks(rows)]
    ds = ray.data.from_items(chunks, override_num_blocks=len(chunks))
    ds = ds.map_batches(
        FeatureWorker, batch_size=1, batch_format="numpy",
        fn_constructor_kwargs=dict(sources=sources, net=net, batch_size=batch_size, gpus=gpus),
        compute=ray.data.ActorPoolStrategy(size=max(1, min(num_workers, len(chunks)))),
        num_cpus=cpus_per_worker, num_gpus=1 if gpus else None, resources=resources or None)
    outs: list[dict[str, np.ndarray]] = [{} for _ in sources]
    seen = [np.zeros(s.num_images, dtype=bool) for s in sources]
    total = sum(s.num_images for s in sources)
    with progress_bar(total=total, unit="image", disable=not progress, desc="features") as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            index, which = batch.pop("index"), batch.pop("source")
            for i in np.unique(which):
                rows_i, out, n = which == i, outs[i], sources[i].num_images
                for name, value in batch.items():
                    if name not in out:
                        out[name] = np.empty((n, *value.shape[1:]), value.dtype)
                    out[name][index[rows_i]] = value[rows_i]
                seen[i][index[rows_i]] = True
            bar.update(len(index))
    for source, done in zip(sources, seen):
        if not done.all():
            raise RuntimeError(f"the feature job returned {int(done.sum())} of "
                               f"{source.num_images} images of {source.uri}")
    return outs


def summarize(raw: dict[str, np.ndarray], source: ImageSource, net: FeatureNetwork,
              write: bool = True) -> Features:
    """Statistics of the job's features, written to the cache (``write``)."""
    mu, sigma = fid_statistics(raw["pool"])
    stats = {"pool": raw["pool"], "logits": raw["logits"], "mu": mu, "sigma": sigma}
    if net.has_spatial:
        stats["mu_s"], stats["sigma_s"] = fid_statistics(raw["spatial"])
    uri = cache_uri(source, net.key)
    if write:
        try:
            storage.write_bytes(uri, _cache_bytes(stats, source, net))
        except OSError as e:  # a read-only input folder: evaluate anyway, say so
            print(f"warning: could not cache features at {uri}: {e}", file=sys.stderr)
    return Features(raw["pool"], raw["logits"], mu, sigma, stats.get("mu_s"),
                    stats.get("sigma_s"), uri, from_cache=False)
