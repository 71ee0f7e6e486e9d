"""Helpers for fault tests: servers run in a thread (for CLI subprocesses), journals read."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest

from s3xfer.journal import decode_line

T = TypeVar("T")
Events = list[dict[str, Any]]


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


def interrupt_upload(
    argv: list[str],
    *,
    env: dict[str, str],
    journal: Path,
    condition: Callable[[Events], bool],
    how: signal.Signals = signal.SIGKILL,
) -> Events:
    """Run the CLI, send it `how` as soon as its journal satisfies `condition`; the journal's
    events at that moment. SIGTERM must stop it like Ctrl-C, saying how to resume."""
    process = subprocess.Popen(
        [sys.executable, "-m", "s3xfer", *argv],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            events = journal_events(journal)
            if condition(events):
                process.send_signal(how)
                code = process.wait(timeout=60)
                if how == signal.SIGTERM:
                    stderr = process.stderr.read().decode() if process.stderr else ""
                    assert code == 130 and "run the same command again" in stderr, stderr
                return events
            if process.poll() is not None:
                stderr = process.stderr.read().decode() if process.stderr else ""
                pytest.fail(f"the upload ended before the crash point: {stderr}")
            time.sleep(0.005)
        pytest.fail("the crash point was never reached")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr:
            process.stderr.close()
