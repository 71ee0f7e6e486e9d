"""Executes plan units against S3: one task group, bounded requests, a hard byte budget.

`concurrency` workers pull jobs (single PUTs and parts of multipart uploads) from one
unbuffered stream, so parts of different files interleave and a slow part never stalls the
others. Before reading any bytes a worker reserves them from the ByteBudget; the bytes are
released once S3 has acknowledged them. Requests in flight are therefore at most
`concurrency`, and bytes buffered at most `max_memory`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import ObjectReceiveStream

from .checksums import combine_parts, crc32_to_base64
from .config import TransferConfig
from .errors import S3XferError
from .localfs import read_range
from .manifest import ManifestRecord
from .plan import FileUnit, Kind, Part, parts_of
from .retry import RetryPolicy, TransientError, call_with_retries
from .s3 import S3

ProgressCallback = Callable[[int, int], None]  # (bytes done, files done) increments


class ByteBudget:
    """A hard limit on bytes held in memory, granted first come, first served.

    FIFO order matters: with a plain condition variable a stream of small PUTs could starve
    an 8 MiB part forever.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self.peak = 0
        self._waiters: deque[tuple[int, anyio.Event]] = deque()

    def __repr__(self) -> str:
        return (
            f"<ByteBudget used={self.used} peak={self.peak} capacity={self.capacity} "
            f"waiting={len(self._waiters)}>"
        )

    async def acquire(self, amount: int) -> None:
        if amount > self.capacity:
            raise ValueError(f"{amount} bytes can never fit a budget of {self.capacity}")
        if not self._waiters and self.used + amount <= self.capacity:
            self._take(amount)
            return
        event = anyio.Event()
        entry = (amount, event)
        self._waiters.append(entry)
        try:
            await event.wait()
        except BaseException:
            if entry in self._waiters:
                self._waiters.remove(entry)
            else:  # granted while being cancelled: give it back
                self.release(amount)
            raise

    def release(self, amount: int) -> None:
        self.used -= amount
        while self._waiters and self.used + self._waiters[0][0] <= self.capacity:
            granted, event = self._waiters.popleft()
            self._take(granted)
            event.set()

    def _take(self, amount: int) -> None:
        self.used += amount
        self.peak = max(self.peak, self.used)


@dataclass
class EngineStats:
    """Live counters, read by progress displays, reports and tests."""

    files_done: int = 0
    bytes_done: int = 0
    files_failed: int = 0
    retries: int = 0
    throttled: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)


@dataclass(eq=False)  # identity semantics: kept in a set of open uploads
class _Multipart:
    """Shared state of one file's multipart upload while its parts are in flight."""

    unit: FileUnit
    remaining: int
    upload_id: str | None = None
    error: str | None = None
    done: dict[int, tuple[str, int, int]] = field(default_factory=dict)  # number → etag, crc, len
    lock: anyio.Lock = field(default_factory=anyio.Lock)


@dataclass(frozen=True, slots=True)
class _PutJob:
    unit: FileUnit


@dataclass(frozen=True, slots=True)
class _PartJob:
    upload: _Multipart
    part: Part


