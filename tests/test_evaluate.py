"""Evaluation (`adm.evaluate`, `jobs/evaluate.py`): the metric math against the reference
evaluator's numbers, the FID Inception in pytorch-fid's layout, features from the Ray job equal
to a plain pass, the cache, bad inputs refused before any feature, and the quickstart digits
with classifier features (real Ray, real files, a classifier trained here)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from helpers import load_fixture, load_job
from adm import evaluate, storage
from adm.compat import openai
from adm.evaluate import inception
from adm.evaluate.evaluation import format_table, make_plan, run
from adm.evaluate.features import run_feature_job, summarize
from adm.evaluate.networks import FeatureExtractor, resolve_network
from adm.evaluate.sources import open_source

ROOT = Path(__file__).resolve().parents[1]
# An 8 px classifier: the 32 px quickstart digits are resized to it (the digits are 8x8 at
# heart), which keeps its training to seconds on a CPU.
DIGITS_CLASSIFIER = {"image_size": 8, "classifier_width": 32, "classifier_depth": 1,
                     "classifier_attention_resolutions": "4", "classifier_channel_mult": "1,2",
                     "classifier_num_head_channels": 32, "classifier_pool": "attention",
                     "num_classes": 10}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch and one BLAS thread in this process: on the shared 2-core machine two
    threads contend with every other process and run up to ~30x slower (Ray's actors get one
    per CPU anyway)."""
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(threads)


job = load_job("evaluate")


def _npz(path: Path, images: np.ndarray, labels: np.ndarray | None = None, **extra) -> str:
    arrays = {"arr_0": images, **({"arr_1": labels} if labels is not None else {}), **extra}
    np.savez(path, **arrays)
    return str(path)


def _random_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- metric math
def _rel(got: float, want: float) -> float:
    return abs(got - want) / abs(want)


def test_metric_math_matches_the_evaluator_fixtures():
    fx = load_fixture("evaluator_math.pt")
    for case in fx["fid"]:
        got = evaluate.frechet_distance(case["mu1"].numpy(), case["sigma1"].numpy(),
                                        case["mu2"].numpy(), case["sigma2"].numpy())
        assert _rel(got, case["value"]) <= 1e-6, (case["name"], got, case["value"])
    for case in fx["inception_score"]:
        got = evaluate.inception_score(case["probs"].numpy(), split_size=case["split_size"])
        assert _rel(got, case["value"]) <= 1e-6, (case["split_size"], got, case["value"])
    for case in fx["precision_recall"]:
        got = evaluate.precision_recall(case["real"].numpy(), case["fake"].numpy(), k=case["k"])
        assert got == (case["precision"], case["recall"]), case["name"]
        # The evaluator's blocks of 10,000 rows, here cut small: the same decisions.
        from adm.evaluate.metrics import precision_recall
        assert precision_recall(case["real"].numpy(), case["fake"].numpy(), case["k"],
                                rows=7, cols=11) == got, case["name"]


def test_fid_statistics_and_split_sizes_follow_the_evaluator():
    from adm.evaluate.metrics import split_sizes

    x = np.random.default_rng(1).normal(size=(50, 6)).astype(np.float32)
    mu, sigma = evaluate.fid_statistics(x)
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12)
    assert evaluate.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-9)
    assert split_sizes(1100, 400) == [400, 400, 300] and split_sizes(600) == [600]


