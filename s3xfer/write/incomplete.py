"""The incomplete multipart uploads under a prefix: listing them and aborting them.

An incomplete upload keeps its parts stored, and billed, until it is completed or aborted, and
no object listing shows it. Shared by the engine (it aborts the uploads of its own keys it
cannot resume), distributed jobs and the `cleanup` command, through the S3 facade.
"""

from __future__ import annotations

import datetime
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio

from ..dataset.keys import S3Url
from ..errors import NoSuchUploadError, first_error
from ..transport.retry import RetryPolicy, call_with_retries
from ..transport.s3 import S3

# Aborts in flight at once: enough to clear thousands of leftovers quickly, far below throttling.
ABORT_CONCURRENCY = 16


@dataclass(frozen=True, slots=True)
class IncompleteUpload:
    key: str
    upload_id: str
    initiated: datetime.datetime  # timezone-aware

    @classmethod
    def from_listing(cls, item: Mapping[str, Any]) -> IncompleteUpload:
        initiated: datetime.datetime = item["Initiated"]
        if initiated.tzinfo is None:  # S3 times are UTC
            initiated = initiated.replace(tzinfo=datetime.UTC)
        return cls(key=str(item["Key"]), upload_id=str(item["UploadId"]), initiated=initiated)


async def incomplete_uploads(
    s3: S3, url: S3Url, *, policy: RetryPolicy, keys: Container[str] | None = None
) -> list[IncompleteUpload]:
    """Every incomplete multipart upload under url (only those of `keys`, when given)."""
    prefix = f"{url.prefix}/" if url.prefix else ""

    async def listing() -> list[IncompleteUpload]:
        return [
            IncompleteUpload.from_listing(item)
            async for item in s3.list_multipart_uploads(url.bucket, prefix)
            if keys is None or item["Key"] in keys
        ]

    return await call_with_retries(listing, policy=policy)


async def abort_uploads(
    s3: S3,
    bucket: str,
    uploads: Iterable[IncompleteUpload],
    *,
    policy: RetryPolicy,
    concurrency: int = ABORT_CONCURRENCY,
) -> set[str]:
    """Abort each upload, `concurrency` at a time; the ids aborted. An upload completed or
    aborted meanwhile is not an error (nothing is left to bill); permanent errors raise."""
    aborted: set[str] = set()
    limiter = anyio.CapacityLimiter(concurrency)

    async def abort(upload: IncompleteUpload) -> None:
        async with limiter:
            try:
                await call_with_retries(
                    lambda: s3.abort_multipart_upload(
                        bucket, upload.key, upload_id=upload.upload_id
                    ),
                    policy=policy,
                )
            except NoSuchUploadError:
                return
            aborted.add(upload.upload_id)

    with first_error():
        async with anyio.create_task_group() as group:
            for upload in uploads:
                group.start_soon(abort, upload)
    return aborted
