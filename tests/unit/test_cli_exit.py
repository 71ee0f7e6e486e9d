"""The console script's exit: quick (os._exit) once main() is done and nothing else runs,
the usual way otherwise, always with main()'s exit code."""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from s3xfer.cli import main as cli


class QuickExit(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


def run_entry(
    monkeypatch: pytest.MonkeyPatch, outcome: BaseException | None, handlers_run: list[str]
) -> tuple[str, object]:
    """entry() with main() replaced: ('quick', code) or ('usual', code)."""

    def fake_main() -> None:
        if outcome is not None:
            raise outcome

    def quick(code: int) -> None:
        raise QuickExit(code)

    monkeypatch.setattr(cli, "main", fake_main)
    monkeypatch.setattr(os, "_exit", quick)
    monkeypatch.setattr(atexit, "_run_exitfuncs", lambda: handlers_run.append("ran"))
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
def test_a_finished_run_runs_the_exit_handlers_then_exits_quickly_with_its_code(
    monkeypatch: pytest.MonkeyPatch, outcome: BaseException | None, code: int
) -> None:
    handlers_run: list[str] = []
    assert run_entry(monkeypatch, outcome, handlers_run) == ("quick", code)
    assert handlers_run == ["ran"]


def test_a_message_exit_goes_the_usual_way(monkeypatch: pytest.MonkeyPatch) -> None:
    handlers_run: list[str] = []
    assert run_entry(monkeypatch, SystemExit("bad"), handlers_run) == ("usual", "bad")
    assert handlers_run == []  # the interpreter runs them, once


def test_a_live_thread_makes_it_exit_the_usual_way(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    worker = threading.Thread(target=release.wait)
    worker.start()
    try:
        assert run_entry(monkeypatch, SystemExit(1), []) == ("usual", 1)
    finally:
        release.set()
        worker.join()


def test_a_daemon_thread_does_not_keep_it_from_exiting_quickly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # tqdm's monitor is one, and a usual exit would not wait for it either.
    release = threading.Event()
    worker = threading.Thread(target=release.wait, daemon=True)
    worker.start()
    try:
        assert run_entry(monkeypatch, None, []) == ("quick", 0)
    finally:
        release.set()
        worker.join()


def test_a_real_progress_bar_leaves_the_quick_exit_open(tmp_path: Path) -> None:
    # A survey with its bar starts tqdm's monitor thread and registers its exit handler:
    # the command still ends through os._exit (seen by the handler registered here, which
    # a quick exit runs and which reports whether os._exit was reached afterwards).
    (tmp_path / "a.txt").write_bytes(b"a")
    probe = (
        "import atexit, os, sys\n"
        "real_exit = os._exit\n"
        "def reached(code): print('quick', code, file=sys.stderr); real_exit(code)\n"
        "os._exit = reached\n"
        "from s3xfer.cli import main as cli\n"
        f"sys.argv = ['s3xfer', 'survey', {str(tmp_path)!r}]\n"
        "cli.entry()\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "quick 0" in done.stderr


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
