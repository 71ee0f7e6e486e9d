"""Download: restore an s3xfer dataset (loose objects and tar shards) or any plain prefix into
a local directory, verified, resumable, never writing outside it.

For a dataset, the manifest says where every file is: packed files are restored from large
sequential ranged GETs of their shard (nearby members merged, each GET split into files as it
arrives); large objects come in parallel ranged GETs aligned to their upload parts
(rangedl.py); every file is checked against its catalogued CRC32 and gets its mtime and mode
back. For a plain prefix (no manifest), every object is downloaded like `aws s3 cp
--recursive`, with the checksum S3 stored checked where there is one.
"""

from __future__ import annotations

import datetime
import functools
import itertools
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from ..budget import ByteBudget
from ..checksums import crc32, crc32_to_base64
from ..config import MiB, format_size
from ..dataset.keys import S3Url, is_reserved_path, manifest_key, unfinished_upload
from ..dataset.manifest import Manifest
from ..destination import SafeDestination, Staging, make_directory, staging_in, used_by
from ..errors import (
    DestinationError,
    DiskFullError,
    IntegrityError,
    NoSuchKeyError,
    NotFinalizedError,
    NotInDatasetError,
    S3XferError,
    SourceError,
    TransientError,
    UsageError,
    first_error,
)
from ..limits import DEFAULT_LIMITS, RunLimits
from ..malloc import return_large_buffers_promptly
from ..planning.globs import PathFilter
from ..transport.retry import RetryCount, RetryPolicy, call_with_retries
from ..transport.s3 import S3, Connection, open_s3
from ..transport.throttle import TunerSettings
from .decoding import DecodingSource, RecordDecoder
from .rangedl import RangedDownload, RangeSource, download_ranges
from .ranges import DEFAULT_GAP, RangeGet, Wanted, check_ranged_response, coalesce

DEFAULT_RANGE_SIZE = 16 * MiB  # large sequential reads: fewer requests, same memory budget
# What a download keeps in memory for each file it restores (its record, item and target
# path; measured ≈600 bytes): taken out of --max-memory first, so that buffers plus this
# bookkeeping stay within it (buffers always keep room for one range).
BOOKKEEPING_PER_FILE = 600
ProgressCallback = Callable[[int, int], None]  # (bytes, files) increments
StartCallback = Callable[[int, int, int], None]  # (files to fetch, bytes to fetch, skipped)


@dataclass(frozen=True, slots=True)
class Item:
    """One file to restore: where its bytes are, and what it must look like."""

    path: str
    key: str
    size: int
    offset: int  # in its shard; -1 for its own object
    etag: str
    crc32: str | None  # base64, when known
    mtime_ns: int | None
    mode: int | None
    part_size: int  # of the upload, for aligned ranges; 0 when unknown
    coding: str = ""  # how it is stored (docs/format.md, "Coded files"): "" as it is
    stored_size: int = -1  # bytes of the object (or shard) holding it; -1: size

    @property
    def stored(self) -> int:
        return self.size if self.stored_size < 0 else self.stored_size


@dataclass(frozen=True)
class DownloadReport:
    source: str
    dest: str
    kind: str  # "dataset" or "prefix"
    files_downloaded: int
    bytes_downloaded: int
    files_skipped: int  # already present and identical
    files_failed: int
    failures: list[tuple[str, str]]
    refused: list[tuple[str, str]]  # unsafe paths, never written
    seconds: float
    requests: int
    retries: int
    peak_buffered_bytes: int
    max_memory: int  # the budget it ran with: --max-memory, or more when a range needed it
    warnings: list[str] = field(default_factory=list)  # e.g. --max-memory raised, and why
    # What the gate chose and why (AdaptiveGate.summary), as an upload's report says it.
    concurrency: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures and not self.refused

    @property
    def mb_per_s(self) -> float:
        return self.bytes_downloaded / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "extra"}
        data["failures"] = [{"path": p, "error": e} for p, e in self.failures]
        data["refused"] = [{"path": p, "reason": r} for p, r in self.refused]
        data["seconds"] = round(self.seconds, 3)
        data["mb_per_s"] = round(self.mb_per_s, 2)
        return {**data, **self.extra}


