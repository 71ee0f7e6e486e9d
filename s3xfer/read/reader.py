"""Reading files out of an s3xfer dataset: any file, packed or not, with one ranged GET,
verified against its catalogued CRC32; many files with nearby ranges merged into one GET.

    async with Dataset("s3://bucket/data") as ds:
        image = await ds.read("images/07/img_00742.jpg")
        batch = await ds.read_many(paths)          # coalesced, concurrent

    with SyncDataset("s3://bucket/data") as ds:    # the same from synchronous code
        image = ds.read("images/07/img_00742.jpg")
        for path, data in ds.iter_epoch(seed=7):   # every file once, shuffled, big reads
            ...
"""

from __future__ import annotations

import datetime
import io
import os
import sys
import threading
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from concurrent.futures import Future
from contextlib import AsyncExitStack, aclosing
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, cast

import anyio

from ..budget import ByteBudget
from ..checksums import crc32, crc32_to_base64
from ..config import DEFAULT_MAX_MEMORY
from ..dataset import catalog
from ..dataset.keys import (
    LEASE_NAME,
    META_DIR,
    SLICES_DIR,
    S3Url,
    enclosing_prefixes,
    manifest_key,
    unfinished_upload,
)
from ..dataset.manifest import Manifest, ManifestRecord
from ..errors import (
    IntegrityError,
    NoDatasetError,
    NoSuchKeyError,
    NotFinalizedError,
    NotInDatasetError,
    PartialReadError,
    S3XferError,
    TransientError,
    UsageError,
    first_error,
    first_leaf,
)
from ..limits import RunLimits
from ..localfs import SafeDestination, make_directory, staging_in, used_by
from ..planning.globs import path_matcher
from ..transport.retry import RetryPolicy, call_with_retries
from ..transport.s3 import S3, Connection, open_s3
from .epoch import (
    DEFAULT_BLOCK_BYTES,
    DEFAULT_BUFFER_BYTES,
    EpochState,
    ReaderPlan,
)
from .ranges import DEFAULT_GAP, RangeGet, Wanted, check_ranged_response, coalesce

if TYPE_CHECKING:
    from anyio.from_thread import BlockingPortal
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

OBJECT_RANGE = 8 * 1024 * 1024  # a plain object is streamed in ranges of this size

GET_BATCH_BYTES = 64 * 1024 * 1024  # `get` fetches and writes this much at a time
# An epoch hands its files to the consumer in batches of at most this many (one portal call
# each for SyncDataset), or fewer when the next file is still being read.
EPOCH_BATCH_FILES = 256


@dataclass
class ReadStats:
    gets: int = 0  # data GETs (catalog reads not included)
    bytes_fetched: int = 0
    files: int = 0
    retries: int = 0


@dataclass(frozen=True)
class GetReport:
    files: int
    bytes: int
    gets: int
    catalog_requests: int
    seconds: float
    written: list[str] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    max_memory: int = 0  # the budget it ran with: max_memory, or a larger file's size
    warnings: list[str] = field(default_factory=list)  # e.g. max_memory raised, and why

    def to_json(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "bytes": self.bytes,
            "gets": self.gets,
            "catalog_requests": self.catalog_requests,
            "seconds": round(self.seconds, 3),
            "failures": [{"path": p, "error": e} for p, e in self.failures],
            "max_memory": self.max_memory,
            "warnings": self.warnings,
        }


@dataclass(frozen=True, slots=True)
class StoredObject:
    """An object under a prefix that holds no s3xfer dataset, as S3 lists it."""

    key: str
    path: str  # relative to the prefix
    size: int
    last_modified: datetime.datetime
    etag: str
    storage_class: str

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "key": self.key,
            "size": self.size,
            "last_modified": self.last_modified.isoformat(),
            "etag": self.etag,
            "storage_class": self.storage_class,
        }


