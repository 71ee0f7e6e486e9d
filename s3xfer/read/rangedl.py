"""Downloading one large object (or one large member of a shard): parallel ranged GETs
written at their offsets into a preallocated partial file, resumable after a kill, and renamed
into place only when complete and verified.

The partial file is `job.partial`, in the destination's staging directory (destination.Staging,
never beside a user's file); beside it, while the download is unfinished, its sidecar
(`<hash>.json`: which ranges are written, and their CRC32s). The sidecar is replaced
atomically after each range, and only ever lists ranges whose bytes were written before, so
a process killed at any moment leaves a state the next call can continue from. Neither file
is ever opened through a link, nor reused when it is not a plain file of its own.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import stat
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import anyio

from ..budget import ByteBudget
from ..checksums import combine_parts, crc32, crc32_from_base64, crc32_to_base64
from ..dataset.validate import restored_mode
from ..destination import destination_error, move_into_place
from ..errors import IntegrityError, TransientError, UsageError, first_error
from ..transport.retry import RetryPolicy, call_with_retries
from .ranges import RangeGet, check_ranged_response

SIDECAR_VERSION = 1
_NEW_FILE = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC  # never an existing one
_VERIFY_CHUNK = 1024 * 1024  # reading back reused ranges: bounded memory, not budgeted


class RangeSource(Protocol):
    """What this module needs from S3 (s3.S3 provides it; tests may hand in a fake)."""

    # Bytes one GET to a sink holds at a time while it streams: what each GET in flight
    # takes from the byte budget (a range is written as it arrives, never held whole).
    stream_piece_size: int

    async def get_range_to(
        self,
        bucket: str,
        key: str,
        *,
        byte_range: str,
        if_match: str | None = None,
        on_head: Callable[[int, str | None, int], None],
        sink: Callable[[memoryview], None],
    ) -> int: ...


@dataclass(frozen=True, slots=True)
class RangedDownload:
    """One object, or bytes [offset, offset + size) of it, to fetch into `dest`."""

    bucket: str
    key: str
    size: int
    etag: str  # sent as If-Match on every GET: a replaced object fails instead of mixing bytes
    dest: Path  # final path, written only by an atomic rename once complete and verified
    partial: Path  # where the bytes are gathered meanwhile (Staging.partial), its sidecar beside
    mtime_ns: int | None  # set on the final file when given
    mode: int | None
    # Base64 big-endian whole-object CRC32 (s3xfer manifest, or S3's FULL_OBJECT ChecksumCRC32);
    # None when no checksum is known: the computed value is still returned.
    expected_crc32: str | None
    offset: int = 0  # where the bytes start in the object (a member of a shard)


@dataclass(frozen=True, slots=True)
class DownloadResult:
    bytes_fetched: int  # bytes received in this call (reused ranges excluded)
    ranges_fetched: int
    ranges_reused: int  # ranges a previous, interrupted call had already written
    crc32: str  # base64 whole-object CRC32 of the final file
    retries: int = 0


@dataclass(frozen=True, slots=True)
class ByteRange:
    """Range number `index` of an object: bytes [start, end)."""

    index: int
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def header(self) -> str:
        return f"bytes={self.start}-{self.end - 1}"


def split_ranges(size: int, *, range_size: int) -> list[ByteRange]:
    """Consecutive ranges covering [0, size), each starting at a multiple of range_size.

    Aligned to the upload's part size, each GET is served from a single stored part.
    """
    if range_size <= 0:
        raise UsageError(f"range size must be positive, got {range_size}")
    if size < 0:
        raise UsageError(f"object size must not be negative, got {size}")
    return [
        ByteRange(index, start, min(start + range_size, size))
        for index, start in enumerate(range(0, size, range_size))
    ]


def sidecar_path(partial: Path) -> Path:
    return partial.with_suffix(".json")


def _sidecar_temp_path(partial: Path) -> Path:
    return partial.with_suffix(".json.tmp")


@dataclass(frozen=True, slots=True)
class PartialState:
    """What the sidecar records: which object, cut how, and the CRC32 of each written range."""

    bucket: str
    key: str
    etag: str
    size: int
    range_size: int
    crcs: Mapping[int, int] = field(default_factory=dict)
    offset: int = 0

    @property
    def done(self) -> frozenset[int]:
        return frozenset(self.crcs)

    @classmethod
    def start(cls, job: RangedDownload, *, range_size: int) -> PartialState:
        return cls(job.bucket, job.key, job.etag, job.size, range_size, {}, job.offset)

    def continues(self, job: RangedDownload, *, range_size: int) -> bool:
        """Whether the recorded ranges are bytes of this very object, cut the same way."""
        mine = (self.bucket, self.key, self.etag, self.offset, self.size, self.range_size)
        return mine == (job.bucket, job.key, job.etag, job.offset, job.size, range_size)

    def with_range(self, index: int, crc: int) -> PartialState:
        crcs = {**self.crcs, index: crc}
        return replace(self, crcs=crcs)

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": SIDECAR_VERSION,
                "bucket": self.bucket,
                "key": self.key,
                "etag": self.etag,
                "offset": self.offset,
                "size": self.size,
                "range_size": self.range_size,
                "done": sorted(self.crcs),
                "crcs": {str(index): self.crcs[index] for index in sorted(self.crcs)},
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> PartialState:
        """Raises ValueError on anything but a sidecar this version wrote."""
        try:
            raw: Any = json.loads(text)
            if not isinstance(raw, dict) or raw.get("version") != SIDECAR_VERSION:
                raise ValueError("not an s3xfer sidecar of a known version")
            strings = [raw["bucket"], raw["key"], raw["etag"]]
            offset = raw.get("offset", 0)
            numbers = [raw["size"], raw["range_size"], offset]
            if not all(isinstance(s, str) for s in strings) or not all(
                isinstance(n, int) and n >= 0 for n in numbers
            ):
                raise ValueError("malformed sidecar fields")
            crcs = {int(index): int(crc) for index, crc in raw["crcs"].items()}
            done = raw["done"]
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"malformed sidecar: {exc}") from exc
        # "done" is redundant with the CRC keys; a disagreement means the file is not ours.
        if not isinstance(done, list) or sorted(done) != sorted(crcs):
            raise ValueError("sidecar done list and CRCs disagree")
        return cls(
            raw["bucket"], raw["key"], raw["etag"], raw["size"], raw["range_size"], crcs, offset
        )


def clean_partial(partial: Path) -> None:
    """Remove a partial file and its sidecar, if any (a link is removed, not followed)."""
    for path in (sidecar_path(partial), _sidecar_temp_path(partial), partial):
        path.unlink(missing_ok=True)


@contextmanager
def _local_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise destination_error(path, exc) from exc


def _write_sidecar(partial: Path, state: PartialState) -> None:
    temp = _sidecar_temp_path(partial)
    with _local_errors(temp):
        temp.unlink(missing_ok=True)  # left by a killed run: made anew, never written through
        fd = os.open(temp, os.O_WRONLY | _NEW_FILE, 0o600)
        with open(fd, "w", encoding="utf-8") as out:
            out.write(state.to_json())
        os.replace(temp, sidecar_path(partial))


def _read_sidecar(partial: Path) -> PartialState | None:
    try:
        fd = os.open(sidecar_path(partial), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with open(fd, encoding="utf-8") as sidecar:
            return PartialState.from_json(sidecar.read())
    except (OSError, UnicodeDecodeError, ValueError):
        return None  # missing, unreadable or a link: nothing to resume


def _crc_of_file_range(fd: int, start: int, length: int) -> int | None:
    value = 0
    position = start
    while position < start + length:
        chunk = os.pread(fd, min(_VERIFY_CHUNK, start + length - position), position)
        if not chunk:
            return None
        value = crc32(chunk, value)
        position += len(chunk)
    return value


def _preallocate(fd: int, size: int) -> None:
    os.ftruncate(fd, size)
    if size and hasattr(os, "posix_fallocate"):
        # Reserving the blocks now makes a full disk fail here rather than mid-download.
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise


def _open_partial(
    job: RangedDownload, ranges: list[ByteRange], *, range_size: int, verify_reused: bool
) -> tuple[int, PartialState]:
    """Open the partial file, continuing a matching earlier download or starting afresh."""
    temp = job.partial
    state = _read_sidecar(temp)
    if state is not None and state.continues(job, range_size=range_size):
        try:
            fd = os.open(temp, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            fd = -1
        if fd >= 0 and _reusable(os.fstat(fd), job.size):
            crcs = {i: c for i, c in state.crcs.items() if 0 <= i < len(ranges)}
            if verify_reused:
                # The sidecar outlives a power loss that the page cache may not: re-read what
                # it claims, so the whole-file check never vouches for bytes that are not there.
                crcs = {
                    i: c
                    for i, c in crcs.items()
                    if _crc_of_file_range(fd, ranges[i].start, ranges[i].length) == c
                }
            return fd, replace(state, crcs=crcs)
        if fd >= 0:
            os.close(fd)
    with _local_errors(job.dest):
        # Sidecar first: from here on no stale record can describe the new file.
        clean_partial(temp)
        fd = os.open(temp, os.O_RDWR | _NEW_FILE, 0o600)
        try:
            _preallocate(fd, job.size)
        except BaseException:
            # Nothing written yet, and no sidecar: the file would only hold the space.
            os.close(fd)
            temp.unlink(missing_ok=True)
            raise
    fresh = PartialState.start(job, range_size=range_size)
    _write_sidecar(temp, fresh)
    return fd, fresh


def _reusable(info: os.stat_result, size: int) -> bool:
    """A partial file worth continuing: a plain file of the object's size, and no other
    name's (a hard link planted there would have its bytes overwritten)."""
    return stat.S_ISREG(info.st_mode) and info.st_nlink == 1 and info.st_size == size


