"""The shard writer and jobs/prepare_*.py on real image files, real Ray, real Parquet, and a real
S3 API (moto server on 127.0.0.1).

The source trees are generated here with ImageNet's real quirks: a CMYK JPEG, a grayscale JPEG,
an RGBA PNG, a PNG named .JPEG, and a truncated, an empty and an undecodable .JPEG, plus files
that are not images. The kill/restart test SIGKILLs a running job from outside, once it has
written some shards; the bad-input tests run the jobs as the user would and read their stderr."""
from __future__ import annotations

import hashlib
import io
import os
import signal
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from adm import storage
from adm.config import ConfigError, UserError
from adm.data.digits import DIGITS_CLASSES
from adm.data.manifest import load_split, shard_name
from adm.data.prepare import prepare_imagenet
from adm.data.shards import ShardMismatchError, ShardWriterConfig
from adm.data.sources import parse_labels_file

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["n01440764", "n01443537", "n02102040"]
BAD = {  # source -> what the manifest's reason must say
    "n02102040/n02102040_truncated.JPEG": "truncated",
    "n02102040/n02102040_empty.JPEG": "empty file",
    "n02102040/n02102040_garbage.JPEG": "not an image",
}
OTHER = {  # files passed over while scanning, and why
    "n01440764/synset_notes.txt": "not an image file name",
    ".DS_Store": "hidden",
    "n01443537/._n01443537_1.JPEG": "hidden",
    "stray.JPEG": "not inside a class folder",
}


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth random image (JPEG-friendly, like a photograph more than noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC))


def make_image_files(per_class: int = 6) -> dict[str, bytes]:
    """relative path -> bytes of an ImageNet-like class-folder tree with every quirk."""
    files: dict[str, bytes] = {}
    seed = 0
    for cls in CLASSES:
        for i in range(per_class):
            seed += 1
            h, w = 20 + (seed * 7) % 23, 20 + (seed * 11) % 29
            files[f"{cls}/{cls}_{i}.JPEG"] = _encode(Image.fromarray(_photo(h, w, seed)), "JPEG",
                                                     quality=90)
    rgb = _photo(30, 40, 99)
    files["n01440764/n01440764_cmyk.JPEG"] = _encode(Image.fromarray(rgb).convert("CMYK"), "JPEG")
    files["n01443537/n01443537_gray.JPEG"] = _encode(Image.fromarray(rgb).convert("L"), "JPEG")
    rgba = np.concatenate([rgb, np.full((30, 40, 1), 128, np.uint8)], axis=-1)
    files["n01443537/n01443537_rgba.png"] = _encode(Image.fromarray(rgba, "RGBA"), "PNG")
    files["n02102040/n02102040_png.JPEG"] = _encode(Image.fromarray(rgb), "PNG")
    files["n02102040/n02102040_truncated.JPEG"] = _encode(Image.fromarray(_photo(64, 64, 5)),
                                                          "JPEG")[:700]
    files["n02102040/n02102040_empty.JPEG"] = b""
    files["n02102040/n02102040_garbage.JPEG"] = b"<html>404 Not Found</html>"
    files["n01440764/synset_notes.txt"] = b"tench"
    files[".DS_Store"] = b"\x00\x00\x00\x01Bud1"
    files["n01443537/._n01443537_1.JPEG"] = b"\x00\x05\x16\x07AppleDouble"
    files["stray.JPEG"] = _encode(Image.fromarray(rgb), "JPEG")
    return files


def good_files(files: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in files.items() if k not in BAD and k not in OTHER}


def write_tree(root: Path, files: dict[str, bytes]) -> str:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return str(root)


def write_ilsvrc_tar(path: Path, files: dict[str, bytes]) -> str:
    """ILSVRC2012_img_train.tar's layout: an uncompressed tar of per-class tars."""
    by_class: dict[str, dict[str, bytes]] = {}
    for rel, data in files.items():
        if "/" in rel and not rel.startswith("."):
            cls, name = rel.split("/", 1)
            by_class.setdefault(cls, {})[name] = data
    with tarfile.open(path, "w") as outer:
        for cls in sorted(by_class):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for name, data in sorted(by_class[cls].items()):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    inner.addfile(info, io.BytesIO(data))
            info = tarfile.TarInfo(f"{cls}.tar")
            info.size = buf.tell()
            buf.seek(0)
            outer.addfile(info, buf)
    return str(path)