class Dataset:
    """An uploaded dataset, opened for reading. Use as `async with Dataset(url) as ds`."""

    def __init__(
        self,
        url: str | S3Url,
        *,
        connection: Connection | None = None,
        concurrency: int = 16,
        gap: int = DEFAULT_GAP,
        max_attempts: int = 10,
        max_timeouts: int | None = None,
        unfinished: bool = False,
    ) -> None:
        """`unfinished`: a prefix where an s3xfer upload has not finished (no manifest yet) is
        taken for a plain prefix (NoDatasetError) instead of refused (NotFinalizedError)."""
        self.url = S3Url.parse(url) if isinstance(url, str) else url
        self.unfinished = unfinished
        self.connection = connection or Connection()
        self.concurrency = concurrency
        self.gap = gap
        self.stats = ReadStats()
        # max_timeouts: read timeouts one request may have before it fails (RetryPolicy).
        self._policy = RetryPolicy(max_attempts=max_attempts, max_timeouts=max_timeouts)
        self._stack = AsyncExitStack()
        self._s3: S3 | None = None
        self._pid = -1  # the process that opened it
        self._root: catalog.CatalogRoot | None = None
        self._pieces: dict[int, dict[str, ManifestRecord]] = {}
        self._piece_locks: dict[int, anyio.Lock] = {}
        self._limiter = anyio.CapacityLimiter(concurrency)

    def __repr__(self) -> str:
        return f"<Dataset {self.url} pieces_cached={len(self._pieces)} gets={self.stats.gets}>"

    async def __aenter__(self) -> Self:
        # No request yet: a path's catalog piece is found from the path alone.
        self._s3 = await self._stack.enter_async_context(
            open_s3(self.connection, max_pool_connections=self.concurrency)
        )
        self._pid = os.getpid()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()

    @property
    def s3(self) -> S3:
        if self._s3 is None:
            raise S3XferError("the dataset is not open: use `async with Dataset(...)`")
        if self._pid != os.getpid():  # its connections belong to the parent's event loop
            raise S3XferError(
                "a Dataset opened before os.fork() cannot be used in the child: open one per "
                "process (or use SyncDataset, which reopens itself in a forked child)"
            )
        return self._s3

    @property
    def catalog_requests(self) -> int:
        return self.s3.requests - self.stats.gets

    async def _get(self, key: str) -> bytes:
        return await call_with_retries(
            lambda: self.s3.get_object(self.url.bucket, key), policy=self._policy
        )

    async def root(self) -> catalog.CatalogRoot:
        """The catalog root (totals, shards): one small GET, cached."""
        if self._root is None:
            key = catalog.root_key(self.url)
            try:
                raw = await self._get(key)
            except NoSuchKeyError as exc:
                raise await self._no_dataset(f"no catalog at s3://{self.url.bucket}/{key}") from exc
            self._root = catalog.CatalogRoot.from_bytes(raw, where=f"s3://{self.url.bucket}/{key}")
        return self._root

    async def _no_dataset(self, missing: str) -> NotInDatasetError:
        """The error for a prefix without its catalog or manifest (`missing` says which):
        NotFinalizedError when s3xfer's objects of an unfinished upload are there (unless
        `unfinished`), else NoDatasetError (it may hold plain objects)."""
        if not self.unfinished:
            pending = unfinished_upload(self.url, await self._own_objects())
            if pending is not None:
                return NotFinalizedError(pending)
        return NoDatasetError(f"no s3xfer dataset at {self.url} ({missing})")

    async def _own_objects(self) -> list[str]:
        """Paths (below the URL's prefix) of s3xfer objects there, enough for unfinished_upload
        to judge: the first slice result, and the first other object that is not the lease.
        Two LISTs, each stopped at its first answer that counts."""
        inside = self.url.key("")
        found: list[str] = []
        for under in (SLICES_DIR, f"{META_DIR}/"):
            listing = cast(  # an async generator: closed here, not left for the collector
                AsyncGenerator[dict[str, Any], None],
                self.s3.list_objects(self.url.bucket, inside + under),
            )
            async with aclosing(listing):
                async for item in listing:
                    path = str(item["Key"])[len(inside) :]
                    if path != LEASE_NAME:
                        found.append(path)
                        break
        return found

    async def _piece(self, bucket: int) -> dict[str, ManifestRecord]:
        lock = self._piece_locks.setdefault(bucket, anyio.Lock())
        async with lock:
            if bucket not in self._pieces:
                key = catalog.piece_key(self.url, bucket)
                try:
                    raw = await self._get(key)
                except NoSuchKeyError:
                    await self.root()  # no dataset at all: say so, rather than "no such path"
                    self._pieces[bucket] = {}
                else:
                    self._pieces[bucket] = catalog.parse_piece(
                        raw,
                        fanout=catalog.FANOUT,
                        bucket=bucket,
                        where=f"s3://{self.url.bucket}/{key}",
                    )
            return self._pieces[bucket]

    async def stat(self, path: str) -> ManifestRecord:
        """Where a file's bytes are: its catalog record. One small GET when not cached."""
        record = (await self._piece(catalog.bucket_of(path))).get(path)
        if record is None:
            raise NotInDatasetError(f"{path!r} is not in the dataset {self.url}")
        return record

    async def _manifest(self) -> tuple[Manifest, str]:
        """The manifest (every file), and a fingerprint of it: the CRC32 of its bytes."""
        key = manifest_key(self.url)
        try:
            raw = await self._get(key)
        except NoSuchKeyError as exc:
            raise await self._no_dataset(f"no manifest at s3://{self.url.bucket}/{key}") from exc
        manifest = Manifest.from_bytes(raw, where=f"s3://{self.url.bucket}/{key}")
        return manifest, f"{crc32(raw):08x}"

    async def ls(self, pattern: str | None = None) -> list[ManifestRecord]:
        """Every file of the dataset (matching a glob, if given), sorted by path."""
        manifest, _ = await self._manifest()
        records = sorted(manifest.records.values(), key=lambda r: r.path)
        if pattern is not None:
            matches = path_matcher([pattern])
            records = [r for r in records if matches(r.path)]
        return records

    async def ls_objects(self, pattern: str | None = None) -> AsyncIterator[StoredObject]:
        """Every object under the URL's prefix (matching a glob on the path below it, if
        given), in key order, streamed page by page: for prefixes that are not s3xfer
        datasets, as `aws s3 ls --recursive` lists them."""
        prefix = f"{self.url.prefix}/" if self.url.prefix else ""
        matches = path_matcher([pattern]) if pattern is not None else None
        async for item in self.s3.list_objects(self.url.bucket, prefix):
            key = str(item["Key"])
            path = key[len(prefix) :]
            if not path or (matches is not None and not matches(path)):
                continue
            yield StoredObject(
                key=key,
                path=path,
                size=int(item["Size"]),
                last_modified=item["LastModified"],
                etag=str(item.get("ETag", "")),
                storage_class=str(item.get("StorageClass", "STANDARD")),
            )

    async def read_object(
        self,
        path: str,
        sink: Callable[[bytes], Awaitable[None]],
        *,
        range_size: int = OBJECT_RANGE,
    ) -> int:
        """A plain object, not a dataset's file: `path` below the URL's prefix ("" for the
        object the URL names), streamed to `sink` in ranges of `range_size` bytes (memory
        stays bounded), all of the same object (If-Match on the ETag HEAD saw). One that fits
        one GET is checked against the checksum S3 stored with it, when there is one."""
        bucket, key = self.url.bucket, self.url.key(path) if path else self.url.prefix
        head = await call_with_retries(
            lambda: self.s3.head_object(bucket, key), policy=self._policy
        )
        size, etag = int(head["ContentLength"]), str(head["ETag"])
        if size <= range_size:
            body, _, _ = await call_with_retries(
                lambda: self.s3.get_range(
                    bucket, key, byte_range=None, if_match=etag, verify_checksum=True
                ),
                policy=self._policy,
            )
            if len(body) != size:
                raise IntegrityError(f"s3://{bucket}/{key}: {len(body)} bytes, expected {size}")
            await sink(body)
            return size
        for start in range(0, size, range_size):
            get = RangeGet(key, start, min(size, start + range_size), (), etag)

            async def attempt(get: RangeGet = get) -> bytes:
                body, status, content_range = await self.s3.get_range(
                    bucket, key, byte_range=get.header, if_match=etag
                )
                check_ranged_response(
                    get,
                    status=status,
                    content_range=content_range,
                    body_length=len(body),
                    where=f"s3://{bucket}/{key}",
                )
                return body

            await sink(await call_with_retries(attempt, policy=self._policy))
        return size

    def iter_epoch(
        self,
        seed: int,
        *,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pattern: str | Sequence[str] | None = None,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        block_bytes: int = DEFAULT_BLOCK_BYTES,
    ) -> Epoch:
        """This reader's share of a shuffled epoch: every file of the dataset (matching the
        globs, if given) once across `world_size` ranks (and the DataLoader workers of each),
        in an order fixed by (seed, epoch). Neighbouring members of a shard are read as blocks
        of up to `block_bytes` with one GET each, the blocks in shuffled order, the files
        shuffled again in a pool; at most `buffer_bytes` of files are held. Iterate it inside
        `async with` (it reads ahead in a task group); `state_dict()` resumes it."""
        return Epoch(
            self,
            epoch_state(
                seed,
                epoch=epoch,
                rank=rank,
                world_size=world_size,
                pattern=pattern,
                buffer_bytes=buffer_bytes,
                block_bytes=block_bytes,
            ),
        )

    async def _epoch_records(self, patterns: Sequence[str]) -> tuple[list[ManifestRecord], str]:
        """The files of an epoch in path order, and the manifest's fingerprint. The whole
        manifest is parsed (it is one object); the caller keeps only its own share."""
        manifest, fingerprint = await self._manifest()
        matches = path_matcher(patterns) if patterns else None
        records = sorted(
            (r for r in manifest.records.values() if matches is None or matches(r.path)),
            key=lambda r: r.path,
        )
        return records, fingerprint

    async def read(self, path: str) -> bytes:
        """One file's bytes: one ranged GET (when the catalog piece is cached), verified."""
        data, failures = await self._fetch([await self.stat(path)])
        if failures:
            raise failures[path]
        return data[path]

    async def read_many(self, paths: Sequence[str]) -> dict[str, bytes]:
        """Many files at once: nearby ranges of a shard merged into one GET, GETs concurrent.
        Each file is checked on its own: when some fail, PartialReadError names only those and
        carries the verified bytes of the others."""
        records: dict[str, ManifestRecord] = {}

        async def find(path: str) -> None:
            records[path] = await self.stat(path)

        with first_error():
            async with anyio.create_task_group() as group:
                for path in dict.fromkeys(paths):
                    group.start_soon(find, path)
        data, failures = await self._fetch([records[p] for p in dict.fromkeys(paths)])
        if failures:
            raise PartialReadError(data, failures)
        return data

    async def open(self, path: str) -> io.BytesIO:
        """A file-like object over one file's (verified) bytes."""
        return io.BytesIO(await self.read(path))

    async def _fetch(
        self, records: Iterable[ManifestRecord]
    ) -> tuple[dict[str, bytes], dict[str, S3XferError]]:
        """The verified bytes of every record, and why each of the others failed. Every file
        is checked against its own CRC32, so one bad record never fails its neighbours in a
        merged GET. A GET that fails as a whole (the object is gone or was replaced) fails
        its members; errors that would fail every GET alike (access, endpoint) are raised."""
        by_path = {r.path: r for r in records}
        wanted = [
            Wanted(r.path, r.key, r.offset if r.packed else 0, r.size, r.etag)
            for r in by_path.values()
        ]
        out: dict[str, bytes] = {r.path: b"" for r in by_path.values() if r.size == 0}
        failures: dict[str, S3XferError] = {}

        async def run(get: RangeGet) -> None:
            try:
                async with self._limiter:
                    body = await self._range_get(get, by_path)
            except (IntegrityError, NoSuchKeyError) as exc:  # say which files, not only where
                for member in get.members:
                    failures[member.path] = type(exc)(f"{member.path}: {exc}")
                return
            for member in get.members:
                data = get.slice_of(body, member)
                record = by_path[member.path]
                if crc32_to_base64(crc32(data)) != record.crc32:
                    where = f"s3://{self.url.bucket}/{get.key}"
                    span = f"bytes={member.offset}-{member.offset + member.size - 1}"
                    failures[member.path] = IntegrityError(
                        f"{member.path}: checksum mismatch in {where} ({span}): the stored "
                        "bytes are not the catalogued ones"
                    )
                    continue
                out[member.path] = data
                self.stats.files += 1

        with first_error():
            async with anyio.create_task_group() as group:
                for get in coalesce(wanted, gap=self.gap):
                    group.start_soon(run, get)
        return out, failures

    async def _range_get(self, get: RangeGet, by_path: dict[str, ManifestRecord]) -> bytes:
        first = by_path[get.members[0].path]
        whole_object = not first.packed
        where = f"s3://{self.url.bucket}/{get.key}"

        async def attempt() -> bytes:
            self.stats.gets += 1
            body, status, content_range = await self.s3.get_range(
                self.url.bucket,
                get.key,
                byte_range=None if whole_object else get.header,
                if_match=get.etag or None,
            )
            # A body cut short by the connection raises in the transport; an answer that is
            # complete but of another size than catalogued will be the same next time: an
            # IntegrityError, not retried.
            if whole_object:
                if len(body) != first.size:
                    raise IntegrityError(f"{where}: {len(body)} bytes, catalogued {first.size}")
            else:
                check_ranged_response(
                    get,
                    status=status,
                    content_range=content_range,
                    body_length=len(body),
                    where=where,
                )
            self.stats.bytes_fetched += len(body)
            return body

        def count(_error: TransientError) -> None:
            self.stats.retries += 1

        return await call_with_retries(attempt, policy=self._policy, on_retry=count)

    async def get(
        self,
        patterns: Sequence[str],
        dest: Path,
        *,
        overwrite: bool = False,
        max_memory: int = DEFAULT_MAX_MEMORY,
    ) -> GetReport:
        """Fetch every file matching any glob into dest (created), with its mtime and mode.
        Files are fetched in batches of at most `max_memory` bytes (and GET_BATCH_BYTES); a
        file larger than `max_memory` is a batch of its own, and the report says so."""
        started = anyio.current_time()
        if await anyio.Path(dest).exists() and not await anyio.Path(dest).is_dir():
            raise UsageError(f"not a directory: {dest}")
        matches = path_matcher(patterns)
        matched = {r.path: r for r in await self.ls() if matches(r.path)}
        if not matched:
            raise NotInDatasetError(f"no file of {self.url} matches {' '.join(patterns)}")
        failures: list[tuple[str, str]] = []
        targets: dict[str, Path] = {}
        safe = SafeDestination(dest)
        for path in list(matched):
            try:
                target = safe(path)
                if target.exists() and not overwrite:
                    raise S3XferError(f"{target} exists (use --overwrite)")
                targets[path] = target
            except S3XferError as error:
                failures.append((path, str(error)))
                del matched[path]
        # In batches of at most 64 MiB and max_memory, in storage order: memory stays bounded
        # whatever the glob matched, and each batch's files are written in one worker-thread
        # call. Each file is checked whole before it is written: one larger than max_memory
        # raises the budget to its size (said in the report).
        ordered = sorted(matched.values(), key=lambda r: (r.key, r.offset))
        largest = max(ordered, key=lambda r: r.size, default=None)
        budget = RunLimits(max_memory=max_memory).memory_for(
            largest.size if largest else 0,
            what=f"the file {largest.path if largest else ''!r}, checked before it is written,",
        )
        batch_bytes = min(GET_BATCH_BYTES, max_memory)
        batch: list[ManifestRecord] = []
        held = 0
        written: list[ManifestRecord] = []
        await anyio.to_thread.run_sync(make_directory, safe.root)
        async with staging_in(safe.root, in_use=used_by(list(matched))) as staging:
            for index, record in enumerate(ordered):
                batch.append(record)
                held += record.size
                following = ordered[index + 1].size if index + 1 < len(ordered) else None
                if following is None or held + following > batch_bytes:
                    data, failed = await self._fetch(batch)
                    failures.extend((path, str(error)) for path, error in failed.items())
                    good = [r for r in batch if r.path not in failed]
                    errors = await staging.write_files(
                        [(targets[r.path], data[r.path], r.mtime_ns, r.mode) for r in good]
                    )
                    for r, write_error in zip(good, errors, strict=True):
                        if write_error is None:
                            written.append(r)
                        else:  # each file fails alone, with its own error
                            failures.append((r.path, str(write_error)))
                    batch, held = [], 0
        return GetReport(
            files=len(written),
            bytes=sum(r.size for r in written),
            gets=self.stats.gets,
            catalog_requests=self.catalog_requests,
            seconds=anyio.current_time() - started,
            written=sorted(r.path for r in written),
            failures=sorted(failures),
            max_memory=budget.capacity,
            warnings=[budget.raised] if budget.raised else [],
        )


