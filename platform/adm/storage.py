"""One way to read and write local paths and ``s3://`` URIs.

Everything in ``adm`` that touches datasets, checkpoints or samples goes through this module, so
that a local folder and an S3 (or S3-compatible: MinIO, Ceph, moto) prefix behave the same.

* Reads, listings and streams use pyarrow filesystems (``resolve_filesystem``), which Ray Data
  also accepts (``read_parquet(paths, filesystem=fs)``).
* Whole-object writes (``write_bytes``, and ``open_output`` for streams too large for memory)
  are atomic: a local file is written to a hidden temporary file in the same folder, fsync'ed
  and renamed over the target; an S3 object is written with a single ``PutObject`` through boto3
  (with ``Content-MD5``), or a multipart upload completed only at the end, which S3 makes
  visible all at once or not at all. pyarrow's S3 output stream is not used for this because closing it after an error
  completes the upload with whatever was written so far.

S3 settings come from an explicit ``S3Options`` argument, else the standard AWS environment
variables: ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (an endpoint override for
S3-compatible stores), ``AWS_REGION`` / ``AWS_DEFAULT_REGION``. Credentials are never copied
out of the environment: pyarrow and boto3 read them through their default credential chains
(``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, config files,
instance roles) in whichever process uses them, so options and filesystems that travel to Ray
tasks carry no secret unless one was given explicitly.
"""
from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import io
import json
import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator, Mapping
from urllib.parse import urlparse

import pyarrow.fs as pafs

S3_SCHEME = "s3://"
# A single S3 PUT accepts at most 5 GiB; shards and checkpoints written here are far smaller.
MAX_SINGLE_PUT_BYTES = 5 * 1024**3
# pyarrow's S3 timeouts (seconds): see S3Options.pyarrow_kwargs.
S3_CONNECT_TIMEOUT_S, S3_REQUEST_TIMEOUT_S = 10.0, 60.0
# Parts of a streamed S3 upload (`open_output`): S3 wants >= 5 MiB for all but the last and
# allows 10,000, so 64 MiB parts reach 640 GB while holding one part in memory.
MULTIPART_PART_BYTES = 64 * 1024**2


@dataclass(frozen=True)
class S3Options:
    """How to reach S3 or an S3-compatible store.

    ``endpoint_url`` is a full URL such as ``http://127.0.0.1:9000`` (MinIO) or ``None`` for AWS.
    ``from_env`` fills the endpoint and region from the environment; credentials that stay
    ``None`` (the default) leave the choice to the AWS default credential chain."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    session_token: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "S3Options":
        """The endpoint and region from the standard AWS environment variables, with
        ``overrides`` (any field, credentials included) on top."""
        env = os.environ if environ is None else environ
        values = {
            "endpoint_url": env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            "region": env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            "access_key": None, "secret_key": None, "session_token": None,
        }
        unknown = set(overrides) - set(values)
        if unknown:
            raise TypeError(f"unknown S3 option(s) {sorted(unknown)}; known: {sorted(values)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def effective_region(self) -> str | None:
        """The region to use. pyarrow asks AWS for a bucket's region when none is given; a
        custom endpoint cannot answer that, so S3-compatible stores get the conventional
        default."""
        return self.region or ("us-east-1" if self.endpoint_url else None)

    def pyarrow_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``pyarrow.fs.S3FileSystem``. Its request timeout is raised
        from the AWS SDK's 3 s, which a busy store (or a busy machine) exceeds before the
        first byte of a large object: reads then fail with "Operation too slow"."""
        kwargs: dict[str, Any] = {"connect_timeout": S3_CONNECT_TIMEOUT_S,
                                  "request_timeout": S3_REQUEST_TIMEOUT_S}
        if self.endpoint_url:
            parsed = urlparse(self.endpoint_url)
            if not parsed.scheme or not parsed.netloc:
                raise ValueError(
                    f"S3 endpoint {self.endpoint_url!r} is not a URL like http://host:port"
                )
            kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
            kwargs["scheme"] = parsed.scheme
        if self.effective_region:
            kwargs["region"] = self.effective_region
        return {**kwargs, **self.credentials("access_key", "secret_key", "session_token")}

    def credentials(self, key_id: str, secret: str, token: str) -> dict[str, str]:
        """The explicit credentials under a client's argument names (key id, secret, session
        token), or {} to leave them to the AWS default chain."""
        if not (self.access_key and self.secret_key):
            return {}
        out = {key_id: self.access_key, secret: self.secret_key}
        return {**out, token: self.session_token} if self.session_token else out