def read_rows(split_uri: str, s3=None) -> dict[str, dict]:
    """source -> row of every shard listed in the split's manifest (read back with pyarrow)."""
    info = load_split(split_uri, "train", s3)
    rows = {}
    for uri in info.shard_uris:
        table = pq.read_table(storage.open_input(uri, s3))
        for row in table.to_pylist():
            rows[row["source"]] = row
    return rows


def tree_bytes(root: str) -> dict[str, bytes]:
    return {e.relpath: storage.read_bytes(storage.join(root, e.relpath))
            for e in storage.list_files(root)}


CONFIG = ShardWriterConfig(images_per_shard=5, num_cpus_per_task=0.5, progress_interval_s=0.0)


@pytest.mark.parametrize("field, value, message", [
    ("images_per_shard", 0, "images_per_shard: must be positive, got 0"),
    ("check_chunk_size", -2, "check_chunk_size: must be positive, got -2"),
    ("num_cpus_per_task", 0.0, "num_cpus_per_task: must be positive, got 0.0"),
    ("max_in_flight", 0, "max_in_flight: must be positive, got 0"),
    ("row_group_size", 0, "row_group_size: must be positive, got 0"),
    ("progress_interval_s", -1.5, "progress_interval_s: must be >= 0, got -1.5"),
    ("images_per_shard", "many", "images_per_shard: expected int, got 'many'"),
])
def test_shard_writer_settings_are_checked_naming_the_field(field, value, message):
    """The writer's settings are a config class: each bound is the field's own constraint, and
    a bad value is one ConfigError (a UserError: the jobs print it as one line) naming it."""
    with pytest.raises(ConfigError) as e:
        ShardWriterConfig(**{field: value})
    assert str(e.value) == message
    assert isinstance(e.value, UserError)
    with pytest.raises(ConfigError, match="unknown config key.*images_per_shrad"):
        ShardWriterConfig(images_per_shrad=5)
    # what the job's flags give, converted; None (the default) is a valid max_in_flight
    assert ShardWriterConfig(images_per_shard="7", max_in_flight=None).images_per_shard == 7


def check_prepared(split_uri: str, files: dict[str, bytes], s3=None) -> dict:
    """Every good image round-trips (bytes, label, class, source); bad ones are listed."""
    good = good_files(files)
    info = load_split(split_uri, "train", s3)
    m = info.manifest
    assert info.classes == CLASSES
    rows = read_rows(split_uri, s3)
    assert sorted(rows) == sorted(good)
    for source, row in rows.items():
        assert row["image"] == good[source], source
        assert row["class_name"] == source.split("/")[0]
        assert row["label"] == CLASSES.index(row["class_name"])
    assert sorted(r["index"] for r in rows.values()) == list(range(len(good)))
    modes = {r["source"]: (r["format"], r["mode"]) for r in rows.values()}
    assert modes["n01440764/n01440764_cmyk.JPEG"] == ("JPEG", "CMYK")
    assert modes["n01443537/n01443537_gray.JPEG"] == ("JPEG", "L")
    assert modes["n01443537/n01443537_rgba.png"] == ("PNG", "RGBA")
    assert modes["n02102040/n02102040_png.JPEG"] == ("PNG", "RGB")
    # Counts, fixed shard size, checksums of the files as stored.
    assert m["images_written"] == len(good)
    assert [s["rows"] for s in m["shards"]] == [5] * (len(good) // 5) + (
        [len(good) % 5] if len(good) % 5 else [])
    assert m["class_counts"] == {c: sum(k.startswith(c) for k in good) for c in CLASSES}
    for shard, uri in zip(m["shards"], info.shard_uris):
        data = storage.read_bytes(uri, s3)
        assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["bytes"]
    reasons = {s["source"]: s["reason"] for s in m["skipped"]}
    assert m["images_skipped"] == len(reasons) == len(BAD) + len(OTHER)
    for source, why in {**BAD, **OTHER}.items():
        assert why in reasons[source], (source, reasons[source])
    return m


