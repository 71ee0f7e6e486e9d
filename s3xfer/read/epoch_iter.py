"""The iterator of one reader's share of a shuffled epoch (`Dataset.iter_epoch`): it walks the
pure schedule of epoch.py, reads its segments ahead within a byte budget, and hands files on
in batches; `state_dict()` resumes it. Also where a DataLoader worker finds its share.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import anyio

from ..budget import ByteBudget
from ..dataset.manifest import ManifestRecord
from ..errors import PartialReadError, S3XferError, UsageError, first_leaf
from .epoch import EpochState, ReaderPlan

if TYPE_CHECKING:
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

    from .reader import Dataset  # which makes an Epoch (Dataset.iter_epoch)


# An epoch hands its files to the consumer in batches of at most this many (one portal call
# each for SyncDataset), or fewer when the next file is still being read.
EPOCH_BATCH_FILES = 256


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
