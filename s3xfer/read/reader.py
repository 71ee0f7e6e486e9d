"""Reading files out of an s3xfer dataset: any file, packed or not, with one ranged GET,
verified against its catalogued CRC32; many files with nearby ranges merged into one GET.

    async with Dataset("s3://bucket/data") as ds:
        image = await ds.read("images/07/img_00742.jpg")
        batch = await ds.read_many(paths)          # coalesced, concurrent
        async with ds.iter_epoch(seed=7) as epoch: # every file once, shuffled, big reads
            async for path, data in epoch:
                ...

The shuffled epoch's iterator is `epoch_iter.py`'s (its schedule, pure, `epoch.py`'s); the
same API from synchronous code, `sync.py`'s SyncDataset.
"""

from __future__ import annotations

import datetime
import io
import os
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import AsyncExitStack, aclosing
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, cast

import anyio

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
from ..destination import SafeDestination, make_directory, staging_in, used_by
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
)
from ..limits import RunLimits
from ..planning.globs import path_matcher
from ..transport.retry import RetryPolicy, call_with_retries
from ..transport.s3 import S3, Connection, open_s3
from .decoding import RecordDecoder
from .epoch import DEFAULT_BLOCK_BYTES, DEFAULT_BUFFER_BYTES
from .epoch_iter import Epoch, epoch_state
from .ranges import DEFAULT_GAP, RangeGet, Wanted, check_ranged_response, coalesce

if TYPE_CHECKING:
    pass

OBJECT_RANGE = 8 * 1024 * 1024  # a plain object is streamed in ranges of this size

GET_BATCH_BYTES = 64 * 1024 * 1024  # `get` fetches and writes this much at a time


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
        encryption_key: bytes | None = None,
    ) -> None:
        """`unfinished`: a prefix where an s3xfer upload has not finished (no manifest yet) is
        taken for a plain prefix (NoDatasetError) instead of refused (NotFinalizedError).
        `encryption_key`: the 32 bytes of the key the dataset was encrypted with."""
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
        self._decoder = RecordDecoder(self.url, encryption_key, policy=self._policy)

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
        await self._decoder.ready(self.s3, by_path.values())
        wanted = [  # a coded file's stored bytes, decoded below
            Wanted(r.path, r.key, r.offset if r.packed else 0, r.stored, r.etag)
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
                if record.coding:
                    try:
                        data = await self._decoder.decode(self.s3, record, data)
                    except IntegrityError as exc:
                        failures[member.path] = exc
                        continue
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
                if len(body) != first.stored:
                    raise IntegrityError(f"{where}: {len(body)} bytes, catalogued {first.stored}")
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
        await self._decoder.ready(self.s3, matched.values())  # no key, wrong key: nothing made
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