@pytest.mark.timeout(180)
def test_prepare_local_folder_roundtrip(ray_session, tmp_path, capsys):
    files = make_image_files()
    src = write_tree(tmp_path / "train", files)
    logs: list[str] = []
    manifests = prepare_imagenet(str(tmp_path / "out"), src=src, config=CONFIG, log=logs.append)
    check_prepared(str(tmp_path / "out"), files)
    assert manifests["train"]["images_written"] == len(good_files(files))
    # Progress bars (tqdm on stderr: count, rate, ETA) while it runs; bad files are logged.
    err = capsys.readouterr().err
    candidates, n_shards = len(files) - len(OTHER), len(manifests["train"]["shards"])
    # tqdm shows a rate below 1/s inverted (s/img), as on a loaded machine.
    assert re.search(rf"train: decode-checked: 100%.*{candidates}/{candidates} "
                     r"\[[0-9:]+<[0-9:]+, +[0-9.]+(img/s|s/img), bad=3\]", err), err
    assert re.search(rf"train: shards written: 100%.*{n_shards}/{n_shards} "
                     r"\[[0-9:]+<[0-9:]+, +[0-9.]+(shard/s|s/shard)\]", err), err
    assert sum("skipping" in line for line in logs) == len(BAD)
    assert any("skipped 7 files" in line for line in logs)
    # Readers never see temporaries; nothing but shards, classes and manifest is left.
    names = os.listdir(tmp_path / "out" / "train")
    assert sorted(names) == sorted(["classes.json", "manifest.json"] +
                                   [shard_name(i) for i in range(len(manifests["train"]["shards"]))])
    # Running it again is a no-op that returns the same manifest.
    again = prepare_imagenet(str(tmp_path / "out"), src=src, config=CONFIG, log=logs.append)
    assert again == manifests
    assert "already complete" in logs[-1]


@pytest.mark.timeout(180)
def test_ilsvrc_tar_of_class_tars_gives_the_same_shards(ray_session, tmp_path):
    files = make_image_files()
    src = write_tree(tmp_path / "train", files)
    tar = write_ilsvrc_tar(tmp_path / "ILSVRC2012_img_train.tar", files)
    prepare_imagenet(str(tmp_path / "from_dir"), src=src, config=CONFIG, log=lambda m: None)
    prepare_imagenet(str(tmp_path / "from_tar"), src=tar, config=CONFIG, log=lambda m: None)
    # Same images, same paths -> byte-identical shards. Only the scan's "other files" differ
    # (the tar holds no root-level files), hence the source digest and skipped list.
    a, b = tree_bytes(str(tmp_path / "from_dir")), tree_bytes(str(tmp_path / "from_tar"))
    shards = [k for k in a if k.endswith(".parquet")]
    assert shards and all(a[k] == b[k] for k in shards)
    mb = load_split(str(tmp_path / "from_tar"), "train").manifest
    assert mb["images_written"] == len(good_files(files))
    reasons = {s["source"]: s["reason"] for s in mb["skipped"]}
    assert set(reasons) == set(BAD) | {"n01440764/synset_notes.txt", "n01443537/._n01443537_1.JPEG"}
    assert "hidden" in reasons["n01443537/._n01443537_1.JPEG"]


def test_compressed_tar_is_refused_with_a_clear_error(tmp_path):
    from adm.data.sources import scan_class_tree

    path = tmp_path / "train.tar.gz"
    with tarfile.open(path, "w:gz") as t:
        info = tarfile.TarInfo("a/x.JPEG")
        info.size = 1
        t.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(ValueError, match="gzip-compressed tar"):
        scan_class_tree(str(path))
    with pytest.raises(FileNotFoundError, match="neither a folder nor a tar"):
        scan_class_tree(str(tmp_path / "missing"))


