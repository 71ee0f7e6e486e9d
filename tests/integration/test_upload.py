"""Uploads against the real local S3 server, read back with plain botocore."""

from __future__ import annotations

import base64
import gzip
import json
import os
import zlib
from pathlib import Path
from typing import Any

import anyio
import pytest

from s3xfer.config import MiB, TransferConfig
from s3xfer.dataset.keys import S3Url, hashed_prefix
from s3xfer.limits import RunLimits
from s3xfer.locals3 import LocalS3Info
from s3xfer.planning.plan import Kind, Plan, make_plan
from s3xfer.planning.survey import survey
from s3xfer.write.upload import UploadReport, upload

from .helpers import connection, list_keys, read_object, run_cli, write_tree

# A small multipart threshold so that multipart uploads stay cheap in tests.
SMALL = TransferConfig(
    max_memory=32 * MiB, part_size=5 * MiB, multipart_threshold=6 * MiB, pack=False
)

MIXED_TREE = {
    "empty": 0,
    "one-byte": 1,
    "a/b/c/d/e/f/g/deep.txt": 1000,
    "unicode/ünïcødé naïve – 名前.txt": 333,
    "long/" + "n" * 120 + ".dat": 4096,
    "just-below-threshold.bin": 6 * MiB - 1,
    "at-threshold.bin": 6 * MiB,  # multipart: 5 MiB + 1 MiB
    "three-parts.bin": 12 * MiB + 17,
    **{f"many/{n:03d}.bin": n * 37 for n in range(60)},
}


def do_upload(
    src: Path,
    url: str,
    info: LocalS3Info,
    config: TransferConfig = SMALL,
    limits: RunLimits | None = None,
) -> tuple[Plan, UploadReport]:
    """`limits`: by default, 8 in flight and the config's memory budget."""
    plan = make_plan(survey(src), S3Url.parse(url), config)
    limits = limits or RunLimits(concurrency=8, max_memory=config.max_memory)

    async def main() -> UploadReport:
        return await upload(plan, connection(info), limits=limits)

    return plan, anyio.run(main)


def s3_crc32(data: bytes) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def manifest(client: Any, bucket: str, prefix: str) -> dict[str, Any]:
    raw = read_object(client, bucket, f"{prefix}/.s3xfer/manifest.json.gz")
    data: dict[str, Any] = json.loads(gzip.decompress(raw))
    return data


