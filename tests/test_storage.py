"""adm.storage on a local folder and on a real S3 API (moto server on 127.0.0.1)."""
from __future__ import annotations

import json
import os

import pyarrow.fs as pafs
import pytest

from adm import storage
from adm.storage import S3Options


def test_s3_options_from_env_and_config():
    env = {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_ACCESS_KEY_ID": "AK",
        "AWS_SECRET_ACCESS_KEY": "SK",
    }
    opts = S3Options.from_env(env)
    # credentials stay in the environment (the SDKs' default chains read them where used):
    # options and filesystems sent to Ray tasks carry no secret
    assert opts == S3Options("http://127.0.0.1:9000", "eu-west-1", None, None, None)
    kwargs = opts.pyarrow_kwargs()
    assert kwargs["endpoint_override"] == "127.0.0.1:9000" and kwargs["scheme"] == "http"
    assert kwargs["region"] == "eu-west-1" and "access_key" not in kwargs
    # not the AWS SDK's 3 s request timeout, which a busy store exceeds on large objects
    assert kwargs["request_timeout"] == 60.0 and kwargs["connect_timeout"] == 10.0
    assert "SK" not in repr(opts) and b"SK" not in __import__("pickle").dumps(
        storage.resolve_filesystem("s3://b/k", opts)[0])
    explicit = S3Options.from_env(env, access_key="AK", secret_key="SK").pyarrow_kwargs()
    assert (explicit["access_key"], explicit["secret_key"]) == ("AK", "SK")
    # AWS_ENDPOINT_URL_S3 wins over the generic one; AWS_REGION over AWS_DEFAULT_REGION.
    env2 = env | {"AWS_ENDPOINT_URL_S3": "https://minio.local", "AWS_REGION": "us-west-2"}
    assert S3Options.from_env(env2).endpoint_url == "https://minio.local"
    assert S3Options.from_env(env2).region == "us-west-2"
    # An explicit override (a command-line flag) beats the environment.
    assert S3Options.from_env(env, endpoint_url="http://other:1").endpoint_url == "http://other:1"
    # A custom endpoint without a region gets us-east-1 (pyarrow would otherwise ask AWS).
    assert S3Options("http://h:1").pyarrow_kwargs()["region"] == "us-east-1"
    with pytest.raises(TypeError, match="endpont_url"):
        S3Options.from_env(env, endpont_url="http://x:1")
    with pytest.raises(ValueError, match="not a URL"):
        S3Options("127.0.0.1:9000").pyarrow_kwargs()


def test_uri_helpers():
    assert storage.join("s3://b/p", "train", "x.parquet") == "s3://b/p/train/x.parquet"
    assert storage.join("/data", "train") == os.path.join("/data", "train")
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/s3/b")
    assert storage.basename("s3://b/p/x.json") == "x.json"
    fs, path = storage.resolve_filesystem("file:///data/x")
    assert isinstance(fs, pafs.LocalFileSystem) and path == "/data/x"
    with pytest.raises(ValueError, match="unsupported URI scheme 'gs'"):
        storage.resolve_filesystem("gs://bucket/key")
    with pytest.raises(ValueError, match="no bucket"):
        storage.resolve_filesystem("s3://")