@pytest.mark.timeout(180)
def test_validation_split_with_labels_file(ray_session, tmp_path):
    files = make_image_files(per_class=2)
    src = write_tree(tmp_path / "train", files)
    val_dir = tmp_path / "val"
    val_dir.mkdir()
    labels = []
    for i, cls in enumerate(CLASSES * 2):
        name = f"ILSVRC2012_val_{i + 1:08d}.JPEG"
        (val_dir / name).write_bytes(_encode(Image.fromarray(_photo(24, 30, 100 + i)), "JPEG"))
        labels.append(f"{name} {cls}")
    (val_dir / "ILSVRC2012_val_00000099.JPEG").write_bytes(  # no label
        _encode(Image.fromarray(_photo(24, 30, 7)), "JPEG"))
    (val_dir / "ILSVRC2012_val_00000098.JPEG").write_bytes(  # a class train does not have
        _encode(Image.fromarray(_photo(24, 30, 8)), "JPEG"))
    labels.append("ILSVRC2012_val_00000098 n09999999")
    (val_dir / "ILSVRC2012_val_00000097.JPEG").write_bytes(  # truncated
        _encode(Image.fromarray(_photo(64, 64, 9)), "JPEG")[:700])
    labels.append("ILSVRC2012_val_00000097 n01440764")
    label_file = tmp_path / "LOC_val_solution.csv"
    # Kaggle's format: header, then ImageId,PredictionString with the synset first.
    label_file.write_text("ImageId,PredictionString\n" + "\n".join(
        f"{ln.split()[0].rsplit('.', 1)[0]},{ln.split()[1]} 1 2 3 4" for ln in labels) + "\n")

    out = str(tmp_path / "out")
    m = prepare_imagenet(out, src=src, val=str(val_dir), val_labels=str(label_file),
                         config=CONFIG, log=lambda msg: None)["val"]
    assert m["images_written"] == 6 and m["images_skipped"] == 3
    reasons = {s["source"]: s["reason"] for s in m["skipped"]}
    assert "no label" in reasons["ILSVRC2012_val_00000099.JPEG"]
    assert "not one of the 3 training classes" in reasons["ILSVRC2012_val_00000098.JPEG"]
    assert "truncated" in reasons["ILSVRC2012_val_00000097.JPEG"]
    val = load_split(out, "val")
    assert val.classes == CLASSES
    rows = [r for u in val.shard_uris for r in pq.read_table(u).to_pylist()]
    for r in rows:
        i = int(r["source"][len("ILSVRC2012_val_"):-len(".JPEG")]) - 1
        assert r["class_name"] == (CLASSES * 2)[i] and r["label"] == CLASSES.index(r["class_name"])
    # The validation split alone, later: classes come from the prepared train split.
    m2 = prepare_imagenet(out, val=str(val_dir), val_labels=str(label_file), config=CONFIG,
                          log=lambda msg: None)["val"]
    assert m2 == m
    with pytest.raises(FileNotFoundError, match="prepare it first"):
        prepare_imagenet(str(tmp_path / "empty"), val=str(val_dir), val_labels=str(label_file),
                         config=CONFIG)


def test_tar_of_a_class_folder_tree_and_a_flat_validation_tar(tmp_path):
    from adm.data.sources import read_items, scan_class_tree, scan_labelled_files

    files = {"train/n1/a.JPEG": b"A" * 10, "train/n1/sub/b.JPEG": b"B" * 7,
             "train/n2/c.png": b"C" * 3, "train/n2/notes.txt": b"x"}
    with tarfile.open(tmp_path / "tree.tar", "w") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    scan = scan_class_tree(str(tmp_path / "tree.tar"))
    # The single top folder ("train/") is the root; classes are the folders under it.
    assert [(i.source, i.class_name) for i in scan.items] == [
        ("n1/a.JPEG", "n1"), ("n1/sub/b.JPEG", "n1"), ("n2/c.png", "n2")]
    assert [s.source for s in scan.skipped] == ["n2/notes.txt"]
    assert read_items(scan.items) == [b"A" * 10, b"B" * 7, b"C" * 3]  # ranged reads by offset
    with tarfile.open(tmp_path / "val.tar", "w") as t:
        for name in ("v1.JPEG", "v2.JPEG"):
            info = tarfile.TarInfo(name)
            info.size = 2
            t.addfile(info, io.BytesIO(name[:2].encode()))
    val = scan_labelled_files(str(tmp_path / "val.tar"), {"v1": "n2"})
    assert [(i.source, i.class_name) for i in val.items] == [("v1.JPEG", "n2")]
    assert [(s.source, s.reason) for s in val.skipped] == [("v2.JPEG", "no label in the labels file")]
    assert read_items(val.items) == [b"v1"]


