"""Fixtures of the fault tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from s3xfer.bench.netem import start_in_thread
from s3xfer.locals3 import LocalS3Info


@pytest.fixture
def slow_endpoint(local_s3: LocalS3Info) -> Iterator[str]:
    """The local server behind a 3 MB/s-per-connection path: an upload of the tree takes
    seconds, long enough to be killed where a test wants."""
    host, port = local_s3.endpoint_url.removeprefix("http://").split(":")
    url, stop = start_in_thread(host, int(port), bandwidth=3e6)
    try:
        yield url
    finally:
        stop()
