"""Object storage: one place that turns a path or URI into filesystems, and writes atomically.

``open_location("s3://bucket/prefix", cfg.storage)`` or a local path / ``file://`` URI gives a
:class:`Location` holding a pyarrow filesystem (what Ray Data and Ray Train take) and the path
inside it. The endpoint and credentials come from the config or from the standard AWS variables
(``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``);
pyarrow's S3 client ignores the endpoint variables by itself, so they are read here. Secrets are
never part of a message or a repr.

Writes are atomic: locally a temporary file is renamed into place; on S3 the complete object is
sent in one request (or one completed multipart upload), so a reader sees either nothing or the
whole object, never a partial shard or manifest.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs

from histodiff_ray.config import StorageConfig
from histodiff_ray.errors import HistodiffError


class StorageError(HistodiffError):
    """Storage that cannot be reached or used; the message names the endpoint and the fix."""


@dataclass(frozen=True)
class S3Settings:
    """What an S3 client needs, resolved from the config and the environment."""

    endpoint_url: str | None
    region: str
    access_key_id: str | None
    secret_access_key: str | None
    retries: int
    connect_timeout_s: float

    def __repr__(self) -> str:  # secrets stay out of logs and tracebacks
        return f"S3Settings(endpoint_url={self.endpoint_url!r}, region={self.region!r}, retries={self.retries})"

    @classmethod
    def resolve(cls, cfg: StorageConfig) -> S3Settings:
        env = os.environ
        return cls(
            endpoint_url=cfg.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
            region=cfg.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            access_key_id=cfg.access_key_id or env.get("AWS_ACCESS_KEY_ID"),
            secret_access_key=cfg.secret_access_key or env.get("AWS_SECRET_ACCESS_KEY"),
            retries=cfg.retries,
            connect_timeout_s=cfg.connect_timeout_s,
        )

    @property
    def endpoint_display(self) -> str:
        return self.endpoint_url or f"AWS S3 ({self.region})"

    def pyarrow(self, retries: int | None = None) -> pafs.S3FileSystem:
        kwargs = dict(
            region=self.region,
            connect_timeout=self.connect_timeout_s,
            request_timeout=max(30.0, self.connect_timeout_s),
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=retries or self.retries),
            allow_bucket_creation=True,
        )
        if self.access_key_id and self.secret_access_key:
            kwargs.update(access_key=self.access_key_id, secret_key=self.secret_access_key)
        if self.endpoint_url:
            url = urlparse(self.endpoint_url)
            kwargs.update(endpoint_override=url.netloc, scheme=url.scheme or "http")
        return pafs.S3FileSystem(**kwargs)

    def fsspec(self):
        import s3fs  # noqa: PLC0415 — here, not at the top: the CLI imports this module for --help too

        client_kwargs = {"region_name": self.region}
        if self.endpoint_url:
            client_kwargs["endpoint_url"] = self.endpoint_url
        return s3fs.S3FileSystem(
            key=self.access_key_id,
            secret=self.secret_access_key,
            client_kwargs=client_kwargs,
            config_kwargs={
                "retries": {"max_attempts": self.retries, "mode": "standard"},
                "connect_timeout": self.connect_timeout_s,
            },
            skip_instance_cache=True,
        )


@dataclass(frozen=True)
class Location:
    """A folder or file: a pyarrow filesystem plus the path inside it (``bucket/key`` on S3)."""

    filesystem: pafs.FileSystem
    path: str
    uri: str
    s3: S3Settings | None = None

    @property
    def is_s3(self) -> bool:
        return self.s3 is not None

    def join(self, *parts: str) -> Location:
        tail = "/".join(p.strip("/") for p in parts if p)
        path = f"{self.path.rstrip('/')}/{tail}" if tail else self.path
        uri = f"{self.uri.rstrip('/')}/{tail}" if tail else self.uri
        return Location(self.filesystem, path, uri, self.s3)

    def fsspec(self):
        """The same place as an fsspec filesystem (for libraries that want one)."""
        if self.s3 is not None:
            return self.s3.fsspec()
        import fsspec  # noqa: PLC0415

        return fsspec.filesystem("file")

    def __str__(self) -> str:
        return self.uri


def open_location(uri: str, storage: StorageConfig) -> Location:
    """Turn a local path, ``file://…`` or ``s3://bucket/prefix`` into a :class:`Location`."""
    if uri.startswith("s3://"):
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise StorageError(f"storage: {uri!r} names no bucket; use s3://BUCKET/PREFIX")
        settings = S3Settings.resolve(storage)
        path = f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")
        return Location(settings.pyarrow(), path, f"s3://{path}", settings)
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"storage: unsupported URI scheme in {uri!r}; use a local path, file:// or s3://")
    local = os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))
    return Location(pafs.LocalFileSystem(), local, local)


