import os
import subprocess
import sys

import pytest

from histodiff_ray.config import load_config
from histodiff_ray.storage import (
    StorageError,
    check_access,
    exists,
    list_files,
    open_location,
    read_bytes,
    write_atomic,
)


def test_local_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    loc = open_location(str(tmp_path / "dir" / "file.bin"), load_config("cpu").storage)
    write_atomic(loc, b"first")
    write_atomic(loc, b"second")
    assert read_bytes(loc) == b"second"
    assert os.listdir(tmp_path / "dir") == ["file.bin"]


def test_file_uri_is_a_local_path(tmp_path):
    loc = open_location(f"file://{tmp_path}/x", load_config("cpu").storage)
    assert not loc.is_s3 and loc.path == f"{tmp_path}/x"


def test_s3_round_trip_small_and_multipart(s3, s3_overrides, bucket):
    cfg = load_config("cpu", s3_overrides)
    root = open_location(f"s3://{bucket}/prefix", cfg.storage)
    check_access(root, "write")
    big = os.urandom(12 * 1024 * 1024)  # above the multipart threshold
    write_atomic(root.join("a/small.json"), b"{}")
    write_atomic(root.join("b/big.bin"), big)
    assert read_bytes(root.join("b/big.bin")) == big
    assert list_files(root) == ["a/small.json", "b/big.bin"]
    assert exists(root.join("a/small.json")) and not exists(root.join("a/missing"))
    with pytest.raises(FileNotFoundError):
        read_bytes(root.join("a/missing"))


def test_endpoint_and_credentials_from_standard_aws_variables(s3, bucket, monkeypatch):
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    loc = open_location(f"s3://{bucket}/env", load_config("cpu").storage)
    write_atomic(loc.join("x"), b"ok")
    assert read_bytes(loc.join("x")) == b"ok"


def test_wrong_credentials_name_the_endpoint_and_fix_without_leaking_the_secret(s3, bucket):
    cfg = load_config(
        "cpu",
        [
            f"storage.endpoint_url={s3.endpoint_url}",
            "storage.access_key_id=" + s3.access_key,
            "storage.secret_access_key=wrong-secret-123",
            "storage.retries=1",
        ],
    )
    with pytest.raises(StorageError) as err:
        check_access(open_location(f"s3://{bucket}/x", cfg.storage), "read")
    message = str(err.value)
    assert s3.endpoint_url in message and "credentials" in message
    assert "AWS_SECRET_ACCESS_KEY" in message and "wrong-secret-123" not in message


def test_unreachable_endpoint_is_one_clear_error():
    cfg = load_config(
        "cpu",
        [
            "storage.endpoint_url=http://127.0.0.1:9",
            "storage.access_key_id=a",
            "storage.secret_access_key=b",
            "storage.retries=1",
            "storage.connect_timeout_s=1",
        ],
    )
    with pytest.raises(StorageError, match="cannot reach S3 endpoint http://127.0.0.1:9"):
        check_access(open_location("s3://bucket/x", cfg.storage), "read")


@pytest.mark.parametrize("secret", ["wrong-secret-456", None])
def test_cli_reports_storage_failures_in_one_line_without_traceback(s3, tmp_path, secret):
    endpoint = s3.endpoint_url if secret else "http://127.0.0.1:9"
    (tmp_path / "in" / "A").mkdir(parents=True)
    cmd = [
        sys.executable,
        "-m",
        "histodiff_ray.cli",
        "ingest",
        "--input",
        str(tmp_path / "in"),
        "--labeled",
        "--output",
        "s3://nobucket/out",
        f"storage.endpoint_url={endpoint}",
        f"storage.access_key_id={s3.access_key}",
        f"storage.secret_access_key={secret or 'x'}",
        "storage.retries=1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("histodiff: error: storage:") and endpoint in lines[0]
    assert "Traceback" not in proc.stderr and (secret is None or secret not in proc.stderr)