# -------------------------------------------------------------------------------- Inception
def _pytorch_fid_random_weights(path: Path, seed: int = 0) -> str:
    """Random weights in the layout of pytorch-fid's pt_inception-2015-12-05 file: conv
    weights, batch-norm gamma/beta/running statistics (no num_batches_tracked), fc."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in inception.FIDInceptionV3().state_dict().items()
                  if not k.endswith("num_batches_tracked")}
    state = {}
    for key, shape in shapes.items():
        if key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(shape, generator=g)
        elif key.endswith("bn.weight"):
            state[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif len(shape) > 1:
            state[key] = torch.randn(shape, generator=g) / shape[1:].numel() ** 0.5
        else:
            state[key] = 0.1 * torch.randn(shape, generator=g)
    torch.save(state, path)
    return str(path)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("fid")
    return _pytorch_fid_random_weights(folder / inception.WEIGHTS_FILE)


@pytest.fixture(scope="module")
def inception_plain(inception_weights) -> FeatureExtractor:
    """The network built once in this process (its first call is slow on a CPU)."""
    return FeatureExtractor(resolve_network(f"inception:{inception_weights}"), batch_size=2,
                            device="cpu")


def test_inception_has_pytorch_fid_layout_and_feature_shapes(inception_weights,
                                                             inception_plain):
    state = torch.load(inception_weights, weights_only=True)
    # 94 conv + batch-norm units (5 tensors each) and the 1008-way fc; 23,850,960 parameters:
    # torchvision's Inception-v3 (27,161,264) without its auxiliary head (3,326,696), with
    # 8 more classes (8 x 2049).
    assert len(state) == 94 * 5 + 2
    assert sum(v.numel() for k, v in state.items() if "running" not in k) == 23_850_960
    assert state["Mixed_6d.branch1x1.conv.weight"].shape == (192, 768, 1, 1)
    assert state["fc.weight"].shape == (1008, 2048)
    inception.FIDInceptionV3().load_state_dict(state, strict=True)
    net = inception_plain.net
    spatial_out = []
    net.Mixed_6d.branch1x1.register_forward_hook(lambda m, a, out: spatial_out.append(out))
    images = torch.from_numpy(_random_images(3, 40))
    with torch.no_grad():
        out = net(images)
    assert out["pool"].shape == (3, 2048) and out["spatial"].shape == (3, 7 * 17 * 17)
    assert out["logits"].shape == (3, 1008)
    assert torch.isfinite(out["pool"]).all() and out["pool"].abs().sum() > 0
    # mixed_6/conv: Mixed_6d's 1x1 branch (the module's own call, the second one), first 7
    # channels, flattened in TensorFlow's H, W, C order; logits without the fc bias.
    want = spatial_out[-1][:, :7].permute(0, 2, 3, 1).reshape(3, -1)
    torch.testing.assert_close(out["spatial"], want)
    torch.testing.assert_close(out["logits"], out["pool"] @ state["fc.weight"].T)


def test_inception_weights_missing_or_wrong_are_named(tmp_path, inception_weights):
    missing = tmp_path / "nowhere" / inception.WEIGHTS_FILE
    with pytest.raises(inception.InceptionWeightsError) as e:
        resolve_network(f"inception:{missing}")
    assert inception.WEIGHTS_FILE in str(e.value)
    assert "github.com/mseitzer/pytorch-fid" in str(e.value)  # where users get it
    state = torch.load(inception_weights, weights_only=True)
    del state["Mixed_7c.branch_pool.conv.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(inception.InceptionWeightsError, match="1 missing keys"):
        resolve_network(f"inception:{tmp_path / 'partial.pth'}")
    # read as every checkpoint is (weights_only): a pickle that builds objects is refused
    torch.save({"fc.weight": torch.zeros(1), "hook": _Pickled()}, tmp_path / "code.pth")
    torch.save([state["fc.weight"]], tmp_path / "list.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "partial.pth").read_bytes()[:1000])
    for name, message in (("code.pth", "would run pickled code"),
                          ("list.pth", "does not hold a state dict"),
                          ("cut.pth", "is not a readable torch file")):
        with pytest.raises(inception.InceptionWeightsError) as e:
            resolve_network(f"inception:{tmp_path / name}")
        assert str(tmp_path / name) in str(e.value) and message in str(e.value), str(e.value)
        assert inception.WEIGHTS_FILE in str(e.value)


class _Pickled:
    """An object a weights_only load must refuse to build."""


def test_ray_job_features_equal_a_plain_pass(ray_session, tmp_path, inception_weights,
                                            inception_plain):
    net = resolve_network(f"inception:{inception_weights}")
    images = _random_images(4, 32, seed=3)
    src = open_source(_npz(tmp_path / "x.npz", images))
    # Two actors, a chunk each: rows come back out of order and are placed by index.
    (got,) = run_feature_job([src], net, batch_size=2, num_workers=2, chunk_rows=2,
                             progress=False)
    plain = inception_plain(images)
    assert set(got) == {"pool", "spatial", "logits"}
    for name in got:
        torch.testing.assert_close(torch.from_numpy(got[name]), torch.from_numpy(plain[name]),
                                   rtol=1e-5, atol=1e-5)


def test_reference_statistics_in_the_npz_are_used(tmp_path, inception_weights, inception_plain):
    """A reference batch's mu/sigma/mu_s/sigma_s replace the computed statistics (FID, sFID);
    its images still give the precision/recall features. Features from the plain network,
    cached as the Ray job caches them, so no Ray is needed."""
    images = _random_images(5, 32, seed=4)
    feats = inception_plain(images)
    mu, sigma = evaluate.fid_statistics(feats["pool"])
    mu_s, sigma_s = evaluate.fid_statistics(feats["spatial"])
    smp = _npz(tmp_path / "samples.npz", images)
    ref = _npz(tmp_path / "ref.npz", images, mu=mu + 0.5, sigma=sigma, mu_s=mu_s - 0.5,
               sigma_s=sigma_s)
    net = resolve_network(f"inception:{inception_weights}")
    for uri in (smp, ref):
        summarize(feats, open_source(uri), net)
    report = run(make_plan(ref, smp, f"inception:{inception_weights}"), progress=False)
    assert report["compared"]["reference"]["statistics"] == "file"
    assert report["compared"]["samples"]["statistics"] == "computed"
    assert report["fid"] == pytest.approx(0.25 * 2048, rel=1e-6)
    assert report["sfid"] == pytest.approx(0.25 * 7 * 17 * 17, rel=1e-6)
    assert report["precision"] == report["recall"] == 1.0  # the same images
    assert report["compared"]["inception_score_splits"] == [5]
    print(format_table(report))


# ------------------------------------------------------------------------------ bad inputs
@pytest.fixture(scope="module")
def random_classifier(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("classifier")
    torch.manual_seed(0)
    torch.save(openai.create_classifier(DIGITS_CLASSIFIER).state_dict(), folder / "model.pt")
    (folder / "flags.json").write_text(json.dumps(DIGITS_CLASSIFIER))
    return str(folder / "model.pt")


@pytest.mark.parametrize("pool", ["attention", "spatial", "adaptive"])
def test_classifier_features_are_t0_logits_and_the_last_layers_input(tmp_path, pool):
    flags = {**DIGITS_CLASSIFIER, "classifier_pool": pool}
    torch.manual_seed(1)
    net = openai.create_classifier(flags)
    with torch.no_grad():
        for p in net.parameters():  # ADM zero-initialises the last layer: make it count
            p.add_(0.1 * torch.randn_like(p))
    torch.save(net.state_dict(), tmp_path / "model.pt")
    (tmp_path / "flags.json").write_text(json.dumps(flags))
    images = _random_images(5, 32)
    got = FeatureExtractor(resolve_network(f"classifier:{tmp_path / 'model.pt'}"), 2, "cpu")(images)
    x = torch.nn.functional.interpolate(
        torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1, size=(8, 8),
        mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        logits = net.eval()(x, torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(torch.from_numpy(got["logits"]), logits)
    # The penultimate feature is what the last (affine) layer turns into the logits.
    last = {"attention": lambda: net.out[-1].c_proj, "adaptive": lambda: net.out[-2],
            "spatial": lambda: net.out[-1]}[pool]()
    weight = last.weight.reshape(len(last.weight), -1)
    torch.testing.assert_close(torch.from_numpy(got["pool"]) @ weight.T + last.bias, logits,
                               rtol=1e-4, atol=1e-4)


def test_bad_inputs_fail_before_any_feature(tmp_path, capsys, random_classifier,
                                            inception_weights):
    good = _npz(tmp_path / "good.npz", _random_images(8))
    np.savez(tmp_path / "no_arr0.npz", images=_random_images(8))
    np.savez(tmp_path / "float.npz", arr_0=_random_images(8).astype(np.float32))
    np.savez(tmp_path / "gray.npz", arr_0=_random_images(8)[..., :1])
    _npz(tmp_path / "three.npz", _random_images(3))
    _npz(tmp_path / "labels.npz", _random_images(8), np.full(8, 12))
    _npz(tmp_path / "stats.npz", _random_images(8), mu=np.zeros(64), sigma=np.eye(64),
         mu_s=np.zeros(64), sigma_s=np.eye(64))
    (tmp_path / "empty").mkdir()
    cls = ["--features", f"classifier:{random_classifier}"]
    cases = [
        ([str(tmp_path / "missing.npz"), good, *cls], "no file or folder at"),
        ([good, str(tmp_path / "no_arr0.npz"), *cls], "no arr_0 in the .npz"),
        ([good, str(tmp_path / "float.npz"), *cls], "expected uint8 [N, H, W, 3]"),
        ([good, str(tmp_path / "gray.npz"), *cls], "expected uint8 [N, H, W, 3]"),
        ([good, str(tmp_path / "three.npz"), *cls], "holds 3 images; precision and recall"),
        ([str(tmp_path / "labels.npz"), good, *cls], "labels 12..12 do not index"),
        ([good, str(tmp_path / "empty"), *cls], "nothing to evaluate"),
        ([str(tmp_path / "stats.npz"), good, "--features", f"inception:{inception_weights}"],
         "the evaluator's Inception statistics are [2048]"),
        ([good, good, "--features", "vgg:x"], "expected inception:PATH"),
        ([good, good, "--features", f"inception:{tmp_path / 'w.pth'}"],
         inception.WEIGHTS_FILE),
        ([good, good, "--features", f"classifier:{tmp_path / 'nothing.pt'}"], "no file at"),
    ]
    for argv, message in cases:
        assert job.main(argv + ["--no-progress"]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (argv, err)
    assert not list(tmp_path.glob("*features*")), "features were computed for a bad input"


# ----------------------------------------------------------------------------------- cache
def test_features_are_cached_and_read_back(ray_session, tmp_path, random_classifier, capsys,
                                          s3_server, monkeypatch):
    for k, v in s3_server.env.items():  # this process reads S3 too (the workers already do)
        monkeypatch.setenv(k, v)
    ref = _npz(tmp_path / "ref.npz", _random_images(12, seed=1), np.arange(12) % 10)
    run_folder = f"s3://{s3_server.new_bucket()}/run1"  # a jobs/sample.py folder on S3
    buf = io.BytesIO()
    np.savez(buf, arr_0=_random_images(9, seed=2), arr_1=np.arange(9) % 10)
    storage.write_bytes(f"{run_folder}/samples.npz", buf.getvalue())
    argv = [ref, run_folder, "--features", f"classifier:{random_classifier}", "--batch-size",
            "4", "--no-progress"]
    assert job.main(argv + ["--out", str(tmp_path / "a.json")]) == 0
    first = json.loads((tmp_path / "a.json").read_text())
    assert not first["compared"]["reference"]["from_cache"]
    assert first["compared"]["samples"]["kind"] == "samples"
    local = list(tmp_path.glob("ref.features-classifier-*.npz"))
    remote = [n for n in storage.listdir(run_folder) if n.startswith("features-classifier-")]
    assert len(local) == 1 and len(remote) == 1
    assert job.main(argv + ["--out", str(tmp_path / "b.json")]) == 0
    second = json.loads((tmp_path / "b.json").read_text())
    assert second["compared"]["reference"]["from_cache"]
    assert second["compared"]["samples"]["from_cache"]
    figures = ("fid", "inception_score", "precision", "recall", "sample_accuracy")
    assert {k: first[k] for k in figures} == {k: second[k] for k in figures}
    # The cache really is what is read: its statistics stand in for the network's.
    cache = f"{run_folder}/{remote[0]}"
    with np.load(io.BytesIO(storage.read_bytes(cache))) as z:
        data = {k: z[k] for k in z.files}
    with np.load(local[0]) as z:
        diff = data["mu"] - z["mu"]
    data["mu"] = data["mu"] + 1.0
    buf = io.BytesIO()
    np.savez(buf, **data)
    storage.write_bytes(cache, buf.getvalue())
    assert job.main(argv + ["--out", str(tmp_path / "c.json")]) == 0
    third = json.loads((tmp_path / "c.json").read_text())
    # |mu1 + 1 - mu2|^2 replaces |mu1 - mu2|^2; the covariance terms stay.
    want = first["fid"] - diff @ diff + (diff + 1) @ (diff + 1)
    assert third["fid"] == pytest.approx(want, rel=1e-6)
    # A changed input is not served from a stale cache.
    _npz(tmp_path / "ref.npz", _random_images(12, seed=5), np.arange(12) % 10)
    assert job.main(argv + ["--out", str(tmp_path / "d.json")]) == 0
    fourth = json.loads((tmp_path / "d.json").read_text())
    assert not fourth["compared"]["reference"]["from_cache"]
    assert fourth["compared"]["samples"]["from_cache"]
    assert "Precision:" in capsys.readouterr().out


# ------------------------------------------------------------------------ quickstart digits
def _split_arrays(split: Path) -> tuple[np.ndarray, np.ndarray]:
    """A digits split read directly from its Parquet shards: uint8 [N, 32, 32, 3], labels."""
    manifest = json.loads((split / "manifest.json").read_text())
    images, labels = [], []
    for shard in manifest["shards"]:
        table = pq.read_table(split / shard["file"], columns=["image", "label"])
        for data, label in zip(table.column("image").to_pylist(),
                               table.column("label").to_pylist()):
            images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
            labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def _train_digits_classifier(images: np.ndarray, labels: np.ndarray, folder: Path,
                             steps: int = 150) -> str:
    """A tiny noisy classifier trained at t = 0 in plain PyTorch, exported as training
    exports (state dict, flags.json beside it)."""
    torch.manual_seed(0)
    net = openai.create_classifier(DIGITS_CLASSIFIER)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    size = DIGITS_CLASSIFIER["image_size"]
    x_all = torch.nn.functional.interpolate(
        torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1, size=(size, size),
        mode="bilinear", align_corners=False, antialias=True)
    y_all = torch.from_numpy(labels)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(len(x_all), (64,), generator=g)
        loss = torch.nn.functional.cross_entropy(
            net(x_all[idx], torch.zeros(64, dtype=torch.long)), y_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    folder.mkdir()
    torch.save(net.state_dict(), folder / f"model{steps:06d}.pt")
    (folder / "flags.json").write_text(json.dumps(DIGITS_CLASSIFIER))
    return str(folder / f"model{steps:06d}.pt")


def test_quickstart_digits_fid_separates_real_noise_and_classes(ray_session, tmp_path, capsys):
    from adm.data.digits import prepare_digits

    prepare_digits(str(tmp_path / "digits"), log=lambda m: None)
    images, labels = _split_arrays(tmp_path / "digits" / "train")
    classifier = _train_digits_classifier(images, labels, tmp_path / "classifier")
    order = np.random.default_rng(0).permutation(len(images))
    a, b = order[: len(order) // 2], order[len(order) // 2:]
    half_a = _npz(tmp_path / "half_a.npz", images[a], labels[a])
    half_b = _npz(tmp_path / "half_b.npz", images[b], labels[b])
    noise = _npz(tmp_path / "noise.npz", _random_images(len(a), 32, seed=7))
    threes = tmp_path / "threes"  # class 3 as an image folder, class 8 as an .npz
    threes.mkdir()
    for i, img in enumerate(images[labels == 3]):
        Image.fromarray(img).save(threes / f"{i:04d}.png")
    eights = _npz(tmp_path / "eights.npz", images[labels == 8], labels[labels == 8])
    features = f"classifier:{classifier}"
    inputs = [half_a, half_b, noise, threes, eights, tmp_path / "digits" / "val"]
    # One feature job for the six sets (one actor start-up, not six), cached beside each;
    # the four evaluations below then read the caches.
    net = resolve_network(features)
    sources = [open_source(str(u), 32) for u in inputs]
    for source, raw in zip(sources, run_feature_job(sources, net, num_workers=2,
                                                    progress=False)):
        summarize(raw, source, net)

    def fid(reference, samples):
        report = run(make_plan(str(reference), str(samples), features), progress=False)
        print(format_table(report))
        assert report["compared"]["reference"]["from_cache"]
        assert report["compared"]["samples"]["from_cache"]
        return report

    halves, vs_noise, classes = fid(half_a, half_b), fid(half_a, noise), fid(threes, eights)
    vs_val = fid(tmp_path / "digits" / "val", half_a)  # a shard split as an input
    print(f"FID half/half {halves['fid']:.4g}, real/noise {vs_noise['fid']:.4g}, "
          f"3 vs 8 {classes['fid']:.4g}, val shards/half {vs_val['fid']:.4g}")
    assert halves["reference_accuracy"] > 0.8 and halves["sample_accuracy"] > 0.8
    assert vs_noise["fid"] > 20 * halves["fid"]
    assert classes["fid"] > 20 * halves["fid"]
    assert vs_val["fid"] < vs_noise["fid"] / 5
    assert vs_val["compared"]["reference"]["kind"] == "shards"
    assert classes["compared"]["reference"]["kind"] == "images"
    assert halves["precision"] > vs_noise["precision"]
    with capsys.disabled():
        print(f"\n[digits, classifier features] FID half/half {halves['fid']:.4g}, "
              f"real/noise {vs_noise['fid']:.4g}, 3 vs 8 {classes['fid']:.4g}, val shards/"
              f"half {vs_val['fid']:.4g}; accuracy {halves['sample_accuracy']:.3f}")