def test_labels_file_formats_and_errors():
    assert parse_labels_file("a.JPEG n1\n# comment\n\nb n2\n") == {"a": "n1", "b": "n2"}
    assert parse_labels_file("ImageId,PredictionString\nx,n3 1 2 3 4 n3 5 6 7 8\n") == {"x": "n3"}
    with pytest.raises(ValueError, match="line 1: expected '<image> <class>'.*synset"):
        parse_labels_file("65\n970\n", where="ground_truth.txt")
    with pytest.raises(ValueError, match="labelled both"):
        parse_labels_file("a n1\na n2\n")


@pytest.mark.timeout(180)
def test_prepare_from_and_to_s3(ray_session, s3_server, tmp_path):
    """Source and shards both in the S3-compatible store; pyarrow reads, boto3 PUTs."""
    opts = s3_server.options
    bucket = s3_server.new_bucket()
    files = make_image_files(per_class=3)
    for rel, data in files.items():
        storage.write_bytes(f"s3://{bucket}/raw/train/{rel}", data, opts)
    out = f"s3://{bucket}/shards/imagenet"
    prepare_imagenet(out, src=f"s3://{bucket}/raw/train", config=CONFIG, s3=opts,
                     log=lambda m: None)
    m = check_prepared(out, files, s3=opts)
    keys = sorted(o["Key"] for o in storage.s3_client(opts).list_objects_v2(
        Bucket=bucket, Prefix="shards/")["Contents"])
    assert keys == sorted([f"shards/imagenet/train/{n}" for n in ("classes.json", "manifest.json")]
                          + [f"shards/imagenet/train/{s['file']}" for s in m["shards"]])
    # The same tree from a local folder gives byte-identical shards: the writer is deterministic
    # whatever the storage.
    local = str(tmp_path / "local")
    prepare_imagenet(local, src=write_tree(tmp_path / "train", files), config=CONFIG,
                     log=lambda m: None)
    assert load_split(local).manifest["shards"] == m["shards"]


