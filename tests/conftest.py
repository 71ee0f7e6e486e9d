"""Shared fixtures: one real local S3 server (SeaweedFS) per test session, buckets, clients, env.

Tests that use these fixtures are marked `s3`; they fail loudly when the server cannot start.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from s3xfer.errors import LocalS3Error
from s3xfer.locals3 import LocalS3, LocalS3Info, sync_client

# No per-example deadline: it is a timed assertion, and a loaded machine (CI, a laptop running
# a build) made property tests fail on code they did not exercise any slower.
settings.register_profile("s3xfer", deadline=None)
settings.load_profile("s3xfer")

S3_FIXTURES = frozenset({"local_s3", "bucket", "s3_env", "sync_s3_client"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if S3_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.s3)


def make_sync_client(info: LocalS3Info) -> Any:
    """A plain botocore S3 client for the given server, independent of the code under test."""
    return sync_client(info, max_attempts=2)


def unique_bucket_name(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Upload journals of each test in its own directory, never the developer's."""
    path = tmp_path / "s3xfer-state"
    monkeypatch.setenv("S3XFER_STATE_DIR", str(path))
    return path


@pytest.fixture(scope="session")
def local_s3() -> Iterator[LocalS3Info]:
    """The session's local S3 server. Never skipped: a server that cannot start is a failure."""
    server = LocalS3()
    try:
        info = server.start()
    except LocalS3Error as exc:
        pytest.fail(f"the local S3 server could not start: {exc}", pytrace=False)
    try:
        yield info
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_client_factory() -> Callable[[LocalS3Info], Any]:
    """Makes botocore clients for any server info (a second server, wrong credentials...)."""
    return make_sync_client


@pytest.fixture(scope="session")
def sync_s3_client(local_s3: LocalS3Info) -> Any:
    """A botocore client on the local server, for tests to set up and read back objects."""
    return make_sync_client(local_s3)


@pytest.fixture
def bucket(sync_s3_client: Any) -> str:
    """A fresh, empty bucket with a unique name."""
    name = unique_bucket_name()
    sync_s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_env(local_s3: LocalS3Info, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> LocalS3Info:
    """Point AWS env vars at the local server; the developer's ~/.aws and profile stay out."""
    # Any AWS_* setting of the developer's (profile, token, AWS_ENDPOINT_URL_S3...) could leak in.
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in local_s3.env().items():
        monkeypatch.setenv(name, value)
    missing = tmp_path / "no-aws-config"
    monkeypatch.setenv("AWS_CONFIG_FILE", str(missing / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(missing / "credentials"))
    return local_s3