def test_local_roundtrip_and_listing(tmp_path):
    root = str(tmp_path / "root")
    storage.write_bytes(storage.join(root, "a", "x.bin"), b"hello")
    storage.write_json(storage.join(root, "b.json"), {"z": 1, "a": [1, 2]})
    assert storage.read_bytes(storage.join(root, "a", "x.bin")) == b"hello"
    assert storage.read_json(storage.join(root, "b.json")) == {"z": 1, "a": [1, 2]}
    # Canonical JSON: sorted keys, so the same object always gives the same bytes.
    assert storage.read_bytes(storage.join(root, "b.json")) == storage.json_bytes({"a": [1, 2], "z": 1})
    assert storage.listdir(root) == ["a", "b.json"]
    assert [(e.relpath, e.size) for e in storage.list_files(root)] == [("a/x.bin", 5),
                                                                       ("b.json", len(storage.json_bytes({"a": [1, 2], "z": 1})))]
    assert storage.exists(root) and storage.is_dir(root) and storage.is_file(storage.join(root, "b.json"))
    storage.delete(storage.join(root, "a", "x.bin"))
    assert not storage.exists(storage.join(root, "a", "x.bin"))
    with pytest.raises(FileNotFoundError, match="no file at"):
        storage.read_bytes(storage.join(root, "missing"))
    with pytest.raises(FileNotFoundError, match="no folder at"):
        storage.listdir(storage.join(root, "missing"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        storage.read_json(str(tmp_path / "bad.json"))


def test_local_write_is_atomic(tmp_path, monkeypatch):
    """A write that dies before the rename leaves the old content and no temporary file."""
    target = str(tmp_path / "m.json")
    storage.write_bytes(target, b"old")

    def crash(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        storage.write_bytes(target, b"new content")
    monkeypatch.undo()
    assert open(target, "rb").read() == b"old"
    assert os.listdir(tmp_path) == ["m.json"]
    storage.write_bytes(target, b"new")
    assert open(target, "rb").read() == b"new"
    assert os.listdir(tmp_path) == ["m.json"]


def test_why_not_writable_local(tmp_path):
    (tmp_path / "a_file").write_bytes(b"x")
    assert storage.why_not_writable(str(tmp_path / "new" / "deeper")) is None
    assert storage.why_not_writable(str(tmp_path)) is None
    assert "is a file, not a folder" in storage.why_not_writable(str(tmp_path / "a_file"))
    assert "is a file, so no folder" in storage.why_not_writable(str(tmp_path / "a_file" / "x"))


@pytest.mark.timeout(120)
def test_s3_roundtrip_pyarrow_and_boto3(s3_server):
    opts = s3_server.options
    bucket = s3_server.new_bucket()
    base = f"s3://{bucket}/prefix"
    fs, path = storage.resolve_filesystem(base, opts)
    assert isinstance(fs, pafs.S3FileSystem) and path == f"{bucket}/prefix"

    storage.write_bytes(storage.join(base, "d", "x.bin"), b"\x00" * 1000 + b"end", opts)
    storage.write_json(storage.join(base, "m.json"), {"k": [1, 2]}, opts)
    # Visible through pyarrow (reads) and boto3 (what wrote it), over HTTP to 127.0.0.1.
    assert storage.read_bytes(storage.join(base, "d", "x.bin"), opts).endswith(b"end")
    assert storage.read_json(storage.join(base, "m.json"), opts) == {"k": [1, 2]}
    obj = storage.s3_client(opts).get_object(Bucket=bucket, Key="prefix/m.json")
    assert json.loads(obj["Body"].read()) == {"k": [1, 2]}
    assert [(e.relpath, e.size) for e in storage.list_files(base, opts)] == [
        ("d/x.bin", 1003), ("m.json", len(storage.json_bytes({"k": [1, 2]})))]
    assert storage.listdir(base, opts) == ["d", "m.json"]
    assert storage.exists(base, opts) and storage.is_dir(base, opts)
    assert storage.is_file(storage.join(base, "m.json"), opts)
    assert not storage.exists(storage.join(base, "nothing"), opts)
    with pytest.raises(FileNotFoundError, match="no file at"):
        storage.read_bytes(storage.join(base, "nothing"), opts)
    storage.delete(storage.join(base, "m.json"), opts)
    assert not storage.exists(storage.join(base, "m.json"), opts)
    with pytest.raises(ValueError, match="needs a bucket and a key"):
        storage.write_bytes(f"s3://{bucket}", b"x", opts)
    assert storage.why_not_writable(f"s3://{bucket}/new/prefix", opts) is None
    assert storage.why_not_writable("s3://no-such-bucket-adm/x", opts) == (
        "bucket no-such-bucket-adm does not exist")


@pytest.mark.timeout(120)
def test_s3_settings_from_the_environment(s3_server, monkeypatch):
    """With only the standard AWS variables set (as a job on a cluster has them), the default
    options reach the S3-compatible endpoint."""
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    bucket = s3_server.new_bucket()
    storage.write_bytes(f"s3://{bucket}/k", b"via env")
    assert storage.read_bytes(f"s3://{bucket}/k") == b"via env"


def test_open_output_local_is_atomic(tmp_path):
    """A stream appears whole at the end of the block; one that raises leaves nothing."""
    target = str(tmp_path / "big.bin")
    with storage.open_output(target) as f:
        f.write(b"a" * 1000)
        assert os.listdir(tmp_path) != ["big.bin"]  # not visible while being written
        f.write(b"b")
    assert open(target, "rb").read() == b"a" * 1000 + b"b"
    with pytest.raises(RuntimeError, match="killed"):
        with storage.open_output(target) as f:
            f.write(b"new")
            raise RuntimeError("killed mid-write")
    assert open(target, "rb").read() == b"a" * 1000 + b"b"
    assert os.listdir(tmp_path) == ["big.bin"]


@pytest.mark.timeout(120)
def test_open_output_s3_is_a_multipart_upload(s3_server):
    """Above one part the object is sent in parts (5 MiB, S3's smallest), complete at the end;
    a stream that raises is aborted: no object and no pending upload are left."""
    opts, bucket = s3_server.options, s3_server.new_bucket()
    client = storage.s3_client(opts)
    part = 5 * 1024**2
    data = os.urandom(2 * part + 123)
    uri = f"s3://{bucket}/out/big.bin"
    with storage.open_output(uri, opts, part_bytes=part) as f:
        for s in range(0, len(data), 1_000_000):
            f.write(data[s:s + 1_000_000])
        assert not storage.exists(uri, opts)  # nothing visible before the upload completes
        assert len(client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])) == 1
    assert storage.read_bytes(uri, opts) == data
    head = client.head_object(Bucket=bucket, Key="out/big.bin", PartNumber=1)
    assert head["PartsCount"] == 3 and head["ContentLength"] == part
    with pytest.raises(RuntimeError, match="killed"):
        with storage.open_output(f"s3://{bucket}/out/lost.bin", opts, part_bytes=part) as f:
            f.write(data)
            raise RuntimeError("killed mid-write")
    assert not storage.exists(f"s3://{bucket}/out/lost.bin", opts)
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