def _run_job(args: list[str], env: dict[str, str] | None = None,
             timeout: float = 150) -> subprocess.CompletedProcess:
    """Run a job like a user; the result also has the job's ``pid``."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | (env or {})
    with subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            raise
    done = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    done.pid = p.pid
    return done


def _finished_shards(split: Path) -> list[str]:
    """Shards committed so far (a shard appears by an atomic rename, so a name is a whole
    shard; temporaries are hidden)."""
    return sorted(n for n in os.listdir(split) if re.fullmatch(r"shard-\d+\.parquet", n)) \
        if split.is_dir() else []


def _kill_once_shards_appear(proc: subprocess.Popen, split: Path, at_least: int,
                             timeout: float) -> list[str]:
    """SIGKILL the job's process group as soon as ``at_least`` shards are committed; return the
    shards seen then. Fails if the job ends (or stalls) first."""
    deadline = time.monotonic() + timeout
    while len(seen := _finished_shards(split)) < at_least:
        assert proc.poll() is None, f"the job ended (status {proc.returncode}) before writing " \
                                    f"{at_least} shards"
        assert time.monotonic() < deadline, f"no {at_least} shards after {timeout} s: {seen}"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return seen


# Enough one-image shards, written one at a time, that the job is still writing when the test
# (polling every 10 ms) kills it, even on a loaded 2-core machine: a shard takes milliseconds.
KILL_PER_CLASS = 50


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_killed_job_restarts_to_identical_output(ray_session, tmp_path):
    files = make_image_files(per_class=KILL_PER_CLASS)
    src = write_tree(tmp_path / "train", files)
    address = ray_session.get_runtime_context().gcs_address
    # The reference: one uninterrupted run.
    one_per_shard = ShardWriterConfig(images_per_shard=1, num_cpus_per_task=0.5)
    whole = prepare_imagenet(str(tmp_path / "whole"), src=src, config=one_per_shard,
                             log=lambda m: None)["train"]
    n_shards = len(whole["shards"])

    out = str(tmp_path / "resumed")
    split = Path(out) / "train"
    job = ["jobs/prepare_imagenet.py", "--src", src, "--out", out, "--images-per-shard", "1",
           "--num-cpus-per-task", "0.5", "--address", address]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(tmp_path / "killed.log", "wb") as log:
        # One shard at a time, so that the kill lands mid-run. Its own process group (session),
        # so that the kill takes the job and anything it started.
        proc = subprocess.Popen([sys.executable, *job, "--max-in-flight", "1"], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            seen = _kill_once_shards_appear(proc, split, at_least=2, timeout=150)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    # Killed mid-run: no manifest (the split is unfinished), not every shard.
    assert not (split / "manifest.json").exists()
    left = _finished_shards(split)
    assert 2 <= len(seen) <= len(left) < n_shards, (len(seen), len(left), n_shards)
    # A write cut off mid-way leaves a hidden temporary (never a half shard).
    (split / f".{shard_name(n_shards - 1)}.tmp-0123456789abcdef").write_bytes(b"PAR1 half")

    # The rerun may write in parallel: the output does not depend on the order of the writes.
    finished = _run_job(job)
    assert finished.returncode == 0, finished.stderr[-3000:]
    kept = re.search(r"(\d+) of (\d+) shards are already written", finished.stderr)
    assert kept, finished.stderr[-3000:]
    assert len(left) <= int(kept[1]) < n_shards == int(kept[2])
    assert "removed the unfinished write" in finished.stderr
    # Same shards, same manifest, byte for byte.
    assert tree_bytes(out) == tree_bytes(str(tmp_path / "whole"))
    assert load_split(out).manifest == whole


@pytest.mark.timeout(180)
def test_resume_refuses_a_foreign_shard(ray_session, tmp_path):
    files = make_image_files(per_class=4)
    src = write_tree(tmp_path / "train", files)
    out = tmp_path / "out"
    prepare_imagenet(str(out), src=src, config=CONFIG, log=lambda m: None)
    split = out / "train"
    (split / "manifest.json").unlink()
    (split / shard_name(0)).write_bytes((split / shard_name(1)).read_bytes())
    with pytest.raises(ShardMismatchError, match="holds other images"):
        prepare_imagenet(str(out), src=src, config=CONFIG, log=lambda m: None)


@pytest.mark.timeout(180)
def test_prepare_digits_job(ray_session, tmp_path):
    out = str(tmp_path / "digits")
    address = ray_session.get_runtime_context().gcs_address
    done = _run_job(["jobs/prepare_digits.py", "--out", out, "--address", address], {})
    assert done.returncode == 0, done.stderr[-3000:]
    train, val = load_split(out, "train"), load_split(out, "val")
    assert train.classes == val.classes == DIGITS_CLASSES
    assert train.num_images + val.num_images == 1797
    assert val.num_images == 176  # every tenth image of each class
    assert all(n > 0 for n in val.manifest["class_counts"].values())
    rows = [r for u in train.shard_uris for r in pq.read_table(u).to_pylist()]
    sources = {r["source"] for r in rows}
    assert len(sources) == train.num_images
    assert not sources & {r["source"] for u in val.shard_uris for r in pq.read_table(u).to_pylist()}
    img = Image.open(io.BytesIO(rows[0]["image"]))
    assert (img.format, img.mode, img.size) == ("PNG", "L", (32, 32))
    assert rows[0]["label"] == int(rows[0]["source"].split("/")[0])


# ----------------------------------------------------------------------------- bad input


def _assert_one_error_line(proc: subprocess.CompletedProcess, *expected: str) -> str:
    """Exit status 2, no traceback, and a last stderr line ``error: ...`` that holds every
    string of ``expected`` (what is wrong, and where)."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    # No traceback, not even one folded into the message (a Ray task's error carries the
    # remote frames: 'ray::task() (pid=...) File "...", line ...').
    for trace in ("Traceback", 'File "', "ray::"):
        assert trace not in proc.stderr and trace not in proc.stdout, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-3000:]
    for text in expected:
        assert text in errors[0], (text, errors[0])
    return errors[0]


