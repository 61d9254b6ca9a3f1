"""adm.data's Ray Data pipelines over real shards: preprocessing as the reference does it,
seeded per-epoch shuffling, the upsampler's pairs, S3, and a 2-worker Ray Train loop."""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import assert_within
from test_data_prepare import CLASSES, good_files, make_image_files, write_tree

from adm import storage
from adm.data import DataConfig, image_dataset, superres_dataset, train_data_config
from adm.data.manifest import load_split
from adm.data.prepare import prepare_imagenet
from adm.data.preprocess import center_crop_arr, decode_image, hwc_to_chw, to_model_range
from adm.data.shards import ShardWriterConfig

# Fractional CPUs: the session's Ray has 4 logical CPUs on a 2-core box; Train workers and
# decode tasks must fit together (else Ray Data's tasks never get a CPU and the run hangs).
CFG = DataConfig(decode_num_cpus=0.5, decode_batch_size=8)
WRITER = ShardWriterConfig(images_per_shard=6, num_cpus_per_task=0.5, progress_interval_s=60)


@pytest.fixture(scope="module")
def dataset(ray_session, tmp_path_factory):
    """A prepared split of 34 real images (with CMYK, gray, RGBA, PNG-as-JPEG among them)
    and the original bytes by source path."""
    root = tmp_path_factory.mktemp("ds")
    files = make_image_files(per_class=10)
    prepare_imagenet(str(root / "out"), src=write_tree(root / "src", files), config=WRITER,
                     log=lambda m: None)
    good = good_files(files)
    assert len(good) % 2 == 0  # Train splits equally between 2 workers: no row dropped
    info = load_split(str(root / "out"))
    by_index = {}
    for uri in info.shard_uris:
        for row in pq.read_table(uri, columns=["index", "source", "label"]).to_pylist():
            by_index[row["index"]] = row
    return {"uri": str(root / "out"), "good": good, "by_index": by_index}


def _expected(data: bytes, size: int) -> np.ndarray:
    """The reference's preprocessing of one file: float32 [3, S, S] in [-1, 1]."""
    return hwc_to_chw(to_model_range(center_crop_arr(decode_image(data), size)))


def _epoch(ds, **kw) -> dict[str, np.ndarray]:
    cols: dict[str, list] = {}
    for batch in ds.iter_batches(batch_size=16, batch_format="numpy", **kw):
        for k, v in batch.items():
            cols.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in cols.items()}


@pytest.mark.timeout(180)
def test_center_crop_pipeline_equals_reference_preprocessing(dataset):
    ds = image_dataset(dataset["uri"], 16, random_flip=False,
                       config=DataConfig(**{**CFG.__dict__, "shuffle": "none"}))
    out = _epoch(ds)
    n = len(dataset["good"])
    # shuffle="none": the split's own order; every image exactly once.
    assert out["index"].tolist() == list(range(n))
    assert out["image"].shape == (n, 3, 16, 16) and out["image"].dtype == np.float32
    for i, label, image in zip(out["index"], out["label"], out["image"]):
        row = dataset["by_index"][int(i)]
        assert label == row["label"] == CLASSES.index(row["source"].split("/")[0])
        np.testing.assert_array_equal(image, _expected(dataset["good"][row["source"]], 16),
                                      err_msg=row["source"])


@pytest.mark.timeout(180)
def test_shuffle_and_augmentation_repeat_per_seed_and_change_per_epoch(dataset):
    def build(seed, shuffle="shards"):
        return image_dataset(dataset["uri"], 16, random_crop=True, random_flip=True, seed=seed,
                             config=DataConfig(**{**CFG.__dict__, "shuffle": shuffle}))

    ds = build(seed=7)
    e0, e1 = _epoch(ds), _epoch(ds)
    again = _epoch(build(seed=7))
    other = _epoch(build(seed=8))
    n = len(dataset["good"])
    for e in (e0, e1, again, other):
        assert sorted(e["index"].tolist()) == list(range(n))
    np.testing.assert_array_equal(again["index"], e0["index"])
    np.testing.assert_array_equal(again["image"], e0["image"])  # same crops and flips
    assert e1["index"].tolist() != e0["index"].tolist()
    assert other["index"].tolist() != e0["index"].tolist()
    # Per image, epoch 1's random crop differs from epoch 0's for most images.
    pos0 = {int(i): k for k, i in enumerate(e0["index"])}
    changed = sum(not np.array_equal(e1["image"][k], e0["image"][pos0[int(i)]])
                  for k, i in enumerate(e1["index"]))
    assert changed > n // 2
    # A global shuffle is seeded the same way.
    g = build(seed=7, shuffle="global")
    g0, g1 = _epoch(g), _epoch(g)
    assert sorted(g0["index"].tolist()) == list(range(n))
    assert g0["index"].tolist() != g1["index"].tolist()
    assert _epoch(build(seed=7, shuffle="global"))["index"].tolist() == g0["index"].tolist()


@pytest.mark.timeout(180)
def test_flip_is_a_mirror_of_the_center_crop(dataset):
    out = _epoch(image_dataset(dataset["uri"], 12, random_flip=True, seed=3, config=CFG))
    flips = 0
    for i, image in zip(out["index"], out["image"]):
        want = _expected(dataset["good"][dataset["by_index"][int(i)]["source"]], 12)
        if np.array_equal(image, want[:, :, ::-1]) and not np.array_equal(image, want):
            flips += 1
        else:
            np.testing.assert_array_equal(image, want)
    assert 0 < flips < len(out["index"])


