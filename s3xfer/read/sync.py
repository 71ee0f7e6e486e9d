"""SyncDataset: the Dataset API for synchronous code (a training loop, a notebook, DataLoader
workers), each call run on an event loop in a thread of its own; SyncEpoch iterates a
shuffled epoch from there.

    with SyncDataset("s3://bucket/data") as ds:
        image = ds.read("images/07/img_00742.jpg")
        for path, data in ds.iter_epoch(seed=7):   # every file once, shuffled, big reads
            ...
"""

from __future__ import annotations

import io
import os
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Self, cast

import anyio

from ..dataset.keys import S3Url
from ..dataset.manifest import ManifestRecord
from ..errors import S3XferError, UsageError
from .epoch import DEFAULT_BLOCK_BYTES, DEFAULT_BUFFER_BYTES, EpochState
from .epoch_iter import Batch, Epoch, EpochStats, epoch_state
from .reader import Dataset, ReadStats

if TYPE_CHECKING:
    from anyio.from_thread import BlockingPortal


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
