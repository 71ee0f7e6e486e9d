"""Helpers for fault tests: servers run in a thread (for CLI subprocesses), journals read."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from s3xfer.locals3 import LocalS3Info
from s3xfer.write.journal import decode_line
from tests.faultproxy import FaultProxy

T = TypeVar("T")
Events = list[dict[str, Any]]


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
                    assert code == 130 and "run the same command again" in stderr, (code, stderr)
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


# Crash points, as conditions on a journal's events (tests and benchmarks/faults.py).
def finished(events: Events) -> int:
    """Files and shards the journal records as stored."""
    return sum(e["e"] in ("file", "shard") for e in events)


def part_of_a_large_file_sent(events: Events) -> bool:
    return any(e["e"] == "part" for e in events)


def shard_in_flight_after_another_is_done(events: Events) -> bool:
    opened = {e["id"] for e in events if e["e"] == "mpu" and e["path"] is None}
    closed = {e["id"] for e in events if e["e"] == "closed"}
    return bool(opened - closed) and any(e["e"] == "shard" for e in events)


def upload_holding(
    args: list[str],
    *,
    info: LocalS3Info,
    hold: str,
    meanwhile: Callable[[subprocess.Popen[str]], object],
) -> subprocess.CompletedProcess[str]:
    """Run `s3xfer upload ARGS` through a proxy that holds the requests whose target matches
    `hold` until `meanwhile(the upload's process)` has run."""
    proxy = FaultProxy(info.endpoint_url)
    held = proxy.hold(hold)
    with proxy.running() as endpoint:
        process = subprocess.Popen(
            [sys.executable, "-m", "s3xfer", "upload", *args, "--endpoint-url", endpoint],
            env={**os.environ, **info.env()},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            if not held.arrived.wait(timeout=120):
                process.kill()
                pytest.fail(f"the upload never sent the request to hold: {process.communicate()}")
            meanwhile(process)
        finally:
            held.release()
            stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
