"""Helpers for integration tests: seeded trees, running the real CLI, reading S3 back."""

from __future__ import annotations

import ctypes
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

from s3xfer.locals3 import LocalS3Info
from s3xfer.transport.s3 import Connection


def write_tree(root: Path, files: dict[str, int], *, seed: int = 1) -> dict[str, bytes]:
    """Create files of the given sizes with seeded random bytes; returns their contents."""
    rng = random.Random(seed)
    contents: dict[str, bytes] = {}
    for rel, size in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = rng.randbytes(size)
        path.write_bytes(data)
        contents[rel] = data
    return contents


def connection(info: LocalS3Info) -> Connection:
    return Connection(
        endpoint_url=info.endpoint_url,
        region=info.region,
        access_key=info.access_key,
        secret_key=info.secret_key,
    )


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "s3xfer", *args],
        env={**os.environ, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_object(client: Any, bucket: str, key: str) -> bytes:
    body: bytes = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return body


def list_keys(client: Any, bucket: str, prefix: str = "") -> list[str]:
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(obj["Key"] for obj in page.get("Contents", []))
    return sorted(keys)


def without_file_permission_override() -> None:
    """In the child, before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the
    bounding set, so that root obeys file modes like any user. (Running as another uid is
    not an option: the interpreter may live under a root-only home directory.)"""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop, cap_dac_override, cap_dac_read_search = 24, 1, 2
    for capability in (cap_dac_override, cap_dac_read_search):
        if libc.prctl(pr_capbset_drop, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def comparable_metadata(key: str, data: bytes, bucket: str) -> bytes | None:
    """One of s3xfer's objects (decompressed) as datasets written to different buckets can
    be compared byte for byte: the bucket's name taken out, the catalog root without its
    manifest_sha256 (a hash of the manifest, which names the bucket; the manifests are
    compared themselves), and None for the lease (who wrote last, and when: not content)."""
    if key.endswith("/.s3xfer/lease.json"):
        return None
    if key.endswith("/.s3xfer/catalog.json"):
        root = json.loads(data)
        del root["manifest_sha256"]
        data = json.dumps(root).encode()
    return data.replace(f"s3://{bucket}/".encode(), b"s3://BUCKET/")