class _RangeWriter:
    """Writes the pieces of one range at their offsets as they arrive (in the GET's worker
    thread, while they are in the CPU cache), keeping their CRC32.

    Writes to one file are taken in turn under `lock`: the kernel serialises them anyway (the
    inode lock), and its waiters spin on a CPU that the other GETs need; a thread waiting for
    a Python lock sleeps."""

    def __init__(self, fd: int, offset: int, path: Path, lock: threading.Lock) -> None:
        self.fd = fd
        self.offset = offset
        self.path = path
        self.lock = lock
        self.crc = 0
        self.written = 0

    def write(self, piece: memoryview) -> None:
        self.crc = crc32(piece, self.crc)
        with _local_errors(self.path), self.lock:
            while piece:
                done = os.pwrite(self.fd, piece, self.offset + self.written)
                piece = piece[done:]
                self.written += done


def _set_mode_and_times(fd: int, job: RangedDownload) -> None:
    """On the open partial file: never through a link put in its place."""
    with _local_errors(job.dest):
        if job.mode is not None:
            os.fchmod(fd, restored_mode(job.mode))
        if job.mtime_ns is not None:
            os.utime(fd, ns=(job.mtime_ns, job.mtime_ns))


def _finish(job: RangedDownload) -> None:
    with _local_errors(job.dest):
        job.dest.parent.mkdir(parents=True, exist_ok=True)
        move_into_place(job.partial, job.dest)
        # A kill right here leaves a sidecar without its data file: the next call starts over.
        sidecar_path(job.partial).unlink(missing_ok=True)