@pytest.mark.timeout(180)
def test_superres_pairs_match_the_reference_low_res(dataset):
    out = _epoch(superres_dataset(dataset["uri"], 16, 8, random_flip=False, config=CFG))
    assert out["image"].shape[1:] == (3, 16, 16) and out["low_res"].shape[1:] == (3, 8, 8)
    for i, image, low in zip(out["index"], out["image"], out["low_res"]):
        want = _expected(dataset["good"][dataset["by_index"][int(i)]["source"]], 16)
        np.testing.assert_array_equal(image, want)
        # super_res_train.py: F.interpolate(large_batch, small_size, mode="area")
        ref = torch.nn.functional.interpolate(torch.from_numpy(want[None].copy()), 8, mode="area")
        assert_within(torch.from_numpy(low[None]), ref, atol=1e-6, what="low_res")


@pytest.mark.timeout(180)
def test_dataset_streams_from_s3(ray_session, s3_server, tmp_path):
    opts = s3_server.options
    bucket = s3_server.new_bucket()
    files = make_image_files(per_class=2)
    uri = f"s3://{bucket}/imagenet"
    prepare_imagenet(uri, src=write_tree(tmp_path / "src", files), config=WRITER, s3=opts,
                     log=lambda m: None)
    info = load_split(uri, s3=opts)
    source_of = {r["index"]: r["source"] for u in info.shard_uris
                 for r in pq.read_table(storage.open_input(u, opts)).to_pylist()}
    out = _epoch(image_dataset(uri, 8, random_flip=False, config=CFG, s3=opts))
    good = good_files(files)
    assert sorted(source_of[int(i)] for i in out["index"]) == sorted(good)
    for i, label, image in zip(out["index"], out["label"], out["image"]):
        source = source_of[int(i)]
        assert label == CLASSES.index(source.split("/")[0])
        np.testing.assert_array_equal(image, _expected(good[source], 8))


def test_config_and_missing_dataset_errors(tmp_path):
    from adm.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="data.shuffle: 'sometimes' is not one of"):
        from_dict(DataConfig, {"shuffle": "sometimes"}, "data")
    with pytest.raises(ConfigError, match="data.decode_num_cpus"):
        from_dict(DataConfig, {"decode_num_cpus": 0}, "data")
    with pytest.raises(ConfigError, match=r"unknown config key\(s\): data.decode_wrokers"):
        from_dict(DataConfig, {"decode_wrokers": 2}, "data")
    assert from_dict(DataConfig, {"decode_workers": 3}, "data").decode_workers == 3
    with pytest.raises(FileNotFoundError, match="no prepared dataset"):
        image_dataset(str(tmp_path / "nothing"), 16)
    with pytest.raises(ValueError, match="small_size"):
        superres_dataset(str(tmp_path), 16, 32)


def _fit(uri: str, seed: int, out: str, storage_path: str) -> list[list[list[int]]]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Defined here so that Ray pickles it by value (workers cannot import this test module).
    def train_loop(config):
        """A trivial classifier trained for 2 epochs; each rank records the rows it received."""
        import ray.train
        from ray.train.torch import prepare_model

        rank = ray.train.get_context().get_world_rank()
        model = prepare_model(torch.nn.Linear(3 * 8 * 8, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        seen = []
        for _ in range(config["epochs"]):
            ids = []
            shard = ray.train.get_dataset_shard("train")
            for batch in shard.iter_torch_batches(batch_size=4):
                loss = torch.nn.functional.cross_entropy(model(batch["image"].flatten(1)),
                                                         batch["label"])
                opt.zero_grad()
                loss.backward()
                opt.step()
                ids.extend(batch["index"].tolist())
            seen.append(ids)
        with open(os.path.join(config["out"], f"rank{rank}.json"), "w") as f:
            json.dump(seen, f)
        ray.train.report({"loss": float(loss)})

    os.makedirs(out)
    ds = image_dataset(uri, 8, random_crop=True, seed=seed, config=CFG)
    TorchTrainer(
        train_loop,
        train_loop_config={"epochs": 2, "out": out},
        # 0.5 CPU per worker leaves room for Ray Data's read and decode tasks.
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False,
                                     resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(storage_path=storage_path, name=f"data-{time.time_ns()}"),
        datasets={"train": ds},
        dataset_config=train_data_config(CFG),
    ).fit()
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(2)]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_worker_train_loop_sees_every_image_once_per_epoch(dataset, tmp_path):
    n = len(dataset["good"])
    first = _fit(dataset["uri"], 11, str(tmp_path / "a"), str(tmp_path / "runs"))
    for epoch in range(2):
        rank0, rank1 = first[0][epoch], first[1][epoch]
        assert len(rank0) == len(rank1) == n // 2
        assert sorted(rank0 + rank1) == list(range(n))  # every image once across the workers
    assert first[0][0] + first[1][0] != first[0][1] + first[1][1]  # a new order per epoch
    second = _fit(dataset["uri"], 11, str(tmp_path / "b"), str(tmp_path / "runs"))
    assert second == first  # the same seed gives the same per-worker streams
