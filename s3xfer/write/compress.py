"""`upload --compress`: which files are stored compressed, and their stored sizes, found by
reading and compressing each candidate once before the upload lays out its shards (a shard's
layout places members by their stored sizes before any byte is sent; docs/format.md, "Coded
files"). Candidates are shard members and single-PUT files; files of a multipart upload are
stored uncompressed (a compressed file of several frames is read whole)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import anyio

from ..dataset.coding import (
    SAMPLE_SIZE,
    Coding,
    CompressMode,
    choose_coding,
    coded_size,
    worth_compressing,
)
from ..errors import SourceError
from ..localfs import read_heads, read_whole_files
from ..planning.plan import Kind, Plan

BATCH_FILES = 64  # files read and compressed in one worker-thread call
BATCH_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class CompressionSummary:
    """What --compress found: files compressed, and their bytes before and after."""

    files: int
    original_bytes: int
    stored_bytes: int


def _candidates(plan: Plan) -> Iterator[tuple[str, int, int]]:
    for unit in plan.units:
        if unit.kind is Kind.PUT:
            yield unit.path, unit.size, unit.mtime_ns
    for shard in plan.shards:
        for member in shard.members:
            yield member.path, member.size, member.mtime_ns


def _choose(
    batch: list[tuple[str, int, int]],
    reads: list[tuple[bytes, int] | SourceError],
    mode: CompressMode,
    base: Coding,
) -> dict[str, tuple[Coding, int]]:
    chosen: dict[str, tuple[Coding, int]] = {}
    for (path, _size, _mtime), read in zip(batch, reads, strict=True):
        if isinstance(read, SourceError):
            continue  # a file that cannot be read now fails at upload, as it would anyway
        data, _crc = read
        coding = choose_coding(data, mode=mode, base=base)
        if coding.compressed:
            chosen[path] = (coding, coded_size(data, coding=coding))
    return chosen


def _worth(heads: list[bytes | SourceError]) -> list[bool]:
    return [not isinstance(head, SourceError) and worth_compressing(head) for head in heads]


async def _candidates_to_read(
    plan: Plan, batch: list[tuple[str, int, int]], mode: CompressMode
) -> list[tuple[str, int, int]]:
    """`auto` reads each file's first SAMPLE_SIZE bytes first: only those that shrink are
    read whole (an incompressible tree costs a small read per file, not a second pass)."""
    if mode is not CompressMode.AUTO:
        return batch
    heads = await read_heads([(plan.source / p, s, m) for p, s, m in batch], SAMPLE_SIZE)
    worth = await anyio.to_thread.run_sync(_worth, heads)
    return [candidate for candidate, yes in zip(batch, worth, strict=True) if yes]


async def measure_compression(
    plan: Plan, mode: CompressMode, *, base: Coding
) -> tuple[dict[str, tuple[Coding, int]], CompressionSummary]:
    """The files to store compressed (path: their coding, `base`'s encryption with zstd, and
    stored size), and a summary. Reads every candidate once, BATCH_FILES at a time."""
    chosen: dict[str, tuple[Coding, int]] = {}
    original = 0
    batch: list[tuple[str, int, int]] = []
    held = 0

    async def flush() -> None:
        nonlocal batch, held
        if batch:
            batch = await _candidates_to_read(plan, batch, mode)
        if batch:
            reads = await read_whole_files([(plan.source / p, s, m) for p, s, m in batch])
            chosen.update(await anyio.to_thread.run_sync(_choose, batch, reads, mode, base))
        batch, held = [], 0

    if mode is CompressMode.NONE:
        return chosen, CompressionSummary(0, 0, 0)
    sizes: dict[str, int] = {}
    for candidate in _candidates(plan):
        if batch and (len(batch) == BATCH_FILES or held + candidate[1] > BATCH_BYTES):
            await flush()
        batch.append(candidate)
        held += candidate[1]
        sizes[candidate[0]] = candidate[1]
    await flush()
    original = sum(sizes[path] for path in chosen)
    stored = sum(size for _coding, size in chosen.values())
    return chosen, CompressionSummary(len(chosen), original, stored)