# The endpoint and region this process was handed by its driver (`use_s3_settings`).
_handed: dict[str, str] = {}


def use_s3_settings(endpoint_url: str | None = None, region: str | None = None) -> None:
    """Use this endpoint and region (over the environment's) whenever a function here is
    called without ``s3=``: a Ray Train worker takes its driver's. Only these non-secret
    settings travel this way; credentials stay with each node's environment or role."""
    _handed.update({k: v for k, v in (("endpoint_url", endpoint_url), ("region", region)) if v})


def default_s3_options() -> S3Options:
    """The options used when a function here is called without ``s3=``: the environment's,
    with what `use_s3_settings` handed this process on top."""
    return S3Options.from_env(**_handed)


def is_s3(uri: str) -> bool:
    """True for ``s3://bucket/key`` URIs."""
    return str(uri).startswith(S3_SCHEME)


def _check_uri(uri: str) -> str:
    uri = os.fspath(uri)
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"expected a local path or s3:// URI, got {uri!r}")
    scheme = urlparse(uri).scheme
    if scheme and scheme not in ("s3", "file") and len(scheme) > 1:  # len 1: a Windows drive
        raise ValueError(f"unsupported URI scheme {scheme!r} in {uri!r}; use a path or s3://")
    return uri


def absolute(uri: str | None) -> str | None:
    """A local path made absolute (and ~ expanded) where it is given: Ray workers and tasks run
    in other working directories, on other nodes. s3:// URIs and empty values pass unchanged."""
    return uri if not uri or is_s3(uri) else os.path.abspath(os.path.expanduser(uri))


def join(base: str, *parts: str) -> str:
    """Join path components onto a local path or an ``s3://`` URI (always with ``/`` for S3)."""
    base = _check_uri(base)
    if is_s3(base):
        return S3_SCHEME + posixpath.join(base[len(S3_SCHEME):], *parts)
    return os.path.join(base, *parts)


def basename(uri: str) -> str:
    """The last component of a path or URI."""
    return posixpath.basename(str(uri).rstrip("/")) if is_s3(uri) else os.path.basename(uri)


@functools.lru_cache(maxsize=16)
def _s3_filesystem(options: S3Options) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(**options.pyarrow_kwargs())


