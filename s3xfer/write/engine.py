"""Executes plan units against S3: one task group, bounded requests, a hard byte budget.

`limits.concurrency` workers pull jobs (single PUTs, and parts of multipart uploads of large files
and of tar shards) from one unbuffered stream, so parts of different objects interleave and a
slow part never stalls the others. Before reading any bytes a worker reserves them from the
ByteBudget; they are released once S3 has acknowledged them. Requests in flight are therefore
at most `limits.concurrency`, and file bytes buffered at most `limits.max_memory` (or one
part, when the plan's parts are larger: run_budget in upload.py says so).

A shard's parts are built independently from its layout (tarpack.ShardLayout): each reads
just the member ranges it covers. The part that holds the shard's index waits until every
member's CRC32 is known, then writes the index with them.

Files that change: every file is identified (device, inode, size, mtime, ctime) before its
first read and every read is checked against that identity, and the path is looked at again
after the last one (localfs.py). Before a shard's parts are built its members are looked at:
one that vanished or grew too large to pack is left out and fails alone, one that changed since
planning is packed as it is now, and the shard is laid out again from what is left. A member
that changes while the shard is read fails alone: the shard's upload is aborted and the shard
laid out again without it (at most MAX_SHARD_LAYOUTS times).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import ObjectReceiveStream, TaskGroup
from anyio.streams.memory import MemoryObjectSendStream

from ..budget import ByteBudget
from ..checksums import combine_parts, crc32, crc32_to_base64
from ..config import MiB, TransferConfig
from ..dataset.coding import FileCoder, FrameKey
from ..dataset.keys import S3Url
from ..dataset.manifest import Manifest, ManifestRecord, ShardRecord
from ..dataset.tarpack import FixedPiece
from ..errors import (
    MemberChangedError,
    NoSuchUploadError,
    S3XferError,
    SourceError,
)
from ..limits import DEFAULT_LIMITS, RunLimits
from ..localfs import (
    FileIdentity,
    Identities,
    buffer_crc32,
    changed_members,
    check_unchanged,
    describe_change,
    fill_part,
    identify,
    identify_members,
    read_range,
    read_whole_files,
)
from ..malloc import return_large_buffers_promptly
from ..planning.plan import FileUnit, Kind, Part, ShardUnit, UploadKeys, parts_of
from ..planning.survey import FileEntry
from ..transport.retry import RetryPolicy, call_with_retries
from ..transport.s3 import S3, ObjectAttributes
from .coded import encode_file, encode_part, member_coders
from .counters import EngineStats
from .incomplete import incomplete_uploads
from .inflight import Multipart, PartJob, PutJob, ShardBuild
from .journal import FSYNC_INTERVAL, Journal

ProgressCallback = Callable[[int, int], None]  # (bytes done, files done) increments
SHARD_CONTENT_TYPE = "application/x-tar"
# Files under READ_TOGETHER_SIZE are read in batches (up to READ_TOGETHER_FILES of them, and
# READ_TOGETHER_BYTES), one worker-thread call each, instead of one call per file.
READ_TOGETHER_SIZE = 1 * MiB
READ_TOGETHER_FILES = 64
READ_TOGETHER_BYTES = 4 * MiB
# Layouts of one shard before its members that keep changing fail with it: each layout leaves
# out every member seen changing, so more than a couple means a tree rewritten as it is read.
MAX_SHARD_LAYOUTS = 4


class Engine:
    def __init__(
        self,
        s3: S3,
        *,
        bucket: str,
        source: Path,
        config: TransferConfig,
        limits: RunLimits = DEFAULT_LIMITS,
        max_memory: int | None = None,
        on_progress: ProgressCallback | None = None,
        journal: Journal | None = None,
        prefix: str | None = None,
        adopt_uploads: bool = False,
        stored: Manifest | None = None,
        frame_key: FrameKey | None = None,
    ) -> None:
        return_large_buffers_promptly()
        # The dataset's data key, for the units whose coding encrypts (Plan.coded).
        self.frame_key = frame_key
        self.s3 = s3
        self.bucket = bucket
        self.source = source
        self.config = config  # the plan's: what is sent
        self.limits = limits  # how: requests in flight, memory, attempts
        # max_memory: the budget, limits.max_memory or more (make_engine's run_budget).
        self.budget = ByteBudget(max_memory or limits.max_memory)
        self.stats = EngineStats()
        self.records: list[ManifestRecord] = []
        self.shard_records: list[ShardRecord] = []
        self._policy = RetryPolicy(max_attempts=limits.max_attempts)
        self._on_progress = on_progress or (lambda _b, _f: None)
        self._open_uploads: set[Multipart] = set()
        self.journal = journal
        self.prefix = prefix  # of every key this run writes, to find uploads it left behind
        # Without a journal (a unit redelivered to another machine): continue any incomplete
        # upload of the same key, its parts verified like a journaled one's.
        self.adopt_uploads = adopt_uploads
        # What the destination holds: a shard laid out again as its members are now may be
        # stored already (by an earlier run of the same plan).
        self.stored = stored
        self._group: TaskGroup | None = None
        self._job_streams: set[MemoryObjectSendStream[PutJob | PartJob]] = set()

    def __repr__(self) -> str:
        s = self.stats
        return (
            f"<Engine in_flight={s.in_flight} done={s.files_done} failed={s.files_failed} "
            f"retries={s.retried.retries} {self.budget!r}>"
        )

    async def run(self, units: Iterable[FileUnit], shards: Iterable[ShardUnit] = ()) -> None:
        async with anyio.create_task_group() as background:
            if self.journal is not None:
                background.start_soon(self._sync_journal_periodically, self.journal)
            try:
                await self._run(list(units), list(shards))
            finally:
                background.cancel_scope.cancel()

    async def _sync_journal_periodically(self, journal: Journal) -> None:
        """fsync the journal every FSYNC_INTERVAL, off the event loop (an fsync can take
        milliseconds to seconds); its lines are written as work completes."""
        while True:
            await anyio.sleep(FSYNC_INTERVAL)
            await anyio.to_thread.run_sync(journal.sync)

    async def _run(self, units: list[FileUnit], shards: list[ShardUnit]) -> None:
        await self._abort_stale_uploads(units, shards)
        send, receive = anyio.create_memory_object_stream[PutJob | PartJob](0)
        try:
            async with anyio.create_task_group() as group:
                self._group = group
                async with receive:
                    for _ in range(self.limits.most_in_flight):
                        group.start_soon(self._worker, receive.clone())
                async with send:
                    # Shards first: each is many files, and their parts keep every worker busy.
                    for shard in shards:
                        build = await self._lay_out(shard, shard.members, found_before=None)
                        if build is not None:
                            await self._send_shard(build, send)
                    small: list[FileUnit] = []  # read together, in one worker-thread call
                    small_bytes = 0
                    for unit in units:
                        if unit.kind is Kind.MULTIPART:
                            parts = list(parts_of(unit.size, unit.part_size))
                            upload = Multipart(unit.key, remaining=len(parts), file=unit)
                            for part in parts:
                                await send.send(PartJob(upload, part))
                        elif unit.size < READ_TOGETHER_SIZE:
                            if small and (
                                len(small) == READ_TOGETHER_FILES
                                or small_bytes + unit.size > READ_TOGETHER_BYTES
                            ):
                                await self._send_read(small, send)
                                small, small_bytes = [], 0
                            small.append(unit)
                            small_bytes += unit.size
                        else:
                            await send.send(PutJob(unit))
                    await self._send_read(small, send)
        finally:
            self._group = None
            for stream in self._job_streams:
                stream.close()
            # Interrupted or crashed: leave no multipart upload behind to be billed, except
            # the journaled uploads of large files, which the next run resumes.
            with anyio.CancelScope(shield=True), anyio.move_on_after(30):
                for upload in list(self._open_uploads):
                    if self.journal is not None and upload.file is not None:
                        self.stats.uploads_kept += 1
                    else:
                        await self._abort(upload)

    async def _lay_out(
        self,
        planned: ShardUnit,
        members: list[FileEntry],
        *,
        found_before: Sequence[FileIdentity] | None,
        layouts: int = 1,
    ) -> ShardBuild | None:
        """Look at `members` (one worker-thread call for them all) and lay the shard out from
        those that can be packed; the others fail alone. Without `found_before` (the first
        layout) a member that changed since planning is packed as it is now, unless it grew
        too large to pack; with it (a layout after members changed while being read), a member
        that is not the file found before fails. None when nothing is left to upload."""
        since = "after it was planned" if found_before is None else "while it was read"
        found, unreadable = await identify_members(self.source, members, since=since)
        kept: list[FileEntry] = []
        identities = Identities()
        for n, (member, now) in enumerate(zip(members, found, strict=True)):
            path = self.source / member.path
            if n in unreadable:
                self._fail([member.path], unreadable[n])
            elif found_before is not None and now != found_before[n]:
                self._fail([member.path], describe_change(path, found_before[n], now))
            elif now.size >= self.config.pack_threshold:
                self._fail(
                    [member.path],
                    f"{path}: changed since it was planned: {now.size:,} bytes now, too large "
                    "to pack with small files (plan again)",
                )
            else:
                # The planned entry itself when the file is as planned: no copy per member.
                as_planned = (member.size, member.mtime_ns, member.mode) == (
                    now.size,
                    now.mtime_ns,
                    now.mode,
                )
                kept.append(
                    member
                    if as_planned
                    else FileEntry(member.path, now.size, now.mtime_ns, now.mode)
                )
                identities.append(now)
        if not kept:
            return None
        try:
            unit = planned.relaid(kept, max_memory=self.config.max_memory)
        except S3XferError as error:
            self._fail([m.path for m in kept], str(error))
            return None
        if unit is not planned and self.stored is not None and self.stored.shard_unchanged(unit):
            self.stats.files_unchanged += len(kept)
            self._on_progress(0, len(kept))
            return None
        return ShardBuild(unit, planned, identities, unit.layout(), 0, layouts=layouts)

    async def _send_shard(
        self, build: ShardBuild, jobs: MemoryObjectSendStream[PutJob | PartJob]
    ) -> None:
        layout = build.layout
        parts = list(parts_of(layout.size, build.unit.part_size))
        build.data_parts_left = sum(p.offset < layout.index_header_offset for p in parts)
        if build.data_parts_left == 0:
            build.data_ready.set()
        upload = Multipart(build.unit.key, remaining=len(parts), shard=build, jobs=jobs.clone())
        assert upload.jobs is not None
        self._job_streams.add(upload.jobs)
        for part in parts:
            await jobs.send(PartJob(upload, part))

    def _settle(self, jobs: MemoryObjectSendStream[PutJob | PartJob] | None) -> None:
        """A shard is done with the job stream: once every shard is, the workers stop."""
        if jobs is not None:
            jobs.close()
            self._job_streams.discard(jobs)

    async def _lay_out_again(
        self, build: ShardBuild, jobs: MemoryObjectSendStream[PutJob | PartJob]
    ) -> None:
        """The shard failed only because members changed while it was read: they fail alone,
        and the shard is laid out again without them (and without any other member that is no
        longer the file found before) and sent again."""
        try:
            unit = build.unit
            for n, reason in sorted(build.changed.items()):
                self._fail([unit.members[n].path], reason)
            rest = [n for n in range(len(unit.members)) if n not in build.changed]
            if build.layouts >= MAX_SHARD_LAYOUTS:
                self._fail(
                    [unit.members[n].path for n in rest],
                    f"not uploaded: shard {build.planned.key} was laid out {build.layouts} "
                    "times and its members kept changing while it was read",
                )
                return
            again = await self._lay_out(
                build.planned,
                [unit.members[n] for n in rest],
                found_before=[build.identities[n] for n in rest],
                layouts=build.layouts + 1,
            )
            if again is not None:
                await self._send_shard(again, jobs)
        finally:
            self._settle(jobs)

    async def _abort_stale_uploads(self, units: list[FileUnit], shards: list[ShardUnit]) -> None:
        """Abort the journaled uploads this run will not resume: those of shards (a shard in
        flight is rebuilt) and of files that changed or need no upload any more. And, after a
        crash, uploads of this run's keys that the journal never heard of: S3 created them but
        the crash came before their id was known (no part can have been sent to them)."""
        if self.journal is None or not self.journal.resumed:
            return
        state = self.journal.state
        resumable = {
            id(found)
            for unit in units
            if unit.kind is Kind.MULTIPART
            and (
                found := state.open_upload_for(
                    unit.path,
                    key=unit.key,
                    size=unit.size,
                    mtime_ns=unit.mtime_ns,
                    part_size=unit.part_size,
                )
            )
        }
        stale = [(u.key, u.upload_id) for u in state.uploads.values() if id(u) not in resumable]
        if self.prefix is not None:
            keys = {u.key for u in units if u.kind is Kind.MULTIPART} | {s.key for s in shards}
            listed = await incomplete_uploads(
                self.s3,
                S3Url(self.bucket, self.prefix),
                policy=self._policy,
                keys=UploadKeys(frozenset(keys)),
            )
            stale += [(u.key, u.upload_id) for u in listed if u.upload_id not in state.uploads]
        limiter = anyio.CapacityLimiter(self.limits.most_in_flight)

        async def abort(key: str, upload_id: str) -> None:
            async with limiter:
                await self._abort_id(key, upload_id)

        async with anyio.create_task_group() as group:
            for key, upload_id in stale:
                group.start_soon(abort, key, upload_id)

    async def _worker(self, jobs: ObjectReceiveStream[PutJob | PartJob]) -> None:
        async with jobs:
            async for job in jobs:
                if isinstance(job, PutJob):
                    await self._put(job.unit, job.read)
                else:
                    await self._upload_part(job.upload, job.part)

    async def _request(self, operation: Callable[[], Any]) -> Any:
        """One S3 call with retries, counted."""
        self.stats.in_flight += 1
        self.stats.peak_in_flight = max(self.stats.peak_in_flight, self.stats.in_flight)
        try:
            return await call_with_retries(
                operation, policy=self._policy, on_retry=self.stats.retried
            )
        finally:
            self.stats.in_flight -= 1

    async def _send_read(
        self, units: list[FileUnit], jobs: MemoryObjectSendStream[PutJob | PartJob]
    ) -> None:
        """Small files read in one worker-thread call, then handed out one PUT each; their
        bytes are taken from the budget here and given back by each PUT."""
        if not units:
            return
        await self.budget.acquire(sum(unit.size for unit in units))
        reads = await read_whole_files([(self.source / u.path, u.size, u.mtime_ns) for u in units])
        for unit, read in zip(units, reads, strict=True):
            await jobs.send(PutJob(unit, read))

    def _fail(self, paths: list[str], reason: str) -> None:
        self.stats.files_failed += len(paths)
        self.stats.failures.extend((path, reason) for path in paths)

    async def _put(self, unit: FileUnit, read: tuple[bytes, int] | SourceError | None) -> None:
        if read is None:
            await self.budget.acquire(unit.size)
        try:
            if read is None:
                body, crc, _identity = await read_range(
                    self.source / unit.path,
                    offset=0,
                    length=unit.size,
                    size=unit.size,
                    mtime_ns=unit.mtime_ns,
                    whole=True,
                )
            elif isinstance(read, SourceError):
                raise read
            else:
                body, crc = read
            checksum = stored_checksum = crc32_to_base64(crc)
            if not unit.coding.identity:
                body = await encode_file(unit, body, key=self.frame_key, source=self.source)
                stored_checksum = crc32_to_base64(crc32(body))
            attributes = self._attributes(unit.path)
            etag = await self._request(
                lambda: self.s3.put_object(
                    self.bucket,
                    unit.key,
                    body,
                    crc32=stored_checksum,
                    attributes=attributes,
                )
            )
        except S3XferError as error:
            self._fail([unit.path], str(error))
            return
        finally:
            self.budget.release(unit.size)
        self._record(unit, checksum, etag)
        self.stats.bytes_done += unit.size
        self.stats.files_done += 1
        self._on_progress(unit.size, 1)

    async def _read_part(self, upload: Multipart, part: Part) -> tuple[bytes | bytearray, int]:
        if upload.file is not None:
            unit = upload.file
            body, crc, _identity = await read_range(
                self.source / unit.path,
                offset=part.offset,
                length=part.length,
                size=unit.size,
                mtime_ns=unit.mtime_ns,
                identity=upload.identity,
            )
            if not unit.coding.identity:
                upload.original[part.number] = (crc, part.length)
                body = await encode_part(unit, part, body, key=self.frame_key)
                crc = await buffer_crc32(body)
            return body, crc
        build = upload.shard
        assert build is not None
        layout = build.layout
        start, end = part.offset, part.offset + part.length
        needs_index = layout.needs_index(start, end)
        placeholder = bytes(layout.index_size) if needs_index else None
        buffer, file_pieces, crcs = await fill_part(
            self.source,
            build.unit.members,
            build.identities,
            part.length,
            lambda: layout.iter_pieces(start, end, index=placeholder),
            coder_of=member_coders(build, self.frame_key) if build.unit.coded else None,
        )
        for piece, crc in zip(file_pieces, crcs, strict=True):
            build.read_crcs.add(piece, crc)
        if start < layout.index_header_offset:
            build.data_parts_left -= 1
            if build.data_parts_left == 0:
                build.data_ready.set()
        if needs_index:
            await build.data_ready.wait()
            if build.failed:
                raise S3XferError("another part of this shard failed")
            if build.index is None:
                build.crcs = build.read_crcs.final()
                build.index = layout.index_bytes(build.crcs)
            # Write the finished index over its placeholder (fixed bytes only; data unchanged).
            position = 0
            for final in layout.pieces(start, end, index=build.index):
                if isinstance(final, FixedPiece):
                    buffer[position : position + len(final.data)] = final.data
                    position += len(final.data)
                else:
                    position += final.length
        return buffer, await buffer_crc32(buffer)

    async def _upload_part(self, upload: Multipart, part: Part) -> None:
        try:
            if upload.error is None:
                await self._ensure_created(upload)
                await self.budget.acquire(part.length)
                try:
                    body, crc = await self._read_part(upload, part)
                    stored_length = len(body)  # part.length's stored bytes when coded
                    assert upload.upload_id is not None
                    upload_id = upload.upload_id
                    listed = upload.listed.get(part.number)
                    if listed is not None and await _already_uploaded(listed, body, crc):
                        etag = str(listed["ETag"])
                        upload.reused.add(part.number)
                    else:
                        etag = await self._request(
                            lambda: self.s3.upload_part(
                                self.bucket,
                                upload.key,
                                upload_id=upload_id,
                                number=part.number,
                                body=body,
                                crc32=crc32_to_base64(crc),
                            )
                        )
                    del body
                finally:
                    self.budget.release(part.length)
                upload.done[part.number] = (etag, crc, stored_length)
                if part.number in upload.reused:
                    self.stats.bytes_reused += part.length
                else:
                    self.stats.bytes_done += part.length
                    if self.journal is not None and upload.file is not None:
                        self.journal.part_done(
                            upload_id=upload_id,
                            number=part.number,
                            etag=etag,
                            crc=crc,
                            length=part.length,
                        )
                self._on_progress(part.length, 0)
        except S3XferError as error:
            upload.error = upload.error or str(error)
            build = upload.shard
            if build is not None:
                if isinstance(error, MemberChangedError):
                    build.changed.setdefault(error.member, str(error))
                if not build.failed:
                    # Only a shard that failed for a changed member is laid out again.
                    build.failed = True
                    build.relayable = isinstance(error, MemberChangedError)
                build.data_ready.set()  # wake the part waiting to write the index
        finally:
            upload.remaining -= 1
        if upload.remaining == 0:
            await self._finish(upload)

    async def _ensure_created(self, upload: Multipart) -> None:
        async with upload.lock:
            if upload.upload_id is not None:
                return
            unit = upload.file
            if unit is not None and upload.identity is None:
                # Every part will be read from this very file, and checked to be it.
                upload.identity = await identify(
                    self.source / unit.path, size=unit.size, mtime_ns=unit.mtime_ns
                )
            if await self._resume(upload):
                self._open_uploads.add(upload)
                return
            attributes = self._attributes(unit.path if unit is not None else None)
            upload.upload_id = await self._request(
                lambda: self.s3.create_multipart_upload(
                    self.bucket, upload.key, attributes=attributes
                )
            )
            self._open_uploads.add(upload)
            if self.journal is not None:
                self.journal.multipart_created(
                    key=upload.key,
                    upload_id=upload.upload_id,
                    path=unit.path if unit is not None else None,
                    size=unit.size if unit is not None else 0,
                    mtime_ns=unit.mtime_ns if unit is not None else 0,
                    part_size=unit.part_size if unit is not None else 0,
                    identity=upload.identity,
                )
                # On disk before any part is sent: an upload id lost to a machine crash is an
                # upload nobody can resume (the next run finds it by listing, and aborts it).
                await anyio.to_thread.run_sync(self.journal.sync)

    async def _newest_upload_of(self, key: str) -> str | None:
        newest: tuple[Any, str] | None = None
        async for listed in self.s3.list_multipart_uploads(self.bucket, key):
            if listed["Key"] == key and (newest is None or listed["Initiated"] > newest[0]):
                newest = (listed["Initiated"], str(listed["UploadId"]))
        return newest[1] if newest is not None else None

    async def _resume(self, upload: Multipart) -> bool:
        """Take over the journaled upload of this very file version, if S3 still has it; its
        parts are then checked against the file's bytes as they are read (see _upload_part)."""
        unit = upload.file
        if unit is None:
            return False
        upload_id = None
        if self.journal is not None:
            found = self.journal.state.open_upload_for(
                unit.path,
                key=unit.key,
                size=unit.size,
                mtime_ns=unit.mtime_ns,
                part_size=unit.part_size,
            )
            upload_id = found.upload_id if found is not None else None
            if found is not None and not _same_file(found.identity, upload.identity):
                # Not the file the interrupted run read: start afresh. (Its parts would be
                # checked against the file's bytes anyway; this does not lean on that.)
                await self._abort_id(found.key, found.upload_id)
                upload_id = None
        elif self.adopt_uploads:
            upload_id = await self._newest_upload_of(unit.key)
        if upload_id is None:
            return False
        try:
            parts = await self._request(
                lambda: self.s3.list_parts(self.bucket, unit.key, upload_id=upload_id)
            )
        except NoSuchUploadError:
            if self.journal is not None:
                self.journal.multipart_closed(upload_id)
            return False
        upload.upload_id = upload_id
        upload.listed = {int(p["PartNumber"]): p for p in parts}
        self.stats.uploads_resumed += 1
        return True

    async def _check_sources(self, upload: Multipart) -> None:
        """The re-stat after the last part: the file, or every member of the shard, must still
        be what was read, or the object would claim bytes the files no longer hold."""
        try:
            if upload.file is not None:
                assert upload.identity is not None
                await check_unchanged(self.source / upload.file.path, upload.identity)
            elif upload.shard is not None:
                build = upload.shard
                changed = await changed_members(self.source, build.unit.members, build.identities)
                if changed:
                    build.changed.update(changed)
                    build.failed = build.relayable = True
                    upload.error = next(iter(changed.values()))
        except S3XferError as error:
            upload.error = str(error)

    async def _finish(self, upload: Multipart) -> None:
        if upload.error is None:
            await self._check_sources(upload)
        if upload.error is None:
            numbers = sorted(upload.done)
            full = combine_parts((upload.done[n][1], upload.done[n][2]) for n in numbers)
            parts = [(n, upload.done[n][0], crc32_to_base64(upload.done[n][1])) for n in numbers]
            assert upload.upload_id is not None
            upload_id = upload.upload_id
            checksum = crc32_to_base64(full)
            try:
                etag = await self._request(
                    lambda: self.s3.complete_multipart_upload(
                        self.bucket, upload.key, upload_id=upload_id, parts=parts, crc32=checksum
                    )
                )
                self._open_uploads.discard(upload)
                if self.journal is not None:
                    self.journal.multipart_closed(upload_id)
                if upload.shard is not None:
                    await self._finish_shard(upload.shard, etag)
                    self._settle(upload.jobs)
                else:
                    assert upload.file is not None
                    if upload.original:  # coded: the record holds the original file's CRC32
                        checksum = crc32_to_base64(
                            combine_parts(upload.original[n] for n in sorted(upload.original))
                        )
                    self._record(upload.file, checksum, etag)
                    self.stats.files_done += 1
                    self._on_progress(0, 1)
                return
            except S3XferError as error:
                upload.error = str(error)
        await self._abort(upload)
        # Bytes of parts that were sent but will not count: take them off the progress.
        sent = sum(upload.done[n][2] for n in upload.done if n not in upload.reused)
        reused = sum(upload.done[n][2] for n in upload.reused)
        self.stats.bytes_done -= sent
        self.stats.bytes_reused -= reused
        self._on_progress(-sent - reused, 0)
        build = upload.shard
        if build is not None and build.relayable and upload.jobs is not None:
            jobs, upload.jobs = upload.jobs, None
            assert self._group is not None
            self._group.start_soon(self._lay_out_again, build, jobs)
            return
        where = f" (in shard {upload.key})" if upload.shard is not None else ""
        self._fail(upload.paths, f"{upload.error or 'failed'}{where}")
        self._settle(upload.jobs)

    async def _finish_shard(self, build: ShardBuild, etag: str) -> None:
        """The shard is complete: store its index beside it and record every member."""
        assert build.index is not None
        index = build.index
        index_crc = crc32_to_base64(crc32(index))
        await self._request(
            lambda: self.s3.put_object(self.bucket, build.unit.index_key, index, crc32=index_crc)
        )
        crcs = build.crcs
        assert crcs is not None
        content_type_of = self.config.objects.content_type_of
        coding_of = build.unit.coding_of
        stored = build.layout.members  # a coded member's tar entry holds its stored bytes
        members = [
            ManifestRecord(
                path=member.path,
                key=build.unit.key,
                size=member.size,
                mtime_ns=member.mtime_ns,
                mode=member.mode,
                crc32=crc32_to_base64(crcs[n]),
                part_size=0,
                offset=build.layout.data_offset(n),
                etag=etag,
                content_type=content_type_of(member.path),
                coding=coding_of(member.path).to_json(),
                stored_size=-1 if coding_of(member.path).identity else stored[n].size,
            )
            for n, member in enumerate(build.unit.members)
        ]
        shard = ShardRecord(build.unit.key, build.layout.size, etag, len(members))
        self.records.extend(members)
        self.shard_records.append(shard)
        if self.journal is not None:
            self.journal.shard_done(shard, members)
        self.stats.files_done += len(build.unit.members)
        self.stats.shards_done += 1
        self._on_progress(0, len(build.unit.members))

    async def _abort(self, upload: Multipart) -> None:
        if upload.upload_id is None or upload not in self._open_uploads:
            return
        self._open_uploads.discard(upload)
        await self._abort_id(upload.key, upload.upload_id)

    async def _abort_id(self, key: str, upload_id: str) -> None:
        """Abort one upload; one already gone is fine, one that cannot be aborted is reported
        (it stays billed until `s3xfer cleanup`), never raised."""
        try:
            await self._request(
                lambda: self.s3.abort_multipart_upload(self.bucket, key, upload_id=upload_id)
            )
        except NoSuchUploadError:
            pass  # completed or aborted already
        except S3XferError as error:
            self.stats.failures.append(
                (key, f"could not abort multipart upload {upload_id}: {error}")
            )
            return
        if self.journal is not None:
            self.journal.multipart_closed(upload_id)

    def _coder(self, unit: FileUnit | ShardUnit) -> FileCoder:
        return FileCoder(unit.coding, self.frame_key)

    def _attributes(self, path: str | None) -> ObjectAttributes:
        """What the object of the file at `path` carries (--content-type, --storage-class,
        --metadata), or a shard's (path None): application/x-tar."""
        options = self.config.objects
        return ObjectAttributes(
            options.content_type_of(path) if path is not None else SHARD_CONTENT_TYPE,
            options.storage_class,
            options.metadata,
        )

    def _record(self, unit: FileUnit, checksum: str, etag: str) -> None:
        record = ManifestRecord(
            path=unit.path,
            key=unit.key,
            size=unit.size,
            mtime_ns=unit.mtime_ns,
            mode=unit.mode,
            crc32=checksum,
            part_size=unit.part_size,
            etag=etag,
            content_type=self.config.objects.content_type_of(unit.path),
            coding=unit.coding.to_json(),
            stored_size=(
                unit.stored_size
                if unit.coding.identity or unit.stored_size >= 0
                else self._coder(unit).stored_size(unit.size)
            ),
        )
        self.records.append(record)
        if self.journal is not None:
            self.journal.file_done(record)


def _same_file(journaled: FileIdentity | None, now: FileIdentity | None) -> bool:
    """Whether the file a journal saw is this one. The device number is left out: it can
    differ for the same file after a reboot or another mount of a network file system, and
    inode, size, mtime and ctime together already name one version of one file. A journal
    written before identities were recorded says nothing against it."""
    if journaled is None or now is None:
        return True
    return dataclasses.replace(journaled, dev=0) == dataclasses.replace(now, dev=0)


async def _already_uploaded(listed: dict[str, Any], body: bytes | bytearray, crc: int) -> bool:
    """Whether a part S3 already has holds exactly these bytes: by the CRC32 S3 stored with it
    when it lists one, else by its ETag (the MD5 of the part, without SSE-KMS)."""
    if int(listed.get("Size", -1)) != len(body):
        return False
    if listed.get("ChecksumCRC32"):
        return bool(listed["ChecksumCRC32"] == crc32_to_base64(crc))
    md5 = await anyio.to_thread.run_sync(lambda: hashlib.md5(body).hexdigest())
    return bool(str(listed.get("ETag", "")).strip('"') == md5)