async def read_enclosed(url: S3Url, **options: Any) -> tuple[S3Url, str, bytes] | None:
    """The file a URL names inside a dataset at a prefix above it (s3://b/ds/img/1.jpg: the
    file img/1.jpg of the dataset s3://b/ds), for when no object has that key: the dataset's
    URL, the path and the verified bytes; None when no prefix above holds a dataset, and
    NotInDatasetError when the nearest that does has no such file. One small GET per prefix
    tried (its catalog root), nearest first. `options` as for Dataset."""
    for dataset_url, path in enclosing_prefixes(url):
        async with Dataset(dataset_url, **{**options, "unfinished": True}) as dataset:
            try:
                await dataset.root()
            except NoDatasetError:
                continue
            return dataset_url, path, await dataset.read(path)
    return None


def dataloader_worker() -> tuple[int, int]:
    """(worker id, number of workers) of the torch DataLoader worker this runs in; (0, 1)
    outside one. torch is never imported here: a DataLoader worker has it loaded already."""
    data = sys.modules.get("torch.utils.data")
    info = data.get_worker_info() if data is not None else None
    return (0, 1) if info is None else (int(info.id), int(info.num_workers))


def epoch_state(
    seed: int,
    *,
    epoch: int,
    rank: int,
    world_size: int,
    pattern: str | Sequence[str] | None,
    buffer_bytes: int,
    block_bytes: int,
) -> EpochState:
    """The start of one reader's epoch, split by DataLoader worker inside one."""
    worker, num_workers = dataloader_worker()
    patterns = () if pattern is None else (pattern,) if isinstance(pattern, str) else pattern
    return EpochState(
        seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        worker=worker,
        num_workers=num_workers,
        block_bytes=block_bytes,
        buffer_bytes=buffer_bytes,
        patterns=tuple(patterns),
    )


