"""`s3xfer cleanup` finds and aborts incomplete multipart uploads under a prefix, whoever left
them, and nothing else; S3.list_multipart_uploads and S3.list_parts page through everything."""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from typing import Any

import anyio
import pytest

from s3xfer.errors import NoSuchUploadError, UsageError
from s3xfer.locals3 import LocalS3Info
from s3xfer.transport.s3 import open_s3
from s3xfer.write.cleanup import format_age, parse_age, select_stale
from s3xfer.write.incomplete import IncompleteUpload

from .helpers import connection, run_cli

UTC = datetime.UTC
NOW = datetime.datetime(2030, 5, 1, 12, 0, tzinfo=UTC)
MiB = 1024 * 1024

# ---------------------------------------------------------------- pure: ages and selection


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0", 0), ("90s", 90), ("30m", 1800), ("2h", 7200), ("7d", 604800), ("1w", 604800)],
)
def test_parse_age(text: str, seconds: int) -> None:
    assert parse_age(text) == datetime.timedelta(seconds=seconds)


@pytest.mark.parametrize(("text", "fragment"), [("5", "needs a unit"), ("2y", "unknown unit")])
def test_parse_age_refuses_what_it_cannot_read(text: str, fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment):
        parse_age(text)


def test_format_age() -> None:
    assert format_age(datetime.timedelta(seconds=45)) == "45s"
    assert format_age(datetime.timedelta(minutes=12, seconds=5)) == "12m"
    assert format_age(datetime.timedelta(hours=3, minutes=5)) == "3h 05m"
    assert format_age(datetime.timedelta(days=9, hours=4)) == "9d 04h"
    assert format_age(datetime.timedelta(seconds=-3)) == "0s"  # a server clock ahead of ours


def upload(key: str, age: datetime.timedelta, upload_id: str = "") -> IncompleteUpload:
    return IncompleteUpload(key=key, upload_id=upload_id or key, initiated=NOW - age)


def test_select_stale_keeps_only_uploads_old_enough() -> None:
    hour = datetime.timedelta(hours=1)
    uploads = [upload("b", 3 * hour), upload("a", 1 * hour), upload("c", 0.5 * hour)]
    assert [u.key for u in select_stale(uploads, NOW, hour)] == ["a", "b"]
    assert select_stale(uploads, NOW, 4 * hour) == []


def test_select_stale_with_zero_age_takes_everything_even_from_the_future() -> None:
    uploads = [upload("later", -datetime.timedelta(seconds=5)), upload("now", datetime.timedelta())]
    assert [u.key for u in select_stale(uploads, NOW, datetime.timedelta(0))] == ["later", "now"]


def test_listing_times_without_zone_are_utc() -> None:
    naive = IncompleteUpload.from_listing(
        {"Key": "k", "UploadId": "u", "Initiated": datetime.datetime(2030, 1, 1)}
    )
    assert naive.initiated == datetime.datetime(2030, 1, 1, tzinfo=UTC)


# ---------------------------------------------------------------- S3 methods, real server


def start_upload(client: Any, bucket: str, key: str, *, parts: Sequence[bytes] = ()) -> str:
    upload_id: str = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    for number, body in enumerate(parts, start=1):
        client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body)
    return upload_id


def open_uploads(client: Any, bucket: str, prefix: str = "") -> set[tuple[str, str]]:
    listed = client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])
    return {(u["Key"], u["UploadId"]) for u in listed}


