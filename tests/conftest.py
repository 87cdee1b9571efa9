"""Session fixtures: one real S3 server (SeaweedFS on loopback, credentials enforced), one local
Ray cluster, and the real H&E data in ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HISTODIFF_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data; skipped when absent, a failure when HISTODIFF_REQUIRE_DATA=1 (as in CI)."""
    if not (DATA / "crc5" / "train").is_dir():
        message = f"real H&E data not found at {DATA} (set HISTODIFF_SHARED_DATA to its folder)"
        if os.environ.get("HISTODIFF_REQUIRE_DATA") == "1":
            pytest.fail(message + "; HISTODIFF_REQUIRE_DATA=1 makes this a failure")
        pytest.skip(message)
    return DATA


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    from histodiff_ray.s3server import S3Server

    with S3Server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture(scope="session")
def s3_overrides(s3) -> list[str]:
    """Config overrides that point the storage layer at the test S3 server."""
    return [
        f"storage.endpoint_url={s3.endpoint_url}",
        f"storage.access_key_id={s3.access_key}",
        f"storage.secret_access_key={s3.secret_key}",
        "storage.retries=2",
    ]


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


_bucket_counter = iter(range(10_000))


@pytest.fixture
def bucket(s3) -> str:
    """A fresh bucket per test, so tests never see each other's objects."""
    name = f"test-{os.getpid()}-{next(_bucket_counter)}"
    s3.create_bucket(name)
    return name