def _assert_checked_before_ray(proc: subprocess.CompletedProcess, *expected: str) -> None:
    """A pre-Ray check: the one error line is all the job wrote, and it started no Ray. (With no
    address a job starts a local Ray, which makes its session folder ``session_<time>_<pid of
    the job>`` in Ray's temp folder, whatever its log settings; and, at Ray's default log
    level, prints "Started a local Ray instance".)"""
    from ray._common.utils import get_default_ray_temp_dir

    _assert_one_error_line(proc, *expected)
    assert proc.stderr.count("\n") == 1 and not proc.stdout, proc.stderr[-3000:]
    assert "Ray instance" not in proc.stderr
    sessions = list(Path(get_default_ray_temp_dir()).glob(f"session_*_{proc.pid}"))
    assert not sessions, f"the job started Ray before it refused its input: {sessions}"


def _bad_input_files(tmp: Path) -> dict[str, str]:
    """Named paths of the bad-input cases."""
    (tmp / "tree" / "n1").mkdir(parents=True)
    (tmp / "tree" / "n1" / "a.JPEG").write_bytes(_encode(Image.fromarray(_photo(20, 20, 1)),
                                                         "JPEG"))
    with tarfile.open(tmp / "train.tar.gz", "w:gz") as t:
        info = tarfile.TarInfo("n1/x.JPEG")
        info.size = 1
        t.addfile(info, io.BytesIO(b"x"))
    (tmp / "train.tar").write_bytes(b"this is not a tar file at all\n" * 40)
    (tmp / "a_file").write_bytes(b"x")
    (tmp / "ground_truth.txt").write_text("65\n970\n")
    return {k: str(tmp / v) for k, v in {
        "tree": "tree", "gz": "train.tar.gz", "notar": "train.tar", "file": "a_file",
        "labels": "ground_truth.txt", "missing": "missing", "out": "out"}.items()}


PREPARE_BAD_INPUT = {  # case -> (arguments of prepare_imagenet.py, what the error line says)
    "missing src": (["--src", "{missing}", "--out", "{out}"],
                    ["--src {missing}", "does not exist"]),
    "compressed tar": (["--src", "{gz}", "--out", "{out}"], ["{gz}", "gzip-compressed tar"]),
    "not a tar": (["--src", "{notar}", "--out", "{out}"], ["{notar}", "not a readable tar"]),
    "missing val": (["--src", "{tree}", "--val", "{missing}", "--out", "{out}"],
                    ["--val {missing}", "does not exist"]),
    "missing labels": (["--src", "{tree}", "--val", "{tree}", "--val-labels", "{missing}",
                        "--out", "{out}"], ["labels file {missing}", "does not exist"]),
    "bad labels": (["--src", "{tree}", "--val", "{tree}", "--val-labels", "{labels}", "--out",
                    "{out}"], ["{labels} line 1: expected '<image> <class>'"]),
    "labels without val": (["--src", "{tree}", "--val-labels", "{labels}", "--out", "{out}"],
                           ["--val-labels needs --val"]),
    "nothing to do": (["--out", "{out}"], ["nothing to prepare"]),
    "images per shard": (["--src", "{tree}", "--out", "{out}", "--images-per-shard", "0"],
                         ["images_per_shard: must be positive, got 0"]),
    "out is a file": (["--src", "{tree}", "--out", "{file}"], ["--out {file}", "is a file"]),
    "out under a file": (["--src", "{tree}", "--out", "{file}/x"], ["{file}", "is a file"]),
    "val before train": (["--val", "{tree}", "--out", "{out}"], ["classes.json does not exist"]),
}


@pytest.mark.parametrize("case", sorted(PREPARE_BAD_INPUT))
def test_prepare_imagenet_refuses_bad_input_before_ray(case, tmp_path):
    paths = _bad_input_files(tmp_path)
    args, expected = PREPARE_BAD_INPUT[case]
    proc = _run_job(["jobs/prepare_imagenet.py", *(a.format(**paths) for a in args)], timeout=60)
    _assert_checked_before_ray(proc, *(e.format(**paths) for e in expected))
    assert not os.path.exists(paths["out"])


