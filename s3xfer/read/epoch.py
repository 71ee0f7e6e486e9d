"""A shuffled epoch over a dataset, as pure functions of its catalog and a seed: which files are
read together (blocks), the order of the blocks, each reader's share, the bounded shuffle
buffer, and the small state a reader resumes from. reader.py does the reading.

    catalog (path order) ──blocks──▶ block order (seed, epoch) ──share──▶ this reader's
    segments ──buffer shuffle──▶ the order its files are yielded in

Every step depends on the catalog, the seed, the epoch and the reader's place only (never on
timing), so a reader that starts again from the same state yields the same files in the same
order, and `world_size` readers together yield every file exactly once.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from ..dataset.manifest import ManifestRecord
from ..errors import UsageError

STATE_FORMAT = "s3xfer-epoch-state"
STATE_VERSION = 1
DEFAULT_BUFFER_BYTES = 64 * 1024 * 1024
DEFAULT_BLOCK_BYTES = 1024 * 1024
# A quarter of the buffer holds blocks read ahead (GETs in flight, blocks not yet poured into
# the shuffle pool); the rest is the pool. So a block is at most a quarter of the buffer.
READAHEAD_SHARE = 4


def block_starts(records: Sequence[ManifestRecord], *, block_bytes: int, gap: int) -> list[int]:
    """Where each block starts in `records` (the catalog in path order), then len(records).

    A block is a run of neighbouring members of one shard (same object and ETag, each starting
    at most `gap` bytes after the previous one ends, spanning at most `block_bytes`): what one
    coalesced ranged GET reads. A file stored as its own object is a block alone."""
    starts: list[int] = []
    first_offset = end = 0
    previous: ManifestRecord | None = None
    for index, record in enumerate(records):
        joins = (
            previous is not None
            and record.packed
            and previous.packed
            and (record.key, record.etag) == (previous.key, previous.etag)
            and end <= record.offset <= end + gap
            and record.offset + record.stored - first_offset <= block_bytes
        )
        if not joins:
            starts.append(index)
            first_offset = record.offset
        end = record.offset + record.stored  # a coded file's bytes in the shard
        previous = record
    starts.append(len(records))
    return starts


def block_order(blocks: int, *, seed: int, epoch: int) -> list[int]:
    """The blocks of an epoch in a uniformly random order: a permutation of range(blocks) that
    depends on (seed, epoch) only. random.Random seeded with a string (SHA-512 of it) is the
    same in every process, whatever PYTHONHASHSEED."""
    order = list(range(blocks))
    random.Random(f"s3xfer-epoch/{seed}/{epoch}/blocks").shuffle(order)
    return order


@dataclass(frozen=True, slots=True)
class Segment:
    """The part of one block a reader reads: catalog items [first, first + count)."""

    first: int
    count: int


def reader_share(
    starts: Sequence[int], order: Sequence[int], *, reader: int, readers: int
) -> list[Segment]:
    """Reader `reader` of `readers`: its segments, in the order it reads them.

    The files of every block, blocks in `order`, form one stream; reader r takes items
    [N*r/R, N*(r+1)/R) of it. So the readers' shares partition the files, their sizes differ by
    one file at most (DistributedDataParallel ranks take the same number of steps), and at most
    the two blocks at the ends of a share are split with a neighbour."""
    total = starts[-1]
    low, high = total * reader // readers, total * (reader + 1) // readers
    share: list[Segment] = []
    before = 0  # items of the stream ahead of this block
    for block in order:
        if before >= high:
            break
        first, count = starts[block], starts[block + 1] - starts[block]
        begin, end = max(low, before), min(high, before + count)
        if begin < end:
            share.append(Segment(first + begin - before, end - begin))
        before += count
    return share


class BufferShuffle:
    """A shuffle buffer over a stream of item sizes: items enter in stream order, and while the
    next one does not fit in `capacity` bytes a random held item leaves (at the end, all leave
    in random order). Iterating gives the indexes of items in the order they leave.

    An item larger than the capacity enters an empty pool alone. What has been given out
    after n items is described by `pool` (held items) and `taken` (items that entered):
    items >= taken are still to come."""

    def __init__(self, sizes: Iterable[int], *, capacity: int, rng: random.Random) -> None:
        self.capacity = capacity
        self.pool: list[tuple[int, int]] = []  # (item, size)
        self.pool_bytes = 0
        self.taken = 0
        self._sizes = iter(sizes)
        self._next_size: int | None = None
        self._rng = rng

    def __iter__(self) -> Iterator[int]:
        return self

    def __next__(self) -> int:
        while True:
            if self._next_size is None:
                self._next_size = next(self._sizes, None)
                if self._next_size is None:
                    if self.pool:
                        return self._draw()
                    raise StopIteration
            if self.pool and self.pool_bytes + self._next_size > self.capacity:
                return self._draw()
            self.pool.append((self.taken, self._next_size))
            self.pool_bytes += self._next_size
            self.taken += 1
            self._next_size = None

    def _draw(self) -> int:
        pick = self._rng.randrange(len(self.pool))
        self.pool[pick], self.pool[-1] = self.pool[-1], self.pool[pick]
        item, size = self.pool.pop()
        self.pool_bytes -= size
        return item

    def skip(self, count: int) -> None:
        """Give out `count` items without using them (resuming at a position)."""
        for done in range(count):
            if next(self, None) is None:
                raise UsageError(f"position {count} is past the end of this share ({done} files)")


@dataclass(frozen=True)
class ReaderPlan:
    """One reader's files, in the order their blocks are read, cut into segments: segment k is
    records[starts[k]:starts[k + 1]], one block or the part of one this reader reads."""

    records: list[ManifestRecord]
    starts: list[int]

    def segment_of(self, item: int) -> int:
        return bisect_right(self.starts, item) - 1

    def still_wanted(self, shuffle: BufferShuffle) -> Iterator[tuple[int, list[int]]]:
        """(segment, items) left to read once `shuffle` has given some items out: of the
        segments already poured into the pool only the items it still holds, the later
        segments whole; segments with nothing left are left out. Taken from the shuffle as it
        is now (it may go on while this is iterated)."""
        return self._wanted({item for item, _ in shuffle.pool}, shuffle.taken)

    def _wanted(self, held: set[int], taken: int) -> Iterator[tuple[int, list[int]]]:
        for segment in range(len(self.starts) - 1):
            begin, end = self.starts[segment], self.starts[segment + 1]
            if begin >= taken:
                yield segment, list(range(begin, end))
                continue
            items = [i for i in range(begin, end) if i in held or i >= taken]
            if items:
                yield segment, items


def plan_reader(
    records: Sequence[ManifestRecord],
    *,
    seed: int,
    epoch: int,
    reader: int,
    readers: int,
    block_bytes: int,
    gap: int,
) -> ReaderPlan:
    """Blocks of the catalog (path order), shuffled for (seed, epoch), this reader's share."""
    starts = block_starts(records, block_bytes=block_bytes, gap=gap)
    order = block_order(len(starts) - 1, seed=seed, epoch=epoch)
    mine: list[ManifestRecord] = []
    segment_starts: list[int] = []
    for segment in reader_share(starts, order, reader=reader, readers=readers):
        segment_starts.append(len(mine))
        mine.extend(records[segment.first : segment.first + segment.count])
    segment_starts.append(len(mine))
    return ReaderPlan(mine, segment_starts)