class _Journal:
    """The in-memory sidecar state and its persistence: one write at a time, newest wins,
    and a write already covered by a newer one is skipped."""

    def __init__(self, partial: Path, state: PartialState) -> None:
        self.partial = partial
        self.state = state
        self._version = 0
        self._persisted = 0
        self._lock = anyio.Lock()

    async def record(self, index: int, crc: int) -> None:
        self.state = self.state.with_range(index, crc)
        self._version += 1
        wanted = self._version
        async with self._lock:
            if self._persisted >= wanted:
                return
            snapshot, version = self.state, self._version
            await anyio.to_thread.run_sync(_write_sidecar, self.partial, snapshot)
            self._persisted = version


async def download_ranges(
    s3: RangeSource,
    job: RangedDownload,
    *,
    range_size: int,
    limiter: anyio.CapacityLimiter,
    budget: ByteBudget,
    on_progress: Callable[[int], None] | None = None,
    policy: RetryPolicy,
    on_retry: Callable[[TransientError], None] | None = None,
    verify_reused: bool = True,
) -> DownloadResult:
    """Fetch job's object into job.dest, continuing an interrupted download of the same object.

    `limiter` bounds GETs in flight; each holds one receive piece (s3.stream_piece_size) of
    `budget` while it streams: a range is written as it arrives, never held whole.
    on_progress receives byte counts as ranges land on disk (ranges reused from an earlier
    call are reported once, at the start). An existing dest is replaced. On IntegrityError
    (checksum mismatch, object replaced, wrong range served) the partial files are removed;
    on any other failure they are kept for the next call to continue.
    """
    ranges = split_ranges(job.size, range_size=range_size)
    expected: int | None = None
    if job.expected_crc32 is not None:
        try:
            expected = crc32_from_base64(job.expected_crc32)
        except ValueError as exc:
            raise UsageError(f"s3://{job.bucket}/{job.key}: {exc}") from exc
    where = f"s3://{job.bucket}/{job.key}"
    fd, state = await anyio.to_thread.run_sync(
        lambda: _open_partial(job, ranges, range_size=range_size, verify_reused=verify_reused)
    )
    journal = _Journal(job.partial, state)
    file_lock = threading.Lock()
    reused = state.done
    todo = [r for r in ranges if r.index not in reused]
    fetched_bytes = 0
    retries = 0

    def count_retry(error: TransientError) -> None:
        nonlocal retries
        retries += 1
        if on_retry is not None:
            on_retry(error)

    async def get(piece: ByteRange) -> int:
        """The range written at its offset: its CRC32."""
        asked = RangeGet(job.key, job.offset + piece.start, job.offset + piece.end, ())
        writer = _RangeWriter(fd, piece.start, job.dest, file_lock)  # afresh for each attempt

        def check(status: int, content_range: str | None, length: int) -> None:
            check_ranged_response(
                asked,
                status=status,
                content_range=content_range,
                body_length=piece.length if length < 0 else length,
                where=where,
            )

        length = await s3.get_range_to(
            job.bucket,
            job.key,
            byte_range=asked.header,
            if_match=job.etag,
            on_head=check,
            sink=writer.write,
        )
        if length < piece.length:  # a connection cut short: worth another try
            raise TransientError(
                f"{where} ({asked.header}): truncated response, {length} of {piece.length} bytes"
            )
        return writer.crc

    held = min(s3.stream_piece_size, budget.capacity)
    # Ranges started but not done: one per GET slot, not one task per range of a huge object.
    waiting = anyio.Semaphore(max(1, int(limiter.total_tokens)))

    async def fetch(piece: ByteRange) -> None:
        nonlocal fetched_bytes
        try:
            await budget.acquire(held)  # before the GET slot, as every download task does
            try:
                async with limiter:
                    crc = await call_with_retries(
                        functools.partial(get, piece), policy=policy, on_retry=count_retry
                    )
            finally:
                budget.release(held)
        finally:
            waiting.release()
        await journal.record(piece.index, crc)
        fetched_bytes += piece.length
        if on_progress is not None:
            on_progress(piece.length)

    try:
        try:
            if on_progress is not None and reused:
                on_progress(sum(ranges[i].length for i in reused))
            with first_error():
                async with anyio.create_task_group() as group:
                    for piece in todo:
                        await waiting.acquire()  # released by fetch
                        group.start_soon(fetch, piece)
            crcs = journal.state.crcs
            whole = combine_parts((crcs[r.index], r.length) for r in ranges)
            if expected is not None and whole != expected:
                raise IntegrityError(
                    f"{where}: checksum mismatch, downloaded bytes have CRC32 "
                    f"{crc32_to_base64(whole)}, expected {job.expected_crc32}"
                )
            await anyio.to_thread.run_sync(_set_mode_and_times, fd, job)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(os.close, fd)
        await anyio.to_thread.run_sync(_finish, job)
    except IntegrityError:
        # The partial bytes are of an object that no longer matches: nothing worth resuming.
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(clean_partial, job.partial)
        raise
    return DownloadResult(
        bytes_fetched=fetched_bytes,
        ranges_fetched=len(todo),
        ranges_reused=len(reused),
        crc32=crc32_to_base64(whole),
        retries=retries,
    )