class Engine:
    def __init__(
        self,
        s3: S3,
        *,
        bucket: str,
        source: Path,
        config: TransferConfig,
        on_progress: ProgressCallback | None = None,
        put_extra: dict[str, Any] | None = None,
    ) -> None:
        self.s3 = s3
        self.bucket = bucket
        self.source = source
        self.config = config
        self.budget = ByteBudget(config.max_memory)
        self.stats = EngineStats()
        self.records: list[ManifestRecord] = []
        self._policy = RetryPolicy(max_attempts=config.max_attempts)
        self._on_progress = on_progress or (lambda _b, _f: None)
        self._open_uploads: set[_Multipart] = set()
        self._put_extra = put_extra or {}

    def __repr__(self) -> str:
        s = self.stats
        return (
            f"<Engine in_flight={s.in_flight} done={s.files_done} failed={s.files_failed} "
            f"retries={s.retries} {self.budget!r}>"
        )

    async def run(self, units: Iterable[FileUnit]) -> None:
        send, receive = anyio.create_memory_object_stream[_PutJob | _PartJob](0)
        try:
            async with anyio.create_task_group() as group:
                async with receive:
                    for _ in range(self.config.concurrency):
                        group.start_soon(self._worker, receive.clone())
                async with send:
                    for unit in units:
                        if unit.kind is Kind.MULTIPART:
                            parts = list(parts_of(unit.size, unit.part_size))
                            upload = _Multipart(unit, remaining=len(parts))
                            for part in parts:
                                await send.send(_PartJob(upload, part))
                        else:
                            await send.send(_PutJob(unit))
        finally:
            # Interrupted or crashed: never leave multipart uploads behind to be billed.
            with anyio.CancelScope(shield=True), anyio.move_on_after(30):
                for upload in list(self._open_uploads):
                    await self._abort(upload)

    async def _worker(self, jobs: ObjectReceiveStream[_PutJob | _PartJob]) -> None:
        async with jobs:
            async for job in jobs:
                if isinstance(job, _PutJob):
                    await self._put(job.unit)
                else:
                    await self._upload_part(job.upload, job.part)

    async def _request(self, operation: Callable[[], Any]) -> Any:
        """One S3 call with retries, counted."""

        def count_retry(error: TransientError) -> None:
            self.stats.retries += 1
            self.stats.throttled += error.throttled

        self.stats.in_flight += 1
        self.stats.peak_in_flight = max(self.stats.peak_in_flight, self.stats.in_flight)
        try:
            return await call_with_retries(operation, policy=self._policy, on_retry=count_retry)
        finally:
            self.stats.in_flight -= 1

    def _fail(self, unit: FileUnit, error: BaseException) -> None:
        self.stats.files_failed += 1
        self.stats.failures.append((unit.path, str(error)))

    async def _read(self, unit: FileUnit, offset: int, length: int) -> tuple[bytes, int]:
        return await read_range(
            self.source / unit.path,
            offset=offset,
            length=length,
            size=unit.size,
            mtime_ns=unit.mtime_ns,
        )

    async def _put(self, unit: FileUnit) -> None:
        await self.budget.acquire(unit.size)
        try:
            body, crc = await self._read(unit, 0, unit.size)
            checksum = crc32_to_base64(crc)
            await self._request(
                lambda: self.s3.put_object(
                    self.bucket, unit.key, body, crc32=checksum, extra=self._put_extra
                )
            )
        except S3XferError as error:
            self._fail(unit, error)
            return
        finally:
            self.budget.release(unit.size)
        self._record(unit, checksum)
        self.stats.bytes_done += unit.size
        self.stats.files_done += 1
        self._on_progress(unit.size, 1)

    async def _upload_part(self, upload: _Multipart, part: Part) -> None:
        unit = upload.unit
        try:
            if upload.error is None:
                await self._ensure_created(upload)
                await self.budget.acquire(part.length)
                try:
                    body, crc = await self._read(unit, part.offset, part.length)
                    assert upload.upload_id is not None
                    upload_id = upload.upload_id
                    etag = await self._request(
                        lambda: self.s3.upload_part(
                            self.bucket,
                            unit.key,
                            upload_id=upload_id,
                            number=part.number,
                            body=body,
                            crc32=crc32_to_base64(crc),
                        )
                    )
                    del body
                finally:
                    self.budget.release(part.length)
                upload.done[part.number] = (etag, crc, part.length)
                self.stats.bytes_done += part.length
                self._on_progress(part.length, 0)
        except S3XferError as error:
            upload.error = upload.error or str(error)
        finally:
            upload.remaining -= 1
        if upload.remaining == 0:
            await self._finish(upload)

    async def _ensure_created(self, upload: _Multipart) -> None:
        async with upload.lock:
            if upload.upload_id is None:
                upload.upload_id = await self._request(
                    lambda: self.s3.create_multipart_upload(self.bucket, upload.unit.key)
                )
                self._open_uploads.add(upload)

    async def _finish(self, upload: _Multipart) -> None:
        unit = upload.unit
        if upload.error is None:
            numbers = sorted(upload.done)
            full = combine_parts((upload.done[n][1], upload.done[n][2]) for n in numbers)
            parts = [(n, upload.done[n][0], crc32_to_base64(upload.done[n][1])) for n in numbers]
            assert upload.upload_id is not None
            upload_id = upload.upload_id
            checksum = crc32_to_base64(full)
            try:
                await self._request(
                    lambda: self.s3.complete_multipart_upload(
                        self.bucket, unit.key, upload_id=upload_id, parts=parts, crc32=checksum
                    )
                )
            except S3XferError as error:
                upload.error = str(error)
            else:
                self._open_uploads.discard(upload)
                self._record(unit, checksum)
                self.stats.files_done += 1
                self._on_progress(0, 1)
                return
        await self._abort(upload)
        self._fail(unit, S3XferError(upload.error or "failed"))
        # Bytes of parts that were sent but will not count: take them off the progress.
        sent = sum(length for _e, _c, length in upload.done.values())
        self.stats.bytes_done -= sent
        self._on_progress(-sent, 0)

    async def _abort(self, upload: _Multipart) -> None:
        if upload.upload_id is None or upload not in self._open_uploads:
            return
        self._open_uploads.discard(upload)
        upload_id = upload.upload_id
        try:
            await self._request(
                lambda: self.s3.abort_multipart_upload(
                    self.bucket, upload.unit.key, upload_id=upload_id
                )
            )
        except S3XferError as error:
            self.stats.failures.append(
                (upload.unit.path, f"could not abort multipart upload {upload_id}: {error}")
            )

    def _record(self, unit: FileUnit, checksum: str) -> None:
        self.records.append(
            ManifestRecord(
                path=unit.path,
                key=unit.key,
                size=unit.size,
                mtime_ns=unit.mtime_ns,
                mode=unit.mode,
                crc32=checksum,
                part_size=unit.part_size,
            )
        )