@dataclass(frozen=True)
class EpochState:
    """Where one reader of an epoch stands: small, JSON-able, the same size for any dataset.

    `catalog` is a fingerprint of the manifest the order was computed from ("" until read):
    resuming against a dataset that changed since is refused instead of yielding the wrong
    files. block_bytes, buffer_bytes and patterns shape the order, so they are kept too."""

    seed: int
    epoch: int = 0
    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1
    position: int = 0
    block_bytes: int = DEFAULT_BLOCK_BYTES
    buffer_bytes: int = DEFAULT_BUFFER_BYTES
    patterns: tuple[str, ...] = ()
    catalog: str = ""

    def __post_init__(self) -> None:
        for name in ("seed", "epoch", "rank", "world_size", "worker", "num_workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise UsageError(f"{name} must be an integer, not {value!r}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise UsageError(f"rank {self.rank} is not one of world_size {self.world_size}")
        if self.num_workers < 1 or not 0 <= self.worker < self.num_workers:
            raise UsageError(f"worker {self.worker} is not one of {self.num_workers} workers")
        if self.position < 0:
            raise UsageError(f"position must not be negative, not {self.position}")
        if self.block_bytes < 1 or self.buffer_bytes < READAHEAD_SHARE * self.block_bytes:
            raise UsageError(
                f"block_bytes ({self.block_bytes}) must be at least 1 and at most a quarter of "
                f"buffer_bytes ({self.buffer_bytes})"
            )

    @property
    def reader(self) -> int:
        """This reader's place among all: ranks, each split into its DataLoader workers."""
        return self.rank * self.num_workers + self.worker

    @property
    def readers(self) -> int:
        return self.world_size * self.num_workers

    @property
    def readahead_bytes(self) -> int:
        return self.buffer_bytes // READAHEAD_SHARE

    @property
    def pool_bytes(self) -> int:
        return self.buffer_bytes - self.readahead_bytes

    def plan(self, records: Sequence[ManifestRecord], *, gap: int) -> ReaderPlan:
        return plan_reader(
            records,
            seed=self.seed,
            epoch=self.epoch,
            reader=self.reader,
            readers=self.readers,
            block_bytes=self.block_bytes,
            gap=gap,
        )

    def shuffle(self, plan: ReaderPlan) -> BufferShuffle:
        """The buffer shuffle of this reader's files, at position 0."""
        rng = random.Random(
            f"s3xfer-epoch/{self.seed}/{self.epoch}/{self.reader}/{self.readers}/buffer"
        )
        return BufferShuffle((r.size for r in plan.records), capacity=self.pool_bytes, rng=rng)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"format": STATE_FORMAT, "version": STATE_VERSION}
        for spec in fields(self):
            data[spec.name] = getattr(self, spec.name)
        data["patterns"] = list(self.patterns)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EpochState:
        if not isinstance(data, Mapping) or data.get("format") != STATE_FORMAT:
            raise UsageError("not an s3xfer epoch state (state_dict() of an epoch iterator)")
        if data.get("version") != STATE_VERSION:
            raise UsageError(f"epoch state version {data.get('version')!r} is not known here")
        try:
            values = {spec.name: data[spec.name] for spec in fields(cls)}
            patterns = values["patterns"]
            if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
                raise TypeError("patterns must be a list of strings")
            values["patterns"] = tuple(patterns)
            for name in ("position", "block_bytes", "buffer_bytes"):
                if not isinstance(values[name], int) or isinstance(values[name], bool):
                    raise TypeError(f"{name} must be an integer")
            if not isinstance(values["catalog"], str):
                raise TypeError("catalog must be a string")
        except (KeyError, TypeError) as exc:
            raise UsageError(f"corrupt epoch state: {exc}") from exc
        return cls(**values)

    def resumed_from(self, saved: EpochState) -> EpochState:
        """This reader, at the seed, epoch and position of a saved state. The saved state must
        describe the same reader and the same shape of epoch: another reader's position would
        yield files that belong to someone else."""
        keep = ("seed", "epoch", "position", "catalog")
        differ = [
            f"{spec.name} {getattr(saved, spec.name)!r} (this iterator: "
            f"{getattr(self, spec.name)!r})"
            for spec in fields(self)
            if spec.name not in keep and getattr(saved, spec.name) != getattr(self, spec.name)
        ]
        if differ:
            raise UsageError("the saved epoch state is another reader's: " + "; ".join(differ))
        return saved
