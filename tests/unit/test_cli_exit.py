"""The console script's exit: quick (os._exit) once main() is done and nothing else runs,
the usual way otherwise, always with main()'s exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from s3xfer import cli


class QuickExit(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


def run_entry(monkeypatch: pytest.MonkeyPatch, outcome: BaseException | None) -> tuple[str, object]:
    """entry() with main() replaced: ('quick', code) or ('usual', code)."""

    def fake_main() -> None:
        if outcome is not None:
            raise outcome

    def quick(code: int) -> None:
        raise QuickExit(code)

    monkeypatch.setattr(cli, "main", fake_main)
    monkeypatch.setattr(os, "_exit", quick)
    monkeypatch.setattr(cli, "_exit_handlers", lambda: 1)
    try:
        cli.entry()
    except QuickExit as done:
        return "quick", done.code
    except SystemExit as stop:
        return "usual", stop.code
    raise AssertionError("entry() returned")


@pytest.mark.parametrize(
    ("outcome", "code"), [(None, 0), (SystemExit(0), 0), (SystemExit(None), 0), (SystemExit(3), 3)]
)
def test_a_finished_run_exits_quickly_with_its_code(
    monkeypatch: pytest.MonkeyPatch, outcome: BaseException | None, code: int
) -> None:
    # As in the command's own process, where main() leaves no thread: earlier tests of this
    # pytest process leave threads of theirs (awscrt's event-loop threads, once they have run
    # a Python callback, stay counted as dummy threads for good).
    monkeypatch.setattr(threading, "active_count", lambda: 1)
    assert run_entry(monkeypatch, outcome) == ("quick", code)


def test_a_message_exit_goes_the_usual_way(monkeypatch: pytest.MonkeyPatch) -> None:
    assert run_entry(monkeypatch, SystemExit("bad")) == ("usual", "bad")


def test_another_live_thread_makes_it_exit_the_usual_way(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    worker = threading.Thread(target=release.wait)
    worker.start()
    try:
        assert run_entry(monkeypatch, SystemExit(1)) == ("usual", 1)
    finally:
        release.set()
        worker.join()


def test_an_exit_handler_of_a_library_makes_it_exit_the_usual_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cli, "main", lambda: None)
    monkeypatch.setattr(cli, "_exit_handlers", lambda: 2)
    with pytest.raises(SystemExit) as stop:
        cli.entry()
    assert stop.value.code == 0


def test_piped_output_arrives_whole(tmp_path: Path) -> None:
    for n in range(2000):
        (tmp_path / f"file-{n:04d}.txt").write_bytes(b"x" * n)
    done = subprocess.run(
        [sys.executable, "-m", "s3xfer", "survey", str(tmp_path), "--json"],
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["stats"]["count"] == 2000