@pytest.mark.timeout(120)
def test_prepare_imagenet_refuses_bad_s3_input_before_ray(s3_server, tmp_path):
    bucket = s3_server.new_bucket()
    storage.write_bytes(f"s3://{bucket}/train/n1/a.JPEG", b"x", s3_server.options)
    env = s3_server.env
    proc = _run_job(["jobs/prepare_imagenet.py", "--src", f"s3://{bucket}/nothing", "--out",
                     str(tmp_path / "out")], env, timeout=60)
    _assert_checked_before_ray(proc, f"--src s3://{bucket}/nothing", "does not exist")
    proc = _run_job(["jobs/prepare_imagenet.py", "--src", f"s3://{bucket}/train", "--out",
                     "s3://adm-no-such-bucket/shards"], env, timeout=60)
    _assert_checked_before_ray(proc, "--out s3://adm-no-such-bucket/shards",
                               "bucket adm-no-such-bucket does not exist")


@pytest.mark.timeout(180)
def test_prepare_imagenet_reports_bad_input_found_while_running(ray_session, tmp_path):
    """Found after Ray started (by the scan or the writer): still one error line, status 2."""
    address = ray_session.get_runtime_context().gcs_address
    no_images = write_tree(tmp_path / "no_images", {"n1/notes.txt": b"x", "n2/a.csv": b"y"})
    proc = _run_job(["jobs/prepare_imagenet.py", "--src", no_images, "--out",
                     str(tmp_path / "out"), "--address", address])
    _assert_one_error_line(proc, "no usable images for train", "not an image file name")
    all_bad = write_tree(tmp_path / "all_bad", {k: v for k, v in make_image_files().items()
                                                if k in BAD})
    proc = _run_job(["jobs/prepare_imagenet.py", "--src", all_bad, "--out",
                     str(tmp_path / "out"), "--address", address])
    _assert_one_error_line(proc, "no usable images for train: all 3 files were skipped")
    # An --out that holds a split finished from other files.
    good = write_tree(tmp_path / "good", good_files(make_image_files(per_class=1)))
    prepare_imagenet(str(tmp_path / "done"), src=good, config=CONFIG, log=lambda m: None)
    other = write_tree(tmp_path / "other", good_files(make_image_files(per_class=2)))
    proc = _run_job(["jobs/prepare_imagenet.py", "--src", other, "--out", str(tmp_path / "done"),
                     "--images-per-shard", "5", "--address", address])
    _assert_one_error_line(proc, "already holds a finished split", "use an empty --out")
    # A shard of another dataset where this run would write one (raised in a Ray task).
    split = tmp_path / "done" / "train"
    (split / "manifest.json").unlink()
    (split / shard_name(0)).write_bytes((split / shard_name(1)).read_bytes())
    proc = _run_job(["jobs/prepare_imagenet.py", "--src", good, "--out", str(tmp_path / "done"),
                     "--images-per-shard", "5", "--address", address])
    _assert_one_error_line(proc, shard_name(0), "holds other images")


@pytest.mark.parametrize("args, expected", [
    (["--image-size", "4"], "image size must be at least 8"),
    (["--images-per-shard", "0"], "images_per_shard: must be positive, got 0"),
    (["--out", "{file}"], "is a file, not a folder"),
])
def test_prepare_digits_refuses_bad_input_before_ray(args, expected, tmp_path):
    (tmp_path / "a_file").write_bytes(b"x")
    args = [a.format(file=tmp_path / "a_file") for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "out")]
    proc = _run_job(["jobs/prepare_digits.py", *out, *args], timeout=60)
    _assert_checked_before_ray(proc, expected)


def test_export_checkpoint_refuses_bad_input(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "a_file").write_bytes(b"x")
    cases = {  # arguments -> what the error line says
        (str(tmp_path / "none"), str(tmp_path / "out")): [str(tmp_path / "none"),
                                                          "no folder there"],
        (str(tmp_path / "run"), str(tmp_path / "out")): [str(tmp_path / "run"),
                                                         "holds no training checkpoint"],
        (str(tmp_path / "run"), str(tmp_path / "a_file")): ["OUT_DIR", "is a file"],
    }
    for args, expected in cases.items():
        proc = _run_job(["jobs/export_checkpoint.py", *args], timeout=90)
        _assert_one_error_line(proc, *expected)
        assert not proc.stdout and proc.stderr.count("\n") == 1