def resolve_filesystem(uri: str, s3: S3Options | None = None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem that serves ``uri`` and the path to use with it.

    ``s3://bucket/key`` -> (S3FileSystem, ``"bucket/key"``); a local path or ``file://`` URI ->
    (LocalFileSystem, absolute path). The filesystem pickles with its settings, so it can be
    handed to Ray Data (``read_parquet(path, filesystem=fs)``) and to Ray tasks."""
    uri = _check_uri(uri)
    if is_s3(uri):
        path = uri[len(S3_SCHEME):].strip("/")
        if not path or path.startswith("/"):
            raise ValueError(f"S3 URI {uri!r} has no bucket; expected s3://bucket/key")
        return _s3_filesystem(s3 or default_s3_options()), path
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def exists(uri: str, s3: S3Options | None = None) -> bool:
    """True when a file or a folder (for S3: any key under the prefix) exists at ``uri``."""
    fs, path = resolve_filesystem(uri, s3)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(uri: str, s3: S3Options | None = None) -> bool:
    """True when ``uri`` is a file (an object for S3)."""
    fs, path = resolve_filesystem(uri, s3)
    return fs.get_file_info(path).type == pafs.FileType.File


def is_dir(uri: str, s3: S3Options | None = None) -> bool:
    """True when ``uri`` is a folder (for S3: a prefix with keys under it, or a bucket)."""
    fs, path = resolve_filesystem(uri, s3)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def listdir(uri: str, s3: S3Options | None = None) -> list[str]:
    """Sorted names of the entries directly inside the folder ``uri``."""
    fs, path = resolve_filesystem(uri, s3)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"no folder at {uri}")
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)


@dataclass(frozen=True)
class FileEntry:
    """A file found by ``list_files``: its path relative to the listed folder (``/``-separated)
    and its size in bytes."""

    relpath: str
    size: int


def list_files(uri: str, s3: S3Options | None = None) -> list[FileEntry]:
    """Every file under the folder ``uri`` (recursively), sorted by relative path."""
    fs, path = resolve_filesystem(uri, s3)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"no folder at {uri}")
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    out = [
        FileEntry(posixpath.relpath(info.path, path), int(info.size))
        for info in infos
        if info.type == pafs.FileType.File
    ]
    return sorted(out, key=lambda e: e.relpath)


def open_input(uri: str, s3: S3Options | None = None):
    """A random-access, seekable pyarrow file for reading (``read``, ``seek``, ``read_at``)."""
    fs, path = resolve_filesystem(uri, s3)
    return fs.open_input_file(path)


def read_bytes(uri: str, s3: S3Options | None = None) -> bytes:
    """The whole content of the file at ``uri``."""
    fs, path = resolve_filesystem(uri, s3)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no file at {uri}") from e
    except OSError as e:
        if "not found" in str(e).lower() or "does not exist" in str(e).lower():
            raise FileNotFoundError(f"no file at {uri}") from e
        raise


def temp_name_prefix(name: str) -> str:
    """The prefix of the temporary files ``write_bytes`` leaves behind if it is killed while
    writing ``name`` locally (hidden, so dataset readers skip them)."""
    return f".{name}.tmp-"


def write_bytes(uri: str, data: bytes, s3: S3Options | None = None) -> None:
    """Write ``data`` to ``uri`` atomically: readers see the old content or the new, never a
    part. Local: temp file in the same folder, fsync, rename. S3: one PutObject with MD5 (a
    multipart upload above the 5 GiB a PUT takes)."""
    uri = _check_uri(uri)
    if is_s3(uri) and len(data) <= MAX_SINGLE_PUT_BYTES:
        bucket, key = _bucket_key(uri)
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode("ascii")
        s3_client(s3).put_object(Bucket=bucket, Key=key, Body=data, ContentMD5=md5)
        return
    with open_output(uri, s3) as f:
        f.write(data)


def _bucket_key(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len(S3_SCHEME):].partition("/")
    if not bucket or not key:
        raise ValueError(f"S3 URI {uri!r} needs a bucket and a key: s3://bucket/key")
    return bucket, key


class _MultipartUpload(io.RawIOBase):
    """A write-only stream into one S3 object: buffered into parts of `part_bytes`, each sent
    with UploadPart; the object appears only when `complete` is called, and `abort` drops
    every part (S3 keeps nothing)."""

    def __init__(self, client, bucket: str, key: str, part_bytes: int):
        self.client, self.bucket, self.key, self.part_bytes = client, bucket, key, part_bytes
        self.upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        self.buffer, self.parts = bytearray(), []

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.buffer += data
        while len(self.buffer) >= self.part_bytes:
            self._send(bytes(self.buffer[:self.part_bytes]))
            del self.buffer[:self.part_bytes]
        return len(data)

    def _send(self, part: bytes) -> None:
        number = len(self.parts) + 1
        md5 = base64.b64encode(hashlib.md5(part).digest()).decode("ascii")
        etag = self.client.upload_part(Bucket=self.bucket, Key=self.key, PartNumber=number,
                                       UploadId=self.upload_id, Body=part,
                                       ContentMD5=md5)["ETag"]
        self.parts.append({"PartNumber": number, "ETag": etag})

    def complete(self) -> None:
        if self.buffer or not self.parts:  # the last part may be short (or the only, empty)
            self._send(bytes(self.buffer))
            self.buffer.clear()
        self.client.complete_multipart_upload(Bucket=self.bucket, Key=self.key,
                                              UploadId=self.upload_id,
                                              MultipartUpload={"Parts": self.parts})

    def abort(self) -> None:
        self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.key,
                                           UploadId=self.upload_id)


@contextlib.contextmanager
def open_output(uri: str, s3: S3Options | None = None,
                part_bytes: int = MULTIPART_PART_BYTES) -> Iterator[BinaryIO]:
    """A writable binary stream to ``uri`` for files too large to hold in memory, with
    ``write_bytes``' atomicity: the file appears whole when the ``with`` block ends, and not at
    all if it raises. Local: a hidden temporary file in the same folder (seekable), fsync'ed
    and renamed. S3: a multipart upload (not seekable) of ``part_bytes`` parts, completed at
    the end or aborted."""
    uri = _check_uri(uri)
    if is_s3(uri):
        bucket, key = _bucket_key(uri)
        upload = _MultipartUpload(s3_client(s3), bucket, key, part_bytes)
        try:
            yield upload
            upload.complete()
        except BaseException:
            upload.abort()
            raise
        return
    _, path = resolve_filesystem(uri)
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, temp_name_prefix(name) + uuid.uuid4().hex)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: str) -> None:
    """Make a rename in `folder` durable (a crash right after must not lose the new name)."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_json(uri: str, s3: S3Options | None = None) -> Any:
    """Parse the JSON file at ``uri``; a clear error names the file when it is not JSON."""
    raw = read_bytes(uri, s3)
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{uri} is not valid JSON: {e}") from e


def json_bytes(obj: Any) -> bytes:
    """The canonical JSON encoding used for every file written here (sorted keys, 1-space
    indent, trailing newline): the same object always gives the same bytes."""
    return (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def write_json(uri: str, obj: Any, s3: S3Options | None = None) -> None:
    """Atomically write ``obj`` as canonical JSON (see ``json_bytes``)."""
    write_bytes(uri, json_bytes(obj), s3)


def delete(uri: str, s3: S3Options | None = None, missing_ok: bool = True) -> None:
    """Delete the file at ``uri``."""
    fs, path = resolve_filesystem(uri, s3)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        if not missing_ok:
            raise
    except OSError as e:
        if not (missing_ok and "not found" in str(e).lower()):
            raise


def why_not_writable(uri: str, s3: S3Options | None = None) -> str | None:
    """Why a folder cannot be created or written at ``uri``, or None when nothing cheap says so.

    Local: ``uri`` (or its nearest existing parent) must be a folder this user may write in.
    S3: the bucket must exist (whether this key may PUT is only known by writing)."""
    uri = _check_uri(uri)
    if is_s3(uri):
        fs, path = resolve_filesystem(uri, s3)
        bucket = path.split("/", 1)[0]
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            return f"bucket {bucket} does not exist"
        return None
    _, path = resolve_filesystem(uri)
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{uri} is a file, not a folder"
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file, so no folder can be made under it"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not writable by this user"
    return None


def makedirs(uri: str, s3: S3Options | None = None) -> None:
    """Create the folder ``uri`` and its parents (a no-op for S3, which has no folders)."""
    if is_s3(uri):
        return
    _, path = resolve_filesystem(uri)
    os.makedirs(path, exist_ok=True)


@functools.lru_cache(maxsize=16)
def _boto3_client(options: S3Options):
    import boto3  # only S3 writes and bucket management need boto3

    kwargs: dict[str, Any] = {}
    if options.endpoint_url:
        kwargs["endpoint_url"] = options.endpoint_url
    if options.effective_region:
        kwargs["region_name"] = options.effective_region
    kwargs.update(options.credentials("aws_access_key_id", "aws_secret_access_key",
                                      "aws_session_token"))
    return boto3.session.Session().client("s3", **kwargs)


def s3_client(s3: S3Options | None = None):
    """A boto3 S3 client with the same endpoint, region and credentials as the pyarrow side."""
    return _boto3_client(s3 or default_s3_options())