def test_mixed_tree_uploads_byte_for_byte_with_verified_checksums(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    contents = write_tree(tmp_path / "src", MIXED_TREE)
    plan, report = do_upload(tmp_path / "src", f"s3://{bucket}/ds", s3_env)

    assert report.ok, report.failures
    assert report.files_uploaded == len(MIXED_TREE)
    assert report.bytes_uploaded == sum(len(c) for c in contents.values())
    assert report.peak_buffered_bytes <= SMALL.max_memory
    kinds = {u.path: u.kind for u in plan.units}
    assert kinds["at-threshold.bin"] is Kind.MULTIPART
    assert kinds["just-below-threshold.bin"] is Kind.PUT

    keys = list_keys(sync_s3_client, bucket, "ds/")
    assert [k for k in keys if "/.s3xfer/" not in k] == sorted(f"ds/{p}" for p in MIXED_TREE)
    meta = {k for k in keys if "/.s3xfer/" in k}
    assert {"ds/.s3xfer/catalog.json", "ds/.s3xfer/manifest.json.gz"} <= meta
    pieces = {k for k in meta if k.startswith("ds/.s3xfer/catalog/")}
    assert 1 < len(pieces) <= len(MIXED_TREE)  # only buckets that hold a file get a piece
    records = {row[0]: row for row in manifest(sync_s3_client, bucket, "ds")["files"]}
    for rel, data in contents.items():
        key = f"ds/{rel}"
        assert read_object(sync_s3_client, bucket, key) == data, rel
        head = sync_s3_client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        # S3 stored (and verified on receipt) the CRC32 of the whole object, multipart or not.
        assert head["ChecksumCRC32"].split("-")[0] == s3_crc32(data), rel
        _path, rkey, size, mtime_ns, mode, crc, _part, offset, etag, _type = records[rel]
        assert (rkey, size, crc, offset) == (key, len(data), s3_crc32(data), -1)
        assert etag == head["ETag"]
        st = os.stat(tmp_path / "src" / rel)
        assert (mtime_ns, mode) == (st.st_mtime_ns, st.st_mode & 0o7777)


def test_rerun_on_an_unchanged_tree_sends_no_put(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str
) -> None:
    write_tree(tmp_path / "src", {"a": 10, "b/c": 20, "big": 7 * MiB})
    _, first = do_upload(tmp_path / "src", f"s3://{bucket}/p", s3_env)
    assert first.files_uploaded == 3 and first.write_requests > 0
    _, second = do_upload(tmp_path / "src", f"s3://{bucket}/p", s3_env)
    assert second.files_uploaded == 0 and second.files_unchanged == 3
    assert second.write_requests == 0
    assert not second.manifest_written


def test_changed_and_new_files_are_uploaded_and_recorded(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    src = tmp_path / "src"
    write_tree(src, {"keep": 10, "change": 20})
    do_upload(src, f"s3://{bucket}/p", s3_env)
    (src / "change").write_bytes(b"new content")
    (src / "added").write_bytes(b"added")
    _, report = do_upload(src, f"s3://{bucket}/p", s3_env)
    assert (report.files_uploaded, report.files_unchanged) == (2, 1)
    assert read_object(sync_s3_client, bucket, "p/change") == b"new content"
    records = {row[0]: row for row in manifest(sync_s3_client, bucket, "p")["files"]}
    assert set(records) == {"keep", "change", "added"}
    assert records["change"][5] == s3_crc32(b"new content")


def test_hashed_key_prefix_is_deterministic(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    write_tree(tmp_path / "src", {"x/1.jpg": 5, "x/2.jpg": 6})
    config = TransferConfig(key_prefix="hash", pack=False)
    do_upload(tmp_path / "src", f"s3://{bucket}/h", s3_env, config)
    expected = {f"h/{hashed_prefix(p)}/{p}" for p in ("x/1.jpg", "x/2.jpg")}
    assert expected <= set(list_keys(sync_s3_client, bucket, "h/"))
    _, again = do_upload(tmp_path / "src", f"s3://{bucket}/h", s3_env, config)
    assert again.write_requests == 0


def test_a_file_that_changes_after_planning_fails_alone_and_leaves_no_upload(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    src = tmp_path / "src"
    write_tree(src, {"fine": 10, "big.bin": 11 * MiB, "gone": 5})
    plan = make_plan(survey(src), S3Url.parse(f"s3://{bucket}/c"), SMALL)
    os.utime(src / "big.bin", ns=(1, 1))  # changed since planned
    (src / "gone").unlink()

    async def main() -> UploadReport:
        return await upload(plan, connection(s3_env))

    report = anyio.run(main)
    assert not report.ok
    assert {path for path, _ in report.failures} == {"big.bin", "gone"}
    assert report.files_uploaded == 1
    data_keys = [k for k in list_keys(sync_s3_client, bucket, "c/") if "/.s3xfer/" not in k]
    assert data_keys == ["c/fine"]
    # The failed multipart upload was aborted, not left behind to be billed.
    assert sync_s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_cli_upload_with_saved_plan_and_json_report(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    write_tree(tmp_path / "src", {"a.txt": 100, "b/c.txt": 200})
    plan_path = tmp_path / "plan.json"
    planned = run_cli(
        "plan", str(tmp_path / "src"), f"s3://{bucket}/saved", "-o", str(plan_path), "--no-pack"
    )
    assert planned.returncode == 0, planned.stderr
    assert "objects" in planned.stdout and "request cost" in planned.stdout
    result = run_cli("upload", "--plan", str(plan_path), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["files_uploaded"] == 2 and report["files_failed"] == 0
    assert (
        read_object(sync_s3_client, bucket, "saved/b/c.txt")
        == (tmp_path / "src/b/c.txt").read_bytes()
    )
    again = run_cli("upload", str(tmp_path / "src"), f"s3://{bucket}/saved", "--no-pack")
    assert again.returncode == 0
    assert "no PUT was sent" in again.stdout


def test_a_saved_plan_runs_with_the_limits_given_and_refuses_what_would_reshape_it(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str
) -> None:
    write_tree(tmp_path / "src", {"a.txt": 100, "b/c.txt": 200})
    plan_path = tmp_path / "plan.json"
    planned = run_cli("plan", str(tmp_path / "src"), f"s3://{bucket}/limits", "-o", str(plan_path))
    assert planned.returncode == 0, planned.stderr
    # --concurrency and --max-memory bound the run, not what it sends: they apply (once they
    # were silently ignored).
    result = run_cli(
        "upload", "--plan", str(plan_path), "--concurrency", "3", "--max-memory", "64MiB", "--json"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["concurrency"]["final"] == 3  # fixed: given
    # What shapes the plan is the plan's: one line saying where to give it.
    refused = run_cli("upload", "--plan", str(plan_path), "--part-size", "32MiB", "--no-pack")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "s3xfer: error: --part-size, --no-pack: give them to `s3xfer plan`, the plan keeps them"
    ]


def test_unreadable_entries_are_skipped_and_listed(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    src = tmp_path / "src"
    write_tree(src, {"good.txt": 10})
    (src / "dangling").symlink_to(src / "missing")
    os.mkfifo(src / "pipe")
    result = run_cli("upload", str(src), f"s3://{bucket}/s", "--json", "--no-pack")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert {(p["path"], p["reason"]) for p in report["problems"]} == {
        ("dangling", "broken symlink"),
        ("pipe", "fifo"),
    }
    assert "s/good.txt" in list_keys(sync_s3_client, bucket, "s/")


@pytest.mark.parametrize("concurrency", [1, 3])
def test_memory_budget_holds_with_parts_of_many_files_interleaved(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str, concurrency: int
) -> None:
    write_tree(tmp_path / "src", {f"f{n}": 7 * MiB for n in range(3)} | {"s": 3})
    config = TransferConfig(max_memory=12 * MiB, part_size=5 * MiB, multipart_threshold=6 * MiB)
    limits = RunLimits(concurrency=concurrency, max_memory=12 * MiB)
    url = f"s3://{bucket}/m{concurrency}"
    _, report = do_upload(tmp_path / "src", url, s3_env, config, limits)
    assert report.ok, (report.failures, report.problems)
    assert 0 < report.peak_buffered_bytes <= 12 * MiB