@dataclass
class EpochStats:
    files: int = 0  # handed out so far by this iterator
    bytes: int = 0
    blocks: int = 0  # segments read: one coalesced GET each (a loose file: its own GET)
    # File bytes read ahead or in flight, in the shuffle pool, or handed out and not yet
    # done with (the consumer asks for the next batch): at most buffer_bytes, unless one file
    # alone is larger than the read-ahead (a quarter of it).
    bytes_held: int = 0
    peak_bytes_held: int = 0


Batch = list[tuple[str, bytes]]


@dataclass
class _Block:
    """A segment being read: its files' verified bytes, taken out as they are handed on."""

    ready: anyio.Event
    data: dict[str, bytes] = field(default_factory=dict)
    error: S3XferError | None = None
    unreleased: int = 0  # bytes of the budget it still holds


class Epoch:
    """One reader's share of a shuffled epoch (`Dataset.iter_epoch`): an async iterator of
    (path, bytes), used inside `async with`, which runs the read-ahead in a task group:

        async with ds.iter_epoch(seed=7, rank=rank, world_size=world) as epoch:
            async for path, data in epoch:
                ...
            saved = epoch.state_dict()  # small JSON; load_state_dict(saved) resumes there

    A producer task walks the pure schedule (s3xfer/read/epoch.py) and hands files on in batches;
    a read-ahead task reads the segments in order, as many at once as a ByteBudget of
    buffer_bytes and the dataset's concurrency allow. The bytes of a batch go back to the
    budget when the consumer asks for the next one."""

    def __init__(
        self, dataset: Dataset, state: EpochState, *, stats: EpochStats | None = None
    ) -> None:
        self._dataset = dataset
        self._state = state
        self.stats = stats or EpochStats()
        self.position = state.position  # files handed out (by __anext__) since the start
        self.catalog = state.catalog  # the manifest's fingerprint, once read
        self._receive: MemoryObjectReceiveStream[tuple[Batch, int]] | None = None
        self._batch: deque[tuple[str, bytes]] = deque()
        self._handed = 0  # budget bytes of the batch last handed out
        self._budget: ByteBudget | None = None
        self._failure: BaseException | None = None
        self._scope: anyio.CancelScope | None = None
        self._finished: anyio.Event | None = None
        self._closing = False
        self._stack = AsyncExitStack()

    @property
    def dataset(self) -> Dataset:
        return self._dataset

    def __repr__(self) -> str:
        s = self._state
        return (
            f"<Epoch seed={s.seed} epoch={s.epoch} reader={s.reader}/{s.readers} "
            f"position={self.position} held={self.stats.bytes_held}>"
        )

    def state_dict(self) -> dict[str, Any]:
        return replace(self._state, position=self.position, catalog=self.catalog).to_json()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at a saved state (same reader and shape), before iterating."""
        if self._receive is not None:
            raise UsageError("load_state_dict() must come before the epoch is iterated")
        self._state = self._state.resumed_from(EpochState.from_json(state))
        self.position, self.catalog = self._state.position, self._state.catalog

    async def __aenter__(self) -> Self:
        send = self._begin()
        group = await self._stack.enter_async_context(anyio.create_task_group())
        group.start_soon(self._produce, send)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.aclose()
        finally:
            await self._stack.aclose()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> tuple[str, bytes]:
        if not self._batch:
            batch = await self._next_batch()
            if batch is None:
                raise StopAsyncIteration
            self._batch.extend(batch)
        path, data = self._batch.popleft()
        self.position += 1
        self.stats.files += 1
        self.stats.bytes += len(data)
        return path, data

    def _begin(self) -> MemoryObjectSendStream[tuple[Batch, int]]:
        """The stream the producer hands batches on (with the budget bytes they hold)."""
        if self._receive is not None:
            raise UsageError("an epoch iterator is iterated once: call iter_epoch() again")
        send, self._receive = anyio.create_memory_object_stream[tuple[Batch, int]](0)
        return send

    async def _next_batch(self) -> Batch | None:
        """The next files, None at the end of the share. The batch handed out before goes
        back to the budget: the consumer is done with it."""
        if self._receive is None:
            raise UsageError(
                "iterate an epoch inside `async with ds.iter_epoch(...) as epoch:` "
                "(it reads ahead in a task group the block holds)"
            )
        self._release(self._handed)
        self._handed = 0
        try:
            batch, self._handed = await self._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            if self._failure is not None:
                raise self._failure from None
            return None
        return batch

    async def aclose(self) -> None:
        """Stop reading, and return once nothing is left running or in flight."""
        self._closing = True
        if self._scope is not None:
            self._scope.cancel()
        if self._finished is not None:
            await self._finished.wait()
        if self._receive is not None:
            self._receive.close()

    def _release(self, amount: int) -> None:
        if self._budget is not None and amount:
            self._budget.release(amount)
            self.stats.bytes_held = self._budget.used

    async def _produce(self, send: MemoryObjectSendStream[tuple[Batch, int]]) -> None:
        self._finished = anyio.Event()
        try:
            with anyio.CancelScope() as self._scope:
                async with send:
                    if self._closing:
                        return
                    try:
                        await self._hand_out(send)
                    except Exception as exc:  # the consumer raises it where it iterates
                        self._failure = first_leaf(exc)
        finally:
            self._finished.set()

    async def _hand_out(self, send: MemoryObjectSendStream[tuple[Batch, int]]) -> None:
        state, dataset = self._state, self._dataset
        records, fingerprint = await dataset._epoch_records(state.patterns)
        if state.catalog and state.catalog != fingerprint:
            raise UsageError(
                f"{dataset.url} changed since this epoch state was saved (manifest "
                f"{state.catalog}, now {fingerprint}): start the epoch again"
            )
        self.catalog = fingerprint
        plan = state.plan(records, gap=dataset.gap)
        del records  # only this reader's share is kept
        shuffle = state.shuffle(plan)
        shuffle.skip(self.position)
        self._budget = ByteBudget(state.buffer_bytes)
        blocks: dict[int, _Block] = {}
        async with anyio.create_task_group() as group:
            # What to read is fixed before the shuffle moves on.
            wanted = plan.still_wanted(shuffle)
            group.start_soon(self._read_ahead, plan, wanted, blocks, group)
            batch: Batch = []
            held = 0  # budget bytes of the batch
            for item in shuffle:
                record, segment = plan.records[item], plan.segment_of(item)
                block = blocks.get(segment) or blocks.setdefault(segment, _Block(anyio.Event()))
                if batch and (not block.ready.is_set() or block.error is not None):
                    # Hand on what is ready rather than sit on it (or fail with it).
                    await send.send((batch, held))
                    batch, held = [], 0
                if not block.ready.is_set():
                    await block.ready.wait()
                if block.error is not None:
                    raise block.error
                batch.append((record.path, block.data.pop(record.path)))
                amount = min(record.size, block.unreleased)
                block.unreleased -= amount
                held += amount
                if not block.data:
                    del blocks[segment]
                if len(batch) >= EPOCH_BATCH_FILES:
                    await send.send((batch, held))
                    batch, held = [], 0
            if batch:
                await send.send((batch, held))

    async def _read_ahead(
        self,
        plan: ReaderPlan,
        wanted: Iterator[tuple[int, list[int]]],
        blocks: dict[int, _Block],
        group: anyio.abc.TaskGroup,
    ) -> None:
        """Reads the segments still wanted, in order: each reserves its bytes (a single file
        larger than the read-ahead reserves the read-ahead) and takes one of `concurrency`
        slots. A resumed reader reads only the files it has not handed out."""
        assert self._budget is not None
        slots = anyio.Semaphore(self._dataset.concurrency)
        for segment, items in wanted:
            records = [plan.records[i] for i in items]
            amount = min(sum(r.size for r in records), self._state.readahead_bytes)
            await self._budget.acquire(amount)
            self.stats.bytes_held = self._budget.used
            self.stats.peak_bytes_held = max(self.stats.peak_bytes_held, self._budget.peak)
            await slots.acquire()
            block = blocks.get(segment) or blocks.setdefault(segment, _Block(anyio.Event()))
            block.unreleased = amount
            group.start_soon(self._read_block, records, block, slots)

    async def _read_block(
        self, records: list[ManifestRecord], block: _Block, slots: anyio.Semaphore
    ) -> None:
        """One segment: coalesced ranged GETs (one, for a block), each file CRC-checked."""
        try:
            data, failures = await self._dataset._fetch(records)
            if failures:
                block.error = PartialReadError(data, failures)
            else:
                block.data = data
            self.stats.blocks += 1
        except S3XferError as exc:
            block.error = exc
        finally:
            slots.release()
            block.ready.set()


class SyncDataset:
    """Dataset for synchronous code (a training loop, a notebook, DataLoader workers).

    Its event loop runs in a daemon thread, started on first use: a process that never
    calls `close()` still exits, and an instance made before `os.fork()` (DataLoader's
    default start method on Linux) opens its own loop and connections in the child on its
    first read there; under spawn and forkserver it is pickled as its URL and options.
    """

    def __init__(self, url: str | S3Url, **options: Any) -> None:
        self._url = url
        self._options = options
        self._lock = threading.Lock()
        self._pid = -1  # the process whose loop and dataset the fields below belong to
        self._loop: _LoopThread | None = None
        self._dataset: Dataset | None = None
        self._closed = False
        self._epochs: set[Epoch] = set()  # epochs reading ahead on the loop, closed with it
        Dataset(url, **options)  # a bad URL or option fails here, before any thread starts

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self._url, "options": self._options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        SyncDataset.__init__(self, state["url"], **state["options"])

    def _opened(self) -> tuple[_LoopThread, Dataset]:
        """This process's loop and dataset, opened here if they were not (or were another
        process's: after a fork only the forking thread survives, the loop's is gone)."""
        with self._lock:
            if self._closed:
                raise S3XferError("this SyncDataset is closed")
            if self._pid != os.getpid() or self._loop is None or self._dataset is None:
                loop = _LoopThread()
                try:
                    dataset = Dataset(self._url, **self._options)
                    loop.portal.call(dataset.__aenter__)
                except BaseException:
                    loop.stop()
                    raise
                self._loop, self._dataset, self._pid = loop, dataset, os.getpid()
            return self._loop, self._dataset

    def _call(self, method: str, *args: Any) -> Any:
        loop, dataset = self._opened()
        return loop.portal.call(getattr(dataset, method), *args)

    def read(self, path: str) -> bytes:
        return cast(bytes, self._call("read", path))

    def read_many(self, paths: Sequence[str]) -> dict[str, bytes]:
        return cast(dict[str, bytes], self._call("read_many", paths))

    def open(self, path: str) -> io.BytesIO:
        return cast(io.BytesIO, self._call("open", path))

    def ls(self, pattern: str | None = None) -> list[ManifestRecord]:
        return cast(list[ManifestRecord], self._call("ls", pattern))

    def stat(self, path: str) -> ManifestRecord:
        return cast(ManifestRecord, self._call("stat", path))

    def iter_epoch(
        self,
        seed: int,
        *,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pattern: str | Sequence[str] | None = None,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        block_bytes: int = DEFAULT_BLOCK_BYTES,
    ) -> SyncEpoch:
        """Dataset.iter_epoch as a plain iterator of (path, bytes), reading ahead on the
        dataset's loop thread while the caller works. Starts nothing until iterated."""
        return SyncEpoch(
            self,
            epoch_state(
                seed,
                epoch=epoch,
                rank=rank,
                world_size=world_size,
                pattern=pattern,
                buffer_bytes=buffer_bytes,
                block_bytes=block_bytes,
            ),
        )

    @property
    def stats(self) -> ReadStats:
        return self._opened()[1].stats

    def close(self) -> None:
        with self._lock:
            loop, dataset, self._loop, self._dataset = self._loop, self._dataset, None, None
            self._closed = True
            if loop is None or dataset is None or self._pid != os.getpid():
                return  # nothing opened in this process: a forked child leaves the parent's be
            epochs, self._epochs = [e for e in self._epochs if e.dataset is dataset], set()
        try:
            for epoch in epochs:  # their producers would wait for a reader forever
                loop.portal.call(epoch.aclose)
            loop.portal.call(dataset.__aexit__, None, None, None)
        finally:
            loop.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncEpoch:
    """SyncDataset.iter_epoch: one reader's share of a shuffled epoch as a plain iterator of
    (path, bytes). Its Epoch runs on the dataset's loop thread, reading ahead while the caller
    works; files come over in batches, one portal call each.

    Used in another process than the one that started it (a forked DataLoader worker), it
    starts again there from its own position: `position` counts the files it handed out."""

    def __init__(self, owner: SyncDataset, state: EpochState) -> None:
        self._owner = owner
        self._state = state
        self.stats = EpochStats()
        self.position = state.position
        self._catalog = state.catalog
        self._pid = -1  # the process whose loop runs self._epoch
        self._loop: _LoopThread | None = None
        self._epoch: Epoch | None = None
        self._batch: deque[tuple[str, bytes]] = deque()
        self._done = False

    def __repr__(self) -> str:
        s = self._state
        return (
            f"<SyncEpoch seed={s.seed} epoch={s.epoch} reader={s.reader}/{s.readers} "
            f"position={self.position}>"
        )

    def state_dict(self) -> dict[str, Any]:
        return replace(self._state, position=self.position, catalog=self._catalog).to_json()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at a saved state (same reader and shape), before iterating."""
        if self._epoch is not None or self._done:
            raise UsageError("load_state_dict() must come before the epoch is iterated")
        self._state = self._state.resumed_from(EpochState.from_json(state))
        self.position, self._catalog = self._state.position, self._state.catalog

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> tuple[str, bytes]:
        if not self._batch or self._pid != os.getpid():
            batch = self._next_batch()
            if batch is None:
                raise StopIteration
            self._batch = deque(batch)
        path, data = self._batch.popleft()
        self.position += 1
        self.stats.files += 1
        self.stats.bytes += len(data)
        return path, data

    def _next_batch(self) -> Batch | None:
        if self._done:
            return None
        if self._epoch is None or self._pid != os.getpid():
            self._start()
        loop, epoch = self._loop, self._epoch
        assert loop is not None and epoch is not None
        try:
            batch = loop.portal.call(epoch._next_batch)
        except BaseException:
            self.close()
            raise
        finally:
            self._catalog = epoch.catalog
        if batch is None:
            self.close()
        return batch

    def _start(self) -> None:
        """Start (or, in a new process, start again) at this iterator's position. The files
        of a batch inherited from the parent and not yet handed out are read again."""
        loop, dataset = self._owner._opened()
        state = replace(self._state, position=self.position, catalog=self._catalog)
        epoch = Epoch(dataset, state, stats=self.stats)
        send = loop.portal.call(epoch._begin)
        loop.portal.start_task_soon(epoch._produce, send)
        self._owner._epochs.add(epoch)
        self._loop, self._epoch, self._pid = loop, epoch, os.getpid()
        self._batch.clear()

    def close(self) -> None:
        """Stop reading ahead (at the end of the share this happens by itself)."""
        self._done = True
        epoch, self._epoch = self._epoch, None
        if epoch is None or self._loop is None or self._pid != os.getpid():
            return
        self._owner._epochs.discard(epoch)
        self._loop.portal.call(epoch.aclose)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Dropped unfinished: stop its producer without waiting (the garbage collector may
        # run on the loop thread itself, where a blocking portal call is not allowed).
        epoch, loop = self._epoch, self._loop
        if epoch is None or loop is None or self._pid != os.getpid():
            return
        try:
            loop.portal.start_task_soon(epoch.aclose)
        except RuntimeError:  # on the loop thread, or the loop is gone: close() does it
            return
        self._owner._epochs.discard(epoch)


class _LoopThread:
    """An asyncio loop in a daemon thread, reached through an anyio blocking portal.

    anyio's own `start_blocking_portal` runs its loop in a non-daemon executor thread, which
    the interpreter joins at exit: an instance never closed (a module-level dataset) hung
    every script that used one."""

    def __init__(self) -> None:
        from anyio.from_thread import BlockingPortal  # 10 ms of import the async API skips

        ready: Future[BlockingPortal] = Future()
        self._stopped = threading.Event()

        async def serve() -> None:
            async with BlockingPortal() as portal:
                ready.set_result(portal)
                await portal.sleep_until_stopped()

        def run() -> None:
            try:
                anyio.run(serve, backend="asyncio")
            except BaseException as exc:
                if not ready.done():
                    ready.set_exception(exc)
            finally:
                self._stopped.set()

        self._thread = threading.Thread(target=run, name="s3xfer-dataset-loop", daemon=True)
        self._thread.start()
        self.portal = ready.result()

    def stop(self) -> None:
        self.portal.call(self.portal.stop)
        self._stopped.wait()