def _explain(exc: OSError, loc: Location, action: str) -> StorageError:
    """One actionable line for an S3 failure; never the credentials themselves."""
    text = str(exc)
    endpoint = loc.s3.endpoint_display if loc.s3 else "local disk"
    if any(
        s in text
        for s in ("ACCESS_DENIED", "SIGNATURE_DOES_NOT_MATCH", "INVALID_ACCESS_KEY_ID", "HTTP status 403", "Forbidden")
    ):
        return StorageError(
            f"storage: {endpoint} rejected the credentials while trying to {action} {loc.uri}; "
            "set storage.access_key_id/storage.secret_access_key or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
            "to a key with access to that bucket"
        )
    if any(s in text for s in ("NETWORK_CONNECTION", "curlCode", "onnect", "timed out", "Timeout", "resolve")):
        return StorageError(
            f"storage: cannot reach S3 endpoint {endpoint} to {action} {loc.uri}; check that the server is "
            "up and that storage.endpoint_url (or AWS_ENDPOINT_URL) points at it"
        )
    if "NoSuchBucket" in text or "NO_SUCH_BUCKET" in text:
        return StorageError(f"storage: the bucket of {loc.uri} does not exist at {endpoint}; create it or fix the URI")
    return StorageError(f"storage: could not {action} {loc.uri} at {endpoint}: {text.splitlines()[0]}")


def check_access(loc: Location, action: str = "read") -> None:
    """Fail fast, with one line, when the storage behind ``loc`` is unreachable or refuses us."""
    if not loc.is_s3:
        return
    probe = loc.s3.pyarrow(retries=1)
    try:
        bucket = loc.path.split("/", 1)[0]
        info = probe.get_file_info(bucket)
        if info.type == pafs.FileType.NotFound:
            if action == "read":
                raise StorageError(f"storage: the bucket of {loc.uri} does not exist at {loc.s3.endpoint_display}")
            probe.create_dir(bucket)
        # A listing exercises the credentials even when the bucket is public for HEAD.
        probe.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True, recursive=False))
    except OSError as exc:
        raise _explain(exc, loc, action) from None


def write_atomic(loc: Location, data: bytes) -> None:
    """Write ``data`` to the file ``loc`` so that no reader ever sees part of it."""
    fs = loc.filesystem
    try:
        if loc.is_s3:
            # The whole payload goes in one stream: S3 publishes the object only once it is complete.
            with fs.open_output_stream(loc.path) as out:
                out.write(data)
            return
        parent = os.path.dirname(loc.path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(loc.path)}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, loc.path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    except OSError as exc:
        raise _explain(exc, loc, "write") from None


def read_bytes(loc: Location) -> bytes:
    try:
        with loc.filesystem.open_input_stream(loc.path) as src:
            return src.read()
    except FileNotFoundError:
        raise
    except OSError as exc:
        if loc.is_s3 and ("NotFound" in str(exc) or "NO_SUCH_KEY" in str(exc) or "HTTP status 404" in str(exc)):
            raise FileNotFoundError(loc.uri) from None
        raise _explain(exc, loc, "read") from None


def exists(loc: Location) -> bool:
    try:
        return loc.filesystem.get_file_info(loc.path).type != pafs.FileType.NotFound
    except OSError as exc:
        raise _explain(exc, loc, "read") from None


def list_files(loc: Location) -> list[str]:
    """Every file below ``loc``, as paths relative to it, sorted. Local symlinks are listed (not
    followed) so the caller can decide about them."""
    if not loc.is_s3:
        if not os.path.isdir(loc.path):
            raise StorageError(f"storage: input folder {loc.uri} does not exist or is not a folder")
        found = []
        for root, dirs, files in os.walk(loc.path, followlinks=False):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            # Symlinked folders are reported as entries so that escaping links get quarantined.
            entries = files + [d for d in dirs if os.path.islink(os.path.join(root, d))]
            for name in entries:
                if name.startswith("."):
                    continue
                found.append(os.path.relpath(os.path.join(root, name), loc.path))
        return sorted(found)
    try:
        infos = loc.filesystem.get_file_info(pafs.FileSelector(loc.path, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise _explain(exc, loc, "list") from None
    prefix = loc.path.rstrip("/") + "/"
    return sorted(i.path[len(prefix) :] for i in infos if i.type == pafs.FileType.File)


def upload_dir(local_dir: str, dest: Location) -> None:
    """Copy a local folder to ``dest`` file by file, each write atomic (a model folder, a report)."""
    for root, _, files in os.walk(local_dir):
        for name in sorted(files):
            path = os.path.join(root, name)
            with open(path, "rb") as src:
                write_atomic(dest.join(os.path.relpath(path, local_dir)), src.read())


def download_dir(src: Location, local_dir: str) -> str:
    """Copy the folder ``src`` into ``local_dir`` (returned); local folders are used in place."""
    if not src.is_s3:
        if not os.path.isdir(src.path):
            raise StorageError(f"storage: folder {src.uri} does not exist")
        return src.path
    names = list_files(src)
    if not names:
        raise StorageError(f"storage: folder {src.uri} is empty or does not exist")
    for rel in names:
        path = os.path.join(local_dir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as out:
            out.write(read_bytes(src.join(rel)))
    return local_dir


def read_run_info(run: Location) -> dict:
    """A finished training run's ``run.json`` (what it is, its config, where its parts came from)."""
    try:
        return json.loads(read_bytes(run.join("run.json")))
    except FileNotFoundError:
        raise HistodiffError(
            f"no finished run at {run}: run.json is missing (train it first, or wait for it to finish)"
        ) from None
