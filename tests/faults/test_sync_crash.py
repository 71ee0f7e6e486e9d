"""A re-upload deletes what the tree no longer has only once the new manifest is written, and
never what anything still refers to: killed between the manifest and the deletions, or in
the middle of the upload and then resumed, the dataset stays whole and equal to the tree."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from s3xfer.locals3 import LocalS3Info
from s3xfer.write.journal import journal_path
from tests.faultproxy import FaultPlan, FaultProxy

from ..integration.helpers import run_cli, write_tree
from ..integration.test_sync import keys_under, referenced_keys, tree_of
from .helpers import interrupt_upload, shard_in_flight_after_another_is_done

MiB = 1024 * 1024
OPTIONS = [
    "--part-size", "5MiB", "--multipart-threshold", "8MiB", "--pack-threshold", "1MiB",
    "--shard-size", "5MiB", "--concurrency", "4",
]  # fmt: skip
# DeleteObjects is a POST to ?delete: held by the proxy (never forwarded) until the kill.
HOLD_DELETIONS = FaultPlan(
    stall_request=1.0, stall_seconds=120, methods=frozenset({"POST"}), targets=r"[?&]delete"
)


def upload_json(src: Path, url: str, env: dict[str, str]) -> dict[str, Any]:
    result = run_cli("upload", str(src), url, *OPTIONS, "--json", env=env)
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def assert_restores(url: str, src: Path, out: Path, env: dict[str, str]) -> None:
    result = run_cli("download", url, str(out), "--quiet", env=env)
    assert result.returncode == 0, result.stderr
    assert tree_of(out) == tree_of(src)


def test_killed_between_the_manifest_and_the_deletions_leaves_only_unreferenced_objects(
    tmp_path: Path, local_s3: LocalS3Info, sync_s3_client: Any, bucket: str
) -> None:
    env = {**local_s3.env(), "S3XFER_STATE_DIR": str(tmp_path / "state")}
    src, url = tmp_path / "src", f"s3://{bucket}/c"
    write_tree(
        src, {**{f"small/{n}.txt": 300 + n for n in range(20)}, "loose.bin": 2 * MiB}, seed=8
    )
    upload_json(src, url, env)
    (src / "small/3.txt").unlink()
    (src / "loose.bin").unlink()
    before = keys_under(sync_s3_client, bucket, "c")

    proxy = FaultProxy(local_s3.endpoint_url, HOLD_DELETIONS)
    with proxy.running() as endpoint:
        process = subprocess.Popen(
            [sys.executable, "-m", "s3xfer", "upload", str(src), url, *OPTIONS, "--quiet"],
            env={**os.environ, **env, "AWS_ENDPOINT_URL": endpoint},
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 120
            while not any(entry.fault == "stall_request" for entry in list(proxy.log)):
                if process.poll() is not None or time.monotonic() > deadline:
                    stderr = process.stderr.read().decode() if process.stderr else ""
                    pytest.fail(f"the upload sent no deletion to hold: {stderr}")
                time.sleep(0.01)
            process.kill()  # while its DeleteObjects is held: nothing deleted yet
            process.wait()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            if process.stderr:
                process.stderr.close()

    assert not journal_path(src, url, state_dir=tmp_path / "state").exists(), (
        "the journal is removed before any deletion: it must not vouch for a deleted object"
    )
    assert_restores(url, src, tmp_path / "out", env)
    after = keys_under(sync_s3_client, bucket, "c")
    referenced = referenced_keys(sync_s3_client, bucket, "c")
    assert referenced <= after  # nothing the manifest refers to was deleted
    leftovers = after - referenced
    # Garbage only: the deleted file's object, the old shard and its index.
    assert "c/loose.bin" in leftovers and leftovers <= before and len(leftovers) == 3
    again = upload_json(src, url, env)
    assert (again["write_requests"], again["files_removed"]) == (0, 0)


def test_an_interrupted_sync_resumes_and_deletes_nothing_the_journal_stored(
    tmp_path: Path,
    local_s3: LocalS3Info,
    sync_s3_client: Any,
    bucket: str,
    slow_endpoint: str,
) -> None:
    state = tmp_path / "state"
    env = {**local_s3.env(), "S3XFER_STATE_DIR": str(state)}
    src, url = tmp_path / "src", f"s3://{bucket}/r"
    write_tree(
        src,
        {
            **{f"small/{n // 100:02d}/{n:04d}.txt": 8000 + n for n in range(1500)},
            **{f"medium/{n}.dat": 1536 * 1024 + n for n in range(3)},
        },
        seed=9,
    )
    upload_json(src, url, env)
    # Every shard changes (new mtimes), one shard's worth of files goes, a loose file goes.
    for path in sorted((src / "small").rglob("*.txt")):
        if path.parent.name == "03":
            path.unlink()
        else:
            os.utime(path, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    (src / "medium/0.dat").unlink()
    write_tree(src, {"medium/new.dat": 1300 * 1024}, seed=10)

    events = interrupt_upload(
        ["upload", str(src), url, *OPTIONS, "--quiet"],
        env={**env, "AWS_ENDPOINT_URL": slow_endpoint},
        journal=journal_path(src, url, state_dir=state),
        condition=shard_in_flight_after_another_is_done,
    )
    journaled_shards = {e["s"][0] for e in events if e["e"] == "shard"}
    assert journaled_shards

    report = upload_json(src, url, env)

    assert report["files_from_journal"] > 0
    assert report["files_removed"] == 101
    after = keys_under(sync_s3_client, bucket, "r")
    assert journaled_shards <= after  # stored by the interrupted run, still referred to
    assert after == referenced_keys(sync_s3_client, bucket, "r")  # and nothing else is left
    assert not re.search(r"\.s3xfer-", " ".join(after))
    assert_restores(url, src, tmp_path / "out", env)