def test_list_multipart_uploads_pages_through_all_under_the_prefix(
    local_s3: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    inside = {
        (key, start_upload(sync_s3_client, bucket, key))
        for key in ["data/a", "data/a", "data/b", "data/c/d", "data/e"]
    }
    start_upload(sync_s3_client, bucket, "database/x")  # shares the letters, not the prefix

    async def main() -> tuple[list[dict[str, Any]], int, int]:
        async with open_s3(connection(local_s3)) as s3:
            listed = [u async for u in s3.list_multipart_uploads(bucket, "data/", page_size=2)]
            return listed, s3.calls["list_multipart_uploads"], s3.writes

    listed, pages, writes = anyio.run(main)
    assert {(u["Key"], u["UploadId"]) for u in listed} == inside
    assert len(listed) == len(inside)  # each once
    assert all(u["Initiated"].tzinfo is not None for u in listed)
    assert pages >= 3 and writes == 0


def test_list_parts_pages_in_part_order_and_missing_upload_is_no_such_upload(
    local_s3: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    bodies = [bytes([n]) * (5 * MiB) for n in range(4)] + [b"tail"]
    upload_id = start_upload(sync_s3_client, bucket, "big.bin", parts=bodies)
    sync_s3_client.abort_multipart_upload(
        Bucket=bucket, Key="gone.bin", UploadId=start_upload(sync_s3_client, bucket, "gone.bin")
    )

    async def main() -> tuple[list[dict[str, Any]], int]:
        async with open_s3(connection(local_s3)) as s3:
            parts = await s3.list_parts(bucket, "big.bin", upload_id=upload_id, page_size=2)
            with pytest.raises(NoSuchUploadError, match="no such multipart upload"):
                await s3.list_parts(bucket, "big.bin", upload_id="no-such-upload-id")
            return parts, s3.writes

    parts, writes = anyio.run(main)
    assert [p["PartNumber"] for p in parts] == [1, 2, 3, 4, 5]
    assert [p["Size"] for p in parts] == [len(b) for b in bodies]
    assert all(p["ETag"] for p in parts)
    assert writes == 0


# ---------------------------------------------------------------- the command


@pytest.fixture
def leftovers(bucket: str, sync_s3_client: Any) -> dict[str, set[tuple[str, str]]]:
    """Incomplete uploads under s3://bucket/data (some with parts), and two outside it."""
    client = sync_s3_client
    inside = {
        ("data/a.bin", start_upload(client, bucket, "data/a.bin", parts=[b"x" * 1000, b"y"])),
        ("data/a.bin", start_upload(client, bucket, "data/a.bin")),
        ("data/sub/c.bin", start_upload(client, bucket, "data/sub/c.bin", parts=[b"z" * 10])),
    }
    outside = {
        ("other/x.bin", start_upload(client, bucket, "other/x.bin", parts=[b"o"])),
        ("database/y.bin", start_upload(client, bucket, "database/y.bin")),
    }
    assert open_uploads(client, bucket) == inside | outside
    return {"inside": inside, "outside": outside}


def test_dry_run_lists_and_aborts_nothing(
    s3_env: LocalS3Info,
    bucket: str,
    sync_s3_client: Any,
    leftovers: dict[str, set[tuple[str, str]]],
) -> None:
    result = run_cli("cleanup", f"s3://{bucket}/data", "--dry-run", "--older-than", "0")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    listed = set()
    for line in lines:
        age, key, upload_id = line.split()
        assert age.endswith(("s", "m"))
        listed.add((key, upload_id))
    assert listed == leftovers["inside"]
    assert "would abort 3 incomplete uploads" in result.stderr
    assert open_uploads(sync_s3_client, bucket) == leftovers["inside"] | leftovers["outside"]


def test_uploads_newer_than_the_age_are_left_alone(
    s3_env: LocalS3Info,
    bucket: str,
    sync_s3_client: Any,
    leftovers: dict[str, set[tuple[str, str]]],
) -> None:
    result = run_cli("cleanup", f"s3://{bucket}/data", "--older-than", "1h")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "aborted 0 incomplete uploads (3 skipped: newer than 1h)" in result.stderr
    assert open_uploads(sync_s3_client, bucket) == leftovers["inside"] | leftovers["outside"]
    # The default age (24h) protects uploads that are still running, too.
    assert run_cli("cleanup", f"s3://{bucket}/data").returncode == 0
    assert open_uploads(sync_s3_client, bucket) == leftovers["inside"] | leftovers["outside"]


def test_older_than_zero_aborts_everything_under_the_prefix_and_nothing_else(
    s3_env: LocalS3Info,
    bucket: str,
    sync_s3_client: Any,
    leftovers: dict[str, set[tuple[str, str]]],
) -> None:
    result = run_cli("cleanup", f"s3://{bucket}/data", "--older-than", "0", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert isinstance(report, list)
    assert {(item["key"], item["upload_id"]) for item in report} == leftovers["inside"]
    for item in report:
        assert set(item) == {"key", "upload_id", "initiated", "aborted"}
        assert item["aborted"] is True
        initiated = datetime.datetime.fromisoformat(item["initiated"])
        assert initiated.tzinfo is not None
        assert abs(datetime.datetime.now(UTC) - initiated) < datetime.timedelta(minutes=10)
    assert open_uploads(sync_s3_client, bucket, "data/") == set()
    assert open_uploads(sync_s3_client, bucket) == leftovers["outside"]
    for key, upload_id in leftovers["inside"]:  # the parts are gone with them
        with pytest.raises(sync_s3_client.exceptions.NoSuchUpload):
            sync_s3_client.list_parts(Bucket=bucket, Key=key, UploadId=upload_id)

    again = run_cli("cleanup", f"s3://{bucket}/data", "--older-than", "0")
    assert again.returncode == 0 and again.stdout == ""
    assert "aborted 0 incomplete uploads" in again.stderr


def test_quiet_prints_nothing(
    s3_env: LocalS3Info,
    bucket: str,
    sync_s3_client: Any,
    leftovers: dict[str, set[tuple[str, str]]],
) -> None:
    result = run_cli("cleanup", f"s3://{bucket}/data/", "--older-than", "0", "--quiet")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert open_uploads(sync_s3_client, bucket) == leftovers["outside"]


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["s3://no-such-bucket-here/data"], 3, "no such bucket: s3://no-such-bucket-here"),
        (["s3://BUCKET/data"], 2, "not a valid bucket name"),
        (["s3://bucket/data", "--older-than", "5"], 2, "needs a unit"),
        (["s3://bucket/data", "--endpoint-url", "ftp://x"], 2, "bad endpoint URL"),
    ],
)
def test_errors_are_one_clear_line(
    s3_env: LocalS3Info, args: list[str], code: int, fragment: str
) -> None:
    result = run_cli("cleanup", *args)
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_wrong_credentials_are_access_denied(s3_env: LocalS3Info, bucket: str) -> None:
    result = run_cli(
        "cleanup", f"s3://{bucket}/data", env={"AWS_SECRET_ACCESS_KEY": "wrong-" + "x" * 30}
    )
    assert result.returncode == 3
    assert "access denied" in result.stderr and "Traceback" not in result.stderr
