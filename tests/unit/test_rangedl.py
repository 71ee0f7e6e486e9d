"""Ranged downloads: ranges cover the object exactly and aligned, the sidecar round-trips, and
against a scripted in-memory S3 the download verifies, retries, resumes and cleans up."""

from __future__ import annotations

import os
import random
import re
import threading
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given
from hypothesis import strategies as st

from s3xfer.budget import ByteBudget
from s3xfer.checksums import crc32_to_base64
from s3xfer.config import MiB
from s3xfer.errors import IntegrityError, TransientError, UsageError
from s3xfer.read.download import aligned_range_size, large_ranges_at_once
from s3xfer.read.rangedl import (
    DownloadResult,
    PartialState,
    RangedDownload,
    download_ranges,
    sidecar_path,
    split_ranges,
)
from s3xfer.transport.rawhttp import PIECE_SIZE
from s3xfer.transport.retry import RetryPolicy

FAST_RETRIES = RetryPolicy(max_attempts=3, base_delay=0.0, max_delay=0.0)


@given(size=st.integers(0, 10**9), range_size=st.integers(1, 10**8))
def test_ranges_cover_the_object_exactly_and_start_on_range_size_multiples(
    size: int, range_size: int
) -> None:
    if size // range_size > 20_000:  # keep each example cheap; the property does not need more
        range_size = size // 20_000 + 1
    ranges = split_ranges(size, range_size=range_size)
    assert [r.index for r in ranges] == list(range(len(ranges)))
    assert len(ranges) == -(-size // range_size)
    position = 0
    for r in ranges:
        assert r.start == position
        assert r.start % range_size == 0
        assert 0 < r.length <= range_size
        assert r.header == f"bytes={r.start}-{r.end - 1}"
        position = r.end
    assert position == size


def test_a_range_size_that_is_not_positive_is_refused() -> None:
    with pytest.raises(UsageError):
        split_ranges(10, range_size=0)


states = st.builds(
    PartialState,
    bucket=st.text(min_size=1, max_size=20),
    key=st.text(min_size=1, max_size=60),
    etag=st.text(max_size=40),
    size=st.integers(0, 2**50),
    range_size=st.integers(1, 2**33),
    crcs=st.dictionaries(st.integers(0, 10_000), st.integers(0, 2**32 - 1), max_size=50),
)


@given(state=states)
def test_sidecar_round_trips(state: PartialState) -> None:
    assert PartialState.from_json(state.to_json()) == state


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[]",
        '{"version": 99}',
        '{"version":1,"bucket":"b","key":"k","etag":"e","size":1,"range_size":1,'
        '"done":[0,1],"crcs":{"0":5}}',
        '{"version":1,"bucket":"b","key":"k","etag":"e","size":-1,"range_size":1,'
        '"done":[],"crcs":{}}',
    ],
)
def test_anything_but_a_well_formed_sidecar_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        PartialState.from_json(text)


class ScriptedS3:
    """An in-memory object behind get_range, with faults to inject per range."""

    stream_piece_size = PIECE_SIZE

    def __init__(self, data: bytes, etag: str = '"e1"') -> None:
        self.data = data
        self.etag = etag
        self.gets: Counter[str] = Counter()
        self.short_once: set[str] = set()  # ranges answered once with a truncated body
        self.wrong_range: set[str] = set()  # ranges answered with other bytes' Content-Range
        self.in_flight = 0
        self.peak_in_flight = 0

    async def get_range_to(
        self,
        bucket: str,
        key: str,
        *,
        byte_range: str,
        if_match: str | None = None,
        on_head: Callable[[int, str | None, int], None],
        sink: Callable[[memoryview], None],
    ) -> int:
        self.gets[byte_range] += 1
        if if_match != self.etag:
            raise IntegrityError(f"s3://{bucket}/{key} was replaced (ETag no longer matches)")
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", byte_range)
        assert match
        start, last = int(match.group(1)), int(match.group(2))
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            for _ in range(10):  # a GET takes a while: other ranges start, the limiter bounds them
                await anyio.lowlevel.checkpoint()
        finally:
            self.in_flight -= 1
        body = self.data[start : last + 1]
        if byte_range in self.short_once:
            self.short_once.discard(byte_range)
            body = body[:-1]
        if byte_range in self.wrong_range:
            start, last = start + 1, last + 1
        on_head(206, f"bytes {start}-{last}/{len(self.data)}", -1)
        # In uneven pieces, as a socket delivers them: the writer must place each one.
        for i in range(0, len(body), 70_001):
            sink(memoryview(body[i : i + 70_001]))
        return len(body)


def partial_of(dest: Path) -> Path:
    """Where a test's partial file goes: a staging directory of its own (download.py uses
    the destination's, destination.Staging)."""
    return dest.parent / ".staging" / f"{dest.name}.part"


