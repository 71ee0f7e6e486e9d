"""Helpers for fault tests: servers run in a thread (for CLI subprocesses), journals read."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio

from s3xfer.journal import decode_line

T = TypeVar("T")


@contextmanager
def serving_in_thread(
    make: Callable[[], AbstractAsyncContextManager[T]], endpoint: Callable[[T], str]
) -> Iterator[str]:
    """Run an async server (a proxy) on its own event loop in a thread; yield its endpoint."""
    ready: queue.Queue[str | BaseException] = queue.Queue()
    stop = threading.Event()

    async def main() -> None:
        try:
            async with make() as server:
                ready.put(endpoint(server))
                await anyio.to_thread.run_sync(stop.wait)
        except BaseException as exc:  # reported to the test thread
            ready.put(exc)

    thread = threading.Thread(target=anyio.run, args=(main,), daemon=True)
    thread.start()
    first = ready.get(timeout=30)
    if isinstance(first, BaseException):
        raise first
    try:
        yield first
    finally:
        stop.set()
        thread.join(timeout=30)


def journal_events(path: Path) -> list[dict[str, Any]]:
    """The whole, valid lines of a journal (a torn tail is ignored)."""
    if not path.exists():
        return []
    events = []
    for line in path.read_bytes().splitlines(keepends=True):
        event = decode_line(line)
        if event is None:
            break
        events.append(event)
    return events