def select(items: Sequence[Item], include: Sequence[str], exclude: Sequence[str]) -> list[Item]:
    """Items matching any include glob (all when none given) and no exclude glob."""
    selects = PathFilter(tuple(include), tuple(exclude)).selects
    return [i for i in items if selects(i.path)]


def dataset_items(manifest: Manifest) -> list[Item]:
    return [
        Item(
            r.path,
            r.key,
            r.size,
            r.offset,
            r.etag,
            r.crc32 or None,
            r.mtime_ns,
            r.mode,
            r.part_size,
            r.coding,
            r.stored_size,
        )
        for r in sorted(manifest.records.values(), key=lambda r: r.path)
    ]


def prefix_item(url: S3Url, listed: dict[str, Any]) -> Item:
    key = str(listed["Key"])
    relative = key[len(url.prefix) + 1 :] if url.prefix else key
    modified = listed.get("LastModified")
    mtime_ns = int(modified.timestamp() * 1e9) if isinstance(modified, datetime.datetime) else None
    return Item(
        relative, key, int(listed["Size"]), -1, str(listed.get("ETag", "")), None, mtime_ns, None, 0
    )


def aligned_range_size(part_size: int, preferred: int) -> int:
    """Ranges that each cover whole parts of the upload (S3 serves a range within one part
    from that part alone): the largest multiple of part_size not above `preferred`, at least
    one part. `preferred` itself when the part size is unknown, or so large (over 4 ×
    preferred) that whole parts would leave too few ranges to fetch in parallel."""
    if part_size <= 0 or part_size > 4 * preferred:
        return preferred
    return part_size * max(1, preferred // part_size)


def large_ranges_at_once(concurrency: int, *, max_memory: int, range_size: int) -> int:
    """Ranges of large objects in flight: as many as the budget holds whole (8 of 16 MiB in
    128 MiB, as an upload's parts), at most `concurrency`, at least one. `concurrency` is for
    small objects: 2 x 256 MiB took 1.2 s with 8 or 16 ranges at once, 1.5-2.0 s with 128."""
    return min(concurrency, max(1, max_memory // range_size))


def _member_range(item: Item) -> str:
    return f"bytes={item.offset}-{item.offset + item.size - 1}"


def _writable_directory(dest: Path) -> None:
    """Create dest; fail once, before any GET, when no file can be created in it."""
    make_directory(dest)
    if not os.access(dest, os.W_OK | os.X_OK):
        raise DestinationError(f"cannot write into {dest}: permission denied")


def _local_crc32(path: Path) -> str:
    value = 0
    with path.open("rb") as handle:
        while chunk := handle.read(1024 * 1024):
            value = crc32(chunk, value)
    return crc32_to_base64(value)


def _identical(target: Path, item: Item) -> bool:
    """Already there: same size, and the same CRC32 (or, with none known, the same mtime)."""
    try:
        stat = target.stat()
    except OSError:
        return False
    if not target.is_file() or stat.st_size != item.size:
        return False
    if item.crc32 is not None:
        return _local_crc32(target) == item.crc32
    return item.mtime_ns is not None and stat.st_mtime_ns == item.mtime_ns


@dataclass
class _Preflight:
    """What a download finds in its destination before sending a request."""

    todo: list[Item] = field(default_factory=list)
    targets: dict[str, Path] = field(default_factory=dict)  # by dataset path
    skipped: int = 0  # already there and identical
    refused: list[tuple[str, str]] = field(default_factory=list)  # unsafe paths
    failures: list[tuple[str, str]] = field(default_factory=list)  # there and different


def _preflight(items: list[Item], safe: SafeDestination, overwrite: bool) -> _Preflight:
    """Each item's target under the destination, and whether it must be fetched. Blocking
    file system calls: run in a worker thread."""
    found = _Preflight()
    for item in items:
        try:
            target, present = safe.locate(item.path)  # a file, or a link (even dangling)
        except SourceError as error:
            found.refused.append((item.path, str(error)))
            continue
        if present:
            if _identical(target, item):
                found.skipped += 1
                continue
            if not overwrite:
                found.failures.append((item.path, f"{target} exists and differs (use --overwrite)"))
                continue
        found.targets[item.path] = target
        found.todo.append(item)
    return found


@dataclass
class _Counters:
    files: int = 0
    bytes: int = 0
    retried: RetryCount = field(default_factory=RetryCount)
    failures: list[tuple[str, str]] = field(default_factory=list)


class _Received:
    """Whole files received and checked, waiting to be written: handed over without waiting,
    and taken by the one writer all at once, so that a batch of small objects costs one
    worker-thread call instead of one each (a thread hop was a fifth of the event loop's
    CPU per 16 KiB object)."""

    def __init__(self) -> None:
        self._files: list[tuple[Item, bytes | memoryview]] = []
        self._closed = False
        self._ready = anyio.Event()

    def put(self, item: Item, data: bytes) -> None:
        self._files.append((item, data))
        self._ready.set()

    def close(self) -> None:
        """No more files: `take` returns what is left, then nothing."""
        self._closed = True
        self._ready.set()

    async def take(self) -> list[tuple[Item, bytes | memoryview]]:
        """Every file waiting (at least one), or [] once closed and drained."""
        while not self._files and not self._closed:
            self._ready = anyio.Event()
            await self._ready.wait()
        files, self._files = self._files, []
        return files


class _Restorer:
    def __init__(
        self,
        s3: S3,
        url: S3Url,
        staging: Staging,
        *,
        limits: RunLimits,
        max_memory: int,
        range_size: int,
        gap: int,
        on_progress: ProgressCallback,
    ) -> None:
        """`max_memory`: the budget, limits.max_memory or more (RunLimits.memory_for)."""
        self.s3 = s3
        self.url = url
        self.staging = staging
        self.concurrency = limits.most_in_flight
        self.range_size = range_size
        self.gap = gap
        self.budget = ByteBudget(max_memory)
        # Small objects and shard ranges are fetched by `concurrency` workers, one request
        # each at a time; large objects' ranges by their own tasks, fewer. (Every request also
        # passes the S3 gate, which holds the whole download to `concurrency` in flight.)
        self.limiter = anyio.CapacityLimiter(
            large_ranges_at_once(
                limits.most_in_flight, max_memory=max_memory, range_size=range_size
            )
        )
        self._received = _Received()
        # One batch of small files written at a time: creating files in one directory takes
        # the kernel's lock on it, and threads waiting for that lock spin on a CPU the GETs
        # need (seen as most of a restore's time, on ext4, with 8 batches at once).
        self.file_writer = anyio.Lock()
        self.counters = _Counters()
        self.on_progress = on_progress
        self.policy = RetryPolicy(max_attempts=limits.max_attempts)
        self.targets: dict[str, Path] = {}
        self.decoder: RecordDecoder | None = None  # for coded files

    def _done(self, item: Item, nbytes: int) -> None:
        self.counters.files += 1
        self.counters.bytes += nbytes
        self.on_progress(nbytes, 1)

    async def run(self, items: list[Item], *, listed: int) -> None:
        """Restore items; `listed` files (these and those skipped) are held meanwhile."""
        bookkeeping = min(listed * BOOKKEEPING_PER_FILE, self.budget.capacity - self.range_size)
        if bookkeeping > 0:
            await self.budget.acquire(bookkeeping)
        # Anything larger than a range (a packed member too, however the dataset was packed)
        # comes in ranged GETs written at their offsets: memory stays within the budget.
        # (A coded file by its stored bytes, decoded as they come.)
        packed = [i for i in items if i.offset >= 0 and i.stored <= self.range_size]
        small = [i for i in items if i.offset < 0 and i.stored <= self.range_size]
        large = [i for i in items if i.stored > self.range_size]
        by_path = {i.path: i for i in packed}
        gets = coalesce(
            (Wanted(i.path, i.key, i.offset, i.stored, i.etag) for i in packed if i.size),
            gap=self.gap,
            max_span=self.range_size,
        )
        await self._write_many([(i, b"") for i in packed if i.size == 0])
        # One iterator shared by the workers: each takes the next job as it is free (taking
        # one never awaits, so no two take the same), with no channel to pass through.
        jobs = itertools.chain(
            (functools.partial(self._shard_range, get, by_path) for get in gets),
            (functools.partial(self._object, item) for item in small),
        )
        async with anyio.create_task_group() as writing:
            writing.start_soon(self._write_received)
            try:
                async with anyio.create_task_group() as group:
                    for _ in range(self.concurrency):
                        group.start_soon(self._worker, jobs)
                    # Large objects run their own parallel ranges, within the same budget.
                    for item in large:
                        group.start_soon(self._large, item)
            finally:
                self._received.close()

    async def _worker(self, jobs: Iterator[Callable[[], Awaitable[None]]]) -> None:
        for job in jobs:
            await job()

    async def _get(
        self, key: str, byte_range: str | None, etag: str, *, verify: bool = False
    ) -> tuple[bytes, int, str | None]:
        async def attempt() -> tuple[bytes, int, str | None]:
            return await self.s3.get_range(
                self.url.bucket,
                key,
                byte_range=byte_range,
                if_match=etag or None,
                verify_checksum=verify,
            )

        return await call_with_retries(attempt, policy=self.policy, on_retry=self.counters.retried)

    async def _get_range(self, key: str, get: RangeGet, etag: str, into: memoryview) -> None:
        """One ranged GET, checked (206, the asked Content-Range, every byte), into `into`."""
        where = f"s3://{self.url.bucket}/{key}"

        def check(status: int, content_range: str | None, length: int) -> None:
            check_ranged_response(
                get,
                status=status,
                content_range=content_range,
                body_length=len(into) if length < 0 else length,
                where=where,
            )

        async def attempt() -> None:
            length = await self.s3.get_range_to(
                self.url.bucket,
                key,
                byte_range=get.header,
                if_match=etag or None,
                on_head=check,
                sink=into,  # received straight into the range's buffer
            )
            if length < len(into):  # a connection cut short: worth another try
                raise TransientError(
                    f"{where} ({get.header}): truncated response, {length} of {len(into)} bytes"
                )

        await call_with_retries(attempt, policy=self.policy, on_retry=self.counters.retried)

    async def _shard_range(self, get: RangeGet, by_path: dict[str, Item]) -> None:
        """One sequential ranged GET of a shard, split into its member files as it arrives.
        Each member is checked against its own CRC32: one that does not match fails alone,
        its neighbours are written."""
        size = get.end - get.start
        where = f"s3://{self.url.bucket}/{get.key}"
        mismatched: set[str] = set()
        try:
            if size > self.budget.capacity:  # overlapping members, merged into one range
                raise IntegrityError(
                    f"{where}: members overlap over {size} bytes, more than --max-memory"
                )
            await self.budget.acquire(size)
            try:
                view = memoryview(bytearray(size))  # members are views of it: no copy per file
                await self._get_range(get.key, get, get.etag, view)
                files: list[tuple[Item, bytes | memoryview]] = []
                for member in get.members:
                    start = member.offset - get.start
                    item = by_path[member.path]
                    data: bytes | memoryview = view[start : start + member.size]
                    if item.coding:
                        try:
                            data = await self._decode(item, data)
                        except IntegrityError as error:
                            mismatched.add(item.path)
                            self.counters.failures.append((item.path, str(error)))
                            continue
                    files.append((item, data))
                crcs = await anyio.to_thread.run_sync(
                    lambda: [crc32_to_base64(crc32(data)) for _, data in files]
                )
                good: list[tuple[Item, bytes | memoryview]] = []
                for (item, data), crc in zip(files, crcs, strict=True):
                    if item.crc32 is not None and crc != item.crc32:
                        mismatched.add(item.path)
                        self.counters.failures.append(
                            (item.path, f"checksum mismatch in {where} ({_member_range(item)})")
                        )
                    else:
                        good.append((item, data))
                await self._write_many(good)
            finally:
                self.budget.release(size)
        except DiskFullError:
            raise  # every other file would fail the same way: stop the download
        except S3XferError as error:
            self.counters.failures.extend(
                (m.path, str(error)) for m in get.members if m.path not in mismatched
            )

    async def _object(self, item: Item) -> None:
        """One small object, fetched whole and checked, then handed to the writer (its bytes
        stay counted in the budget until they are written)."""
        where = f"s3://{self.url.bucket}/{item.key}"
        try:
            await self.budget.acquire(item.size)
            handed = False
            try:
                body, _status, _range = await self._get(item.key, None, item.etag, verify=True)
                if len(body) != item.stored:
                    raise IntegrityError(f"{where}: {len(body)} bytes, expected {item.stored}")
                if item.coding:
                    body = await self._decode(item, body)
                if item.crc32 is not None and crc32_to_base64(crc32(body)) != item.crc32:
                    raise IntegrityError(f"{item.path}: checksum mismatch in {where}")
                self._received.put(item, body)
                handed = True
            finally:
                if not handed:
                    self.budget.release(item.size)
        except S3XferError as error:
            self.counters.failures.append((item.path, str(error)))

    async def _write_received(self) -> None:
        """Write the small objects as they arrive, in batches; a full disk stops the download."""
        while files := await self._received.take():
            try:
                await self._write_many(files)
            finally:
                self.budget.release(sum(item.size for item, _ in files))

    async def _large(self, item: Item) -> None:
        try:
            part_size, crc32 = item.part_size, item.crc32
            if item.offset >= 0:
                part_size = 0  # the shard's parts, not the member's: any range will do
            elif not part_size and crc32 is None:  # not s3xfer's: ask S3 how it was uploaded
                part_size, crc32 = await self._layout(item)
            source: RangeSource = self.s3
            if item.coding:  # ranges of the original, each fetched as its frames and decoded
                assert self.decoder is not None
                source = DecodingSource(self.s3, self.decoder, item, base=max(item.offset, 0))
            job = RangedDownload(
                bucket=self.url.bucket,
                key=item.key,
                size=item.size,
                etag=item.etag,
                dest=self.targets[item.path],
                partial=self.staging.partial(item.path),
                mtime_ns=item.mtime_ns,
                mode=item.mode,
                expected_crc32=crc32,
                offset=0 if item.coding else max(item.offset, 0),
            )
            result = await download_ranges(
                source,
                job,
                range_size=aligned_range_size(part_size, self.range_size),
                limiter=self.limiter,
                budget=self.budget,
                on_progress=lambda n: self.on_progress(n, 0),
                policy=self.policy,
                on_retry=self.counters.retried,
            )
        except DiskFullError:
            raise
        except S3XferError as error:
            self.counters.failures.append((item.path, str(error)))
            return
        self.counters.files += 1
        self.counters.bytes += result.bytes_fetched
        self.on_progress(0, 1)

    async def _decode(self, item: Item, stored: bytes | memoryview) -> bytes:
        assert self.decoder is not None
        return await self.decoder.decode(self.s3, item, stored)

    async def _layout(self, item: Item) -> tuple[int, str | None]:
        """The part size and whole-object CRC32 S3 reports for item (0 and None when it
        reports neither, or refuses to say: the download then goes on without them)."""
        try:
            layout = await call_with_retries(
                lambda: self.s3.object_layout(self.url.bucket, item.key, etag=item.etag),
                policy=self.policy,
                on_retry=self.counters.retried,
            )
        except S3XferError:
            return 0, None  # a GET that fails the same way names the problem
        return layout.part_size, layout.crc32

    async def _write_many(self, files: list[tuple[Item, bytes | memoryview]]) -> None:
        batch = [
            (
                self.targets[item.path],
                data,
                item.mtime_ns if item.mtime_ns is not None else time.time_ns(),
                item.mode if item.mode is not None else 0o644,
            )
            for item, data in files
        ]
        async with self.file_writer:
            errors = await self.staging.write_files(batch)
        for (item, data), error in zip(files, errors, strict=True):
            if error is None:
                self._done(item, len(data))
            else:  # each file fails alone, with its own error
                self.counters.failures.append((item.path, str(error)))


async def download(
    url: S3Url,
    dest: Path,
    *,
    connection: Connection | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    overwrite: bool = False,
    limits: RunLimits = DEFAULT_LIMITS,
    range_size: int = DEFAULT_RANGE_SIZE,
    gap: int = DEFAULT_GAP,
    on_start: StartCallback | None = None,
    on_progress: ProgressCallback | None = None,
    unfinished: bool = False,
    encryption_key: bytes | None = None,
) -> DownloadReport:
    """Restore `url` (an s3xfer dataset, or any prefix) into `dest`. Files already present and
    identical are skipped, so running it again after it finished transfers nothing. A prefix
    without a manifest that holds s3xfer's objects of an unfinished upload (slices not
    finalized) is refused with NotFinalizedError, unless `unfinished`: then the objects there
    are downloaded as a plain prefix's. `limits`: requests in flight, memory, attempts; a
    --max-memory below one range is raised to it, and the report says so."""
    if await anyio.Path(dest).exists() and not await anyio.Path(dest).is_dir():
        raise UsageError(f"not a directory: {dest}")
    return_large_buffers_promptly()
    started = time.perf_counter()
    policy = RetryPolicy(max_attempts=limits.max_attempts)
    looked_up = RetryCount()  # retries of the manifest read and the listing, in the report too
    async with open_s3(
        connection or Connection(),
        max_pool_connections=limits.concurrency,
        tuner=TunerSettings() if limits.auto_concurrency else None,
    ) as s3:
        await s3.prepare_reads(url.bucket)
        try:
            raw = await call_with_retries(
                lambda: s3.get_object(url.bucket, manifest_key(url)),
                policy=policy,
                on_retry=looked_up,
            )
        except NoSuchKeyError:
            kind = "prefix"
            listing_prefix = f"{url.prefix}/" if url.prefix else ""
            listed_items = [
                prefix_item(url, listed)
                async for listed in s3.list_objects(
                    url.bucket, listing_prefix, policy=policy, on_retry=looked_up
                )
                if not str(listed["Key"]).endswith("/")
            ]
            pending = unfinished_upload(url, (i.path for i in listed_items))
            if pending is not None and not unfinished:
                raise NotFinalizedError(pending) from None
            # s3xfer's own objects (of an upload not finalized) are not files of the prefix.
            items = [i for i in listed_items if not is_reserved_path(i.path)]
        else:
            kind = "dataset"
            where = f"s3://{url.bucket}/{manifest_key(url)}"
            items = dataset_items(Manifest.from_bytes(raw, where=where))
        if not items:
            raise NotInDatasetError(f"nothing to download: no dataset and no objects at {url}")
        every_path = [i.path for i in items]  # the staging directory's name must be none of them
        items = select(items, include, exclude)
        if not items:
            globs = " ".join(
                [*(f"--include {g}" for g in include), *(f"--exclude {g}" for g in exclude)]
            )
            raise NotInDatasetError(f"no file of {url} matches {globs}")
        decoder = RecordDecoder(
            url, encryption_key, policy=RetryPolicy(max_attempts=limits.max_attempts)
        )
        await decoder.ready(s3, items)  # no key, wrong key: before anything is written
        await anyio.to_thread.run_sync(_writable_directory, dest)

        safe = SafeDestination(dest)
        # One worker-thread call for the whole pass: an lstat per file (and a read of each
        # file already there) must not block the event loop, nor cost a thread hop each.
        preflight = await anyio.to_thread.run_sync(_preflight, items, safe, overwrite)
        todo, targets, skipped = preflight.todo, preflight.targets, preflight.skipped
        refused, failures = preflight.refused, preflight.failures
        if on_start is not None:
            on_start(len(todo), sum(i.size for i in todo), skipped)
        # The most held whole at once: one range, or the largest file smaller than a range.
        largest = min(range_size, max((i.size for i in todo), default=0))
        budget = limits.memory_for(
            largest,
            what=f"one range of {format_size(largest)} (--range-size {format_size(range_size)})",
        )
        async with staging_in(safe.root, in_use=used_by(every_path)) as staging:
            del every_path
            restorer = _Restorer(
                s3,
                url,
                staging,
                limits=limits,
                max_memory=budget.capacity,
                range_size=range_size,
                gap=gap,
                on_progress=on_progress or (lambda _b, _f: None),
            )
            restorer.targets = targets
            restorer.decoder = decoder
            with first_error():
                await restorer.run(todo, listed=len(items))
        counters = restorer.counters
        return DownloadReport(
            source=str(url),
            dest=str(dest),
            kind=kind,
            files_downloaded=counters.files,
            bytes_downloaded=counters.bytes,
            files_skipped=skipped,
            files_failed=len(failures) + len(counters.failures),
            failures=sorted(failures + counters.failures),
            refused=refused,
            seconds=time.perf_counter() - started,
            requests=s3.requests,
            retries=looked_up.retries + counters.retried.retries,
            peak_buffered_bytes=restorer.budget.peak,
            max_memory=budget.capacity,
            warnings=[budget.raised] if budget.raised else [],
            concurrency=s3.gate.summary() if s3.gate else {},
        )