def job_for(
    data: bytes, dest: Path, *, crc: str | None = "auto", etag: str = '"e1"'
) -> RangedDownload:
    partial_of(dest).parent.mkdir(parents=True, exist_ok=True)
    return RangedDownload(
        bucket="b",
        key="big.bin",
        size=len(data),
        etag=etag,
        dest=dest,
        partial=partial_of(dest),
        mtime_ns=1_600_000_000_123_456_789,
        mode=0o640,
        expected_crc32=crc32_to_base64(zlib.crc32(data)) if crc == "auto" else crc,
    )


def run(
    s3: ScriptedS3,
    job: RangedDownload,
    *,
    range_size: int = 1000,
    limit: int = 3,
    budget: ByteBudget | None = None,
    progress: list[int] | None = None,
) -> DownloadResult:
    async def main() -> DownloadResult:
        return await download_ranges(
            s3,
            job,
            range_size=range_size,
            limiter=anyio.CapacityLimiter(limit),
            budget=budget or ByteBudget(4 * PIECE_SIZE),
            on_progress=None if progress is None else progress.append,
            policy=FAST_RETRIES,
        )

    return anyio.run(main)


DATA = random.Random(7).randbytes(10_500)


def test_download_writes_verified_bytes_with_mtime_and_mode_and_leaves_no_partial_files(
    tmp_path: Path,
) -> None:
    s3 = ScriptedS3(DATA)
    dest = tmp_path / "out" / "big.bin"
    budget = ByteBudget(3 * PIECE_SIZE)  # room for a receive piece per GET slot
    progress: list[int] = []
    result = run(s3, job_for(DATA, dest), budget=budget, progress=progress)
    assert dest.read_bytes() == DATA
    assert dest.stat().st_mtime_ns == 1_600_000_000_123_456_789
    assert dest.stat().st_mode & 0o7777 == 0o640
    assert result == DownloadResult(
        bytes_fetched=len(DATA),
        ranges_fetched=11,
        ranges_reused=0,
        crc32=crc32_to_base64(zlib.crc32(DATA)),
        retries=0,
    )
    assert sum(progress) == len(DATA)
    assert sorted(p.name for p in dest.parent.iterdir()) == [".staging", "big.bin"]
    assert list(partial_of(dest).parent.iterdir()) == []
    assert budget.peak <= 3 * PIECE_SIZE and budget.used == 0
    assert 1 < s3.peak_in_flight <= 3


def test_a_truncated_body_is_retried_and_counted(tmp_path: Path) -> None:
    s3 = ScriptedS3(DATA)
    s3.short_once.add("bytes=2000-2999")
    result = run(s3, job_for(DATA, tmp_path / "big.bin"))
    assert (tmp_path / "big.bin").read_bytes() == DATA
    assert result.retries == 1 and s3.gets["bytes=2000-2999"] == 2


def test_a_wrong_content_range_fails_and_removes_the_partial_files(tmp_path: Path) -> None:
    s3 = ScriptedS3(DATA)
    s3.wrong_range.add("bytes=3000-3999")
    dest = tmp_path / "big.bin"
    with pytest.raises(IntegrityError, match=r"big\.bin.*bytes=3000-3999"):
        run(s3, job_for(DATA, dest))
    assert list(partial_of(dest).parent.iterdir()) == [] and not dest.exists()


def test_a_checksum_mismatch_names_the_key_and_leaves_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "big.bin"
    dest.write_bytes(b"previous version")
    wrong = crc32_to_base64(zlib.crc32(DATA) ^ 1)
    with pytest.raises(IntegrityError, match=r"s3://b/big\.bin: checksum mismatch"):
        run(ScriptedS3(DATA), job_for(DATA, dest, crc=wrong))
    assert dest.read_bytes() == b"previous version"  # an old file is not replaced by bad bytes
    assert list(partial_of(dest).parent.iterdir()) == []


class Interrupted(Exception):
    pass


def interrupt_after(ranges: int) -> list[int]:
    """A progress list that raises once `ranges` ranges have landed: a crash mid-download."""

    class Tripwire(list[int]):
        def append(self, value: int) -> None:
            super().append(value)
            if len(self) >= ranges:
                raise Interrupted

    return Tripwire()


def test_an_interrupted_download_continues_from_the_ranges_already_written(
    tmp_path: Path,
) -> None:
    s3 = ScriptedS3(DATA)
    dest = tmp_path / "big.bin"
    with pytest.raises(Interrupted):
        run(s3, job_for(DATA, dest), limit=1, progress=interrupt_after(3))
    assert not dest.exists()
    recorded = PartialState.from_json(sidecar_path(partial_of(dest)).read_text())
    assert len(recorded.done) >= 3
    s3.gets.clear()
    progress: list[int] = []
    result = run(s3, job_for(DATA, dest), progress=progress)
    assert dest.read_bytes() == DATA
    assert result.ranges_reused == len(recorded.done)
    assert result.ranges_fetched == 11 - len(recorded.done)
    assert sum(s3.gets.values()) == result.ranges_fetched
    assert sum(progress) == len(DATA)  # reused bytes count as progress too
    assert result.crc32 == crc32_to_base64(zlib.crc32(DATA))


