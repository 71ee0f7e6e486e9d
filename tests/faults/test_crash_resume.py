"""An upload killed with SIGKILL at any point resumes: nothing lost, little re-sent.

Each test starts the real CLI through a bandwidth-capped path (s3xfer/bench/netem.py) so that it is
slow enough to be killed at a chosen point, found by watching the journal; then runs the same
upload again at full speed, and checks against an uninterrupted upload of the same tree:
every file present and verified, the same manifest and catalog, no incomplete multipart
upload left, no stray shard, and fewer bytes sent than a fresh upload.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from s3xfer.locals3 import LocalS3Info
from s3xfer.write.journal import journal_path

from ..integration.helpers import comparable_metadata, list_keys, read_object, run_cli, write_tree
from .helpers import (
    Events,
    finished,
    interrupt_upload,
    part_of_a_large_file_sent,
    shard_in_flight_after_another_is_done,
)

MiB = 1024 * 1024
TREE: dict[str, int] = {
    **{f"big/{n}.bin": 16 * MiB + 1000 * n for n in range(2)},
    **{f"medium/{n}.dat": 1536 * 1024 + n for n in range(4)},
    **{f"small/{n // 100:02d}/{n:04d}.txt": 8000 + n for n in range(1500)},
}
OPTIONS = [
    "--part-size", "5MiB", "--multipart-threshold", "8MiB",
    "--shard-size", "5MiB", "--concurrency", "4", "--quiet",
]  # fmt: skip


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("crash") / "src"
    write_tree(root, TREE, seed=7)
    return root


@pytest.fixture(scope="module")
def fresh_upload(
    source: Path,
    local_s3: LocalS3Info,
    sync_s3_client: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[dict[str, bytes], int]:
    """An uninterrupted upload of the same tree to the same prefix: its objects under
    .s3xfer/, and the number of bytes it sent."""
    bucket = f"ref-{os.getpid()}"
    sync_s3_client.create_bucket(Bucket=bucket)
    state = tmp_path_factory.mktemp("state")
    report = resume(source, f"s3://{bucket}/ds", local_s3, state)
    return metadata(sync_s3_client, bucket), int(report["bytes_uploaded"])


def metadata(client: Any, bucket: str) -> dict[str, bytes]:
    """Everything under .s3xfer/ (manifest, catalog, shards and their indexes), decompressed,
    the bucket's name taken out: what must be identical after a resume."""
    out = {}
    for key in list_keys(client, bucket, "ds/.s3xfer/"):
        raw = read_object(client, bucket, key)
        data = comparable_metadata(
            key, gzip.decompress(raw) if key.endswith(".gz") else raw, bucket
        )
        if data is not None:
            out[key] = data
    return out


def kill_when(
    source: Path,
    dest: str,
    endpoint: str,
    local_s3: LocalS3Info,
    state: Path,
    condition: Callable[[Events], bool],
    how: signal.Signals = signal.SIGKILL,
) -> Events:
    """Start the upload, send it `how` as soon as its journal satisfies `condition`."""
    env = {**local_s3.env(), "AWS_ENDPOINT_URL": endpoint, "S3XFER_STATE_DIR": str(state)}
    return interrupt_upload(
        ["upload", str(source), dest, *OPTIONS],
        env=env,
        journal=journal_path(source, dest, state_dir=state),
        condition=condition,
        how=how,
    )


def resume(source: Path, dest: str, local_s3: LocalS3Info, state: Path) -> dict[str, Any]:
    result = run_cli(
        "upload", str(source), dest, *OPTIONS, "--json",
        env={**local_s3.env(), "S3XFER_STATE_DIR": str(state)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def check_complete(
    source: Path,
    bucket: str,
    client: Any,
    local_s3: LocalS3Info,
    reference: dict[str, bytes],
    tmp_path: Path,
    state: Path,
) -> None:
    """Same metadata as an uninterrupted run, every byte back, nothing left over."""
    assert metadata(client, bucket) == reference
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    manifest = json.loads(reference["ds/.s3xfer/manifest.json.gz"])
    # Shards and their indexes are under .s3xfer/, compared above byte for byte: no stray or
    # duplicate shard. The rest are the loose objects, exactly.
    loose = set(list_keys(client, bucket, "ds/")) - set(reference) - {"ds/.s3xfer/lease.json"}
    assert loose == {row[1] for row in manifest["files"] if row[7] == -1}
    out = tmp_path / "restored"
    result = run_cli("download", f"s3://{bucket}/ds", str(out), "--quiet", env=local_s3.env())
    assert result.returncode == 0, result.stderr
    for rel in TREE:
        assert (out / rel).read_bytes() == (source / rel).read_bytes(), rel
    assert not list((state / "journals").glob("*")), "a finished upload removes its journal"


@pytest.mark.parametrize(
    "crash_point",
    [
        "during a multipart upload",
        "during a shard",
        "while writing the journal",
        "SIGTERM during a multipart upload",
    ],
)
def test_an_upload_killed_at_any_point_resumes_without_loss(
    crash_point: str,
    source: Path,
    fresh_upload: tuple[dict[str, bytes], int],
    slow_endpoint: str,
    local_s3: LocalS3Info,
    sync_s3_client: Any,
    bucket: str,
    tmp_path: Path,
) -> None:
    dest = f"s3://{bucket}/ds"
    state = tmp_path / "state"
    condition = {
        "during a multipart upload": part_of_a_large_file_sent,
        "during a shard": shard_in_flight_after_another_is_done,
        "while writing the journal": lambda events: finished(events) >= 2,
        "SIGTERM during a multipart upload": part_of_a_large_file_sent,
    }[crash_point]
    how = signal.SIGTERM if crash_point.startswith("SIGTERM") else signal.SIGKILL
    before = kill_when(source, dest, slow_endpoint, local_s3, state, condition, how)
    journal = journal_path(source, dest, state_dir=state)
    if crash_point == "while writing the journal":
        # What a kill in the middle of writing the last line leaves: that line cut short.
        raw = journal.read_bytes()
        last = raw.rstrip(b"\n").rfind(b"\n") + 1
        journal.write_bytes(raw[: last + (len(raw) - last) // 2])
    if crash_point != "while writing the journal":
        open_uploads = sync_s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads")
        assert open_uploads, "the crash left no upload open: it did not happen mid-upload"

    report = resume(source, dest, local_s3, state)

    assert report["files_failed"] == 0
    reference, fresh_bytes = fresh_upload
    assert report["bytes_uploaded"] < fresh_bytes, "a resume must send less than a fresh upload"
    if crash_point.endswith("during a multipart upload"):
        assert report["uploads_resumed"] >= 1 and report["bytes_reused"] > 0
        sent_before = sum(e["len"] for e in before if e["e"] == "part")
        assert report["bytes_reused"] >= sent_before  # every journaled part was kept
    check_complete(source, bucket, sync_s3_client, local_s3, reference, tmp_path, state)
