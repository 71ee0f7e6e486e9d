"""A file that changes while it is uploaded is reported as failed, alone: its multipart upload
is aborted and the catalog never records bytes that were not the file's."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anyio
import pytest

from s3xfer.config import MiB, TransferConfig
from s3xfer.keys import S3Url
from s3xfer.locals3 import LocalS3Info
from s3xfer.plan import make_plan
from s3xfer.survey import survey
from s3xfer.upload import UploadReport, upload

from ..integration.helpers import connection, list_keys, read_object, write_tree

CONFIG = TransferConfig(
    concurrency=2, part_size=5 * MiB, multipart_threshold=8 * MiB, shard_size=5 * MiB
)


def run_upload(src: Path, url: str, info: LocalS3Info) -> UploadReport:
    async def main() -> UploadReport:
        return await upload(make_plan(survey(src), S3Url.parse(url), CONFIG), connection(info))

    return anyio.run(main)


def test_a_file_written_to_during_its_upload_fails_alone_and_is_not_catalogued(
    tmp_path: Path,
    local_s3: LocalS3Info,
    bucket: str,
    sync_s3_client: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    src = tmp_path / "src"
    contents = write_tree(src, {"growing.log": 16 * MiB, "a.txt": 100, "b.bin": 9 * MiB})
    growing = str(src / "growing.log")
    real_pread = os.pread
    reads = 0

    def pread_while_someone_appends(fd: int, length: int, offset: int) -> bytes:
        nonlocal reads
        if os.readlink(f"/proc/self/fd/{fd}") == growing:
            reads += 1
            if reads == 2:  # a writer appends while the second part is being read
                with open(growing, "ab") as file:
                    file.write(b"more log lines\n")
        return real_pread(fd, length, offset)

    monkeypatch.setattr(os, "pread", pread_while_someone_appends)
    report = run_upload(src, f"s3://{bucket}/ds", local_s3)
    monkeypatch.undo()

    assert [path for path, _ in report.failures] == ["growing.log"]
    assert "changed" in report.failures[0][1]
    assert report.files_uploaded == 2  # the others went on
    assert sync_s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert "ds/growing.log" not in list_keys(sync_s3_client, bucket, "ds/")
    assert read_object(sync_s3_client, bucket, "ds/b.bin") == contents["b.bin"]

    # Once it holds still, the next run uploads it.
    again = run_upload(src, f"s3://{bucket}/ds", local_s3)
    assert again.ok and again.files_uploaded == 1 and again.files_unchanged == 2
    assert (
        read_object(sync_s3_client, bucket, "ds/growing.log") == (src / "growing.log").read_bytes()
    )