def test_a_reused_range_whose_bytes_are_not_on_disk_is_fetched_again(tmp_path: Path) -> None:
    s3 = ScriptedS3(DATA)
    dest = tmp_path / "big.bin"
    with pytest.raises(Interrupted):
        run(s3, job_for(DATA, dest), limit=1, progress=interrupt_after(2))
    recorded = PartialState.from_json(sidecar_path(partial_of(dest)).read_text())
    lost = min(recorded.done)
    # As after a power loss: the sidecar says this range is written, the disk holds zeros.
    with partial_of(dest).open("r+b") as partial:
        partial.seek(lost * 1000)
        partial.write(bytes(1000))
    result = run(s3, job_for(DATA, dest))
    assert dest.read_bytes() == DATA
    assert result.ranges_reused == len(recorded.done) - 1
    assert result.ranges_fetched == 11 - result.ranges_reused


def test_a_partial_download_of_another_version_is_started_over(tmp_path: Path) -> None:
    dest = tmp_path / "big.bin"
    with pytest.raises(Interrupted):
        run(ScriptedS3(DATA), job_for(DATA, dest), limit=1, progress=interrupt_after(2))
    new = DATA[::-1]
    result = run(ScriptedS3(new, etag='"e2"'), job_for(new, dest, etag='"e2"'))
    assert dest.read_bytes() == new
    assert result.ranges_reused == 0 and result.ranges_fetched == 11


def test_an_empty_object_needs_no_request(tmp_path: Path) -> None:
    s3 = ScriptedS3(b"")
    result = run(s3, job_for(b"", tmp_path / "empty"))
    assert (tmp_path / "empty").read_bytes() == b""
    assert result.crc32 == "AAAAAA==" and not s3.gets


def test_ranges_larger_than_the_memory_budget_stream_within_it(tmp_path: Path) -> None:
    # Each range is written as it arrives: the budget bounds pieces in flight, not ranges.
    budget = ByteBudget(999)
    run(ScriptedS3(DATA), job_for(DATA, tmp_path / "x"), range_size=5000, budget=budget)
    assert (tmp_path / "x").read_bytes() == DATA
    assert 0 < budget.peak <= 999


def test_transient_errors_are_not_swallowed_past_the_retry_limit(tmp_path: Path) -> None:
    class AlwaysShort(ScriptedS3):
        async def get_range_to(
            self,
            bucket: str,
            key: str,
            *,
            byte_range: str,
            if_match: str | None = None,
            on_head: Callable[[int, str | None, int], None],
            sink: Callable[[memoryview], None],
        ) -> int:
            await super().get_range_to(
                bucket,
                key,
                byte_range=byte_range,
                if_match=if_match,
                on_head=on_head,
                sink=sink,
            )
            return 1

    dest = tmp_path / "big.bin"
    with pytest.raises(TransientError, match="truncated"):
        run(AlwaysShort(DATA), job_for(DATA, dest))
    # Not an integrity problem: the partial files stay for the next call to continue.
    assert partial_of(dest).exists() and sidecar_path(partial_of(dest)).exists()


def test_pieces_are_written_at_their_offsets_with_their_crc(tmp_path: Path) -> None:
    from s3xfer.read.rangedl import _RangeWriter

    data = bytes(range(256)) * 300
    path = tmp_path / "out.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        writer = _RangeWriter(fd, 10, path, threading.Lock())
        for start in range(0, len(data), 7_777):
            writer.write(memoryview(data[start : start + 7_777]))
    finally:
        os.close(fd)
    assert path.read_bytes() == bytes(10) + data
    assert writer.crc == zlib.crc32(data) and writer.written == len(data)


@given(
    part=st.integers(min_value=0, max_value=5 * 1024**3),
    preferred=st.integers(min_value=1, max_value=1024**3),
)
def test_ranges_cover_whole_parts_unless_parts_are_unknown_or_huge(
    part: int, preferred: int
) -> None:
    size = aligned_range_size(part, preferred)
    if 0 < part <= 4 * preferred:
        assert size % part == 0  # every range starts and ends on a part boundary
        assert size == part or size <= preferred
    else:
        assert size == preferred


@pytest.mark.parametrize(
    ("concurrency", "max_memory", "expected"),
    [(128, 128 * MiB, 8), (4, 128 * MiB, 4), (128, 8 * MiB, 1), (1024, 1024 * MiB, 64)],
)
def test_large_ranges_are_as_many_as_the_budget_holds_whole(
    concurrency: int, max_memory: int, expected: int
) -> None:
    assert large_ranges_at_once(concurrency, max_memory=max_memory, range_size=16 * MiB) == expected
