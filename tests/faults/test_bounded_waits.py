"""Reads that a person waits on end in seconds, and what s3xfer prints is safe (issue 12,
case 11): `cat` and `get` against an endpoint that accepts connections and never answers
give up after their read timeout (twice) or their --deadline; an endpoint URL with
credentials is refused without echoing them; `ls` escapes control characters in names.

The silent endpoint is a real loopback TCP server, in the test, that accepts every
connection, reads every request and never answers a byte."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from s3xfer.errors import redact_credentials
from s3xfer.locals3 import LocalS3Info

from ..integration.helpers import run_cli

ENV = {"AWS_ACCESS_KEY_ID": "AKIDTEST", "AWS_SECRET_ACCESS_KEY": "test-secret",
       "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
SECRET = "hunter2"


class SilentEndpoint:
    """Accepts connections on 127.0.0.1, reads requests, never answers; counts requests."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:  # closed
                return
            self._connections.append(connection)
            threading.Thread(target=self._read, args=(connection,), daemon=True).start()

    def _read(self, connection: socket.socket) -> None:
        pending = b""
        while True:
            try:
                data = connection.recv(65536)
            except OSError:
                return
            if not data:
                return
            pending += data
            while b"\r\n\r\n" in pending:  # GETs: no body
                head, pending = pending.split(b"\r\n\r\n", 1)
                with self._lock:
                    self.requests.append(head.split(b"\r\n", 1)[0].decode())

    def close(self) -> None:
        self.listener.close()
        for connection in self._connections:
            connection.close()


@pytest.fixture
def silent() -> Iterator[SilentEndpoint]:
    endpoint = SilentEndpoint()
    try:
        yield endpoint
    finally:
        endpoint.close()


def test_cat_gives_up_on_a_silent_endpoint_after_its_read_timeout_twice(
    silent: SilentEndpoint,
) -> None:
    # The defaults: a response that has not started in 10 s is asked once more, then cat fails
    # (it waited 10 x 60 s before). The subprocess timeout only guards the test run.
    result = run_cli(
        "cat", "s3://bkt/ds", "a.txt", "--endpoint-url", silent.url, env=ENV, timeout=100
    )
    assert result.returncode == 3, result.stderr
    assert "no response for 10 s" in result.stderr
    assert len(silent.requests) == 2 and len(set(silent.requests)) == 1  # one GET, twice


def test_get_gives_up_after_the_read_timeout_given(silent: SilentEndpoint, tmp_path: Path) -> None:
    result = run_cli(
        "get", "s3://bkt/ds", "a.txt", str(tmp_path / "out"),
        "--endpoint-url", silent.url, "--read-timeout", "0.5", env=ENV, timeout=60,
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert "no response for 0.5 s" in result.stderr
    assert len(silent.requests) == 2


@pytest.mark.parametrize("command", ["cat", "get"])
def test_a_deadline_bounds_the_whole_read(
    silent: SilentEndpoint, tmp_path: Path, command: str
) -> None:
    args = ["a.txt"] if command == "cat" else ["a.txt", str(tmp_path / "out")]
    result = run_cli(
        command, "s3://bkt/ds", *args, "--endpoint-url", silent.url,
        "--read-timeout", "600", "--deadline", "1", env=ENV, timeout=60,
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert result.stderr.strip() == "s3xfer: error: gave up after 1 s (--deadline)"
    assert len(silent.requests) == 1  # still waiting for the first answer when it gave up


COMMANDS = [
    ["ls", "s3://bkt/ds"],
    ["cat", "s3://bkt/ds", "a.txt"],
    ["get", "s3://bkt/ds", "a.txt", "OUT"],
    ["download", "s3://bkt/ds", "OUT"],
    ["upload", "SRC", "s3://bkt/ds"],
    ["cleanup", "s3://bkt/ds"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=[c[0] for c in COMMANDS])
@pytest.mark.parametrize("how", ["option", "environment"])
def test_credentials_in_an_endpoint_url_are_refused_and_never_echoed(
    silent: SilentEndpoint, tmp_path: Path, command: list[str], how: str
) -> None:
    (tmp_path / "SRC").mkdir()
    (tmp_path / "SRC" / "a.txt").write_text("a")
    argv = [str(tmp_path / a) if a in ("OUT", "SRC") else a for a in command]
    endpoint = silent.url.replace("http://", f"http://user:{SECRET}@")
    if how == "option":
        result = run_cli(*argv, "--endpoint-url", endpoint, env=ENV, timeout=60)
    else:
        result = run_cli(*argv, env={**ENV, "AWS_ENDPOINT_URL": endpoint}, timeout=60)
    assert result.returncode == 2, result.stderr
    assert SECRET not in result.stdout + result.stderr
    assert "http://***@127.0.0.1" in result.stderr and "holds credentials" in result.stderr
    assert silent.requests == []  # refused before anything was sent


def test_a_malformed_endpoint_url_is_one_line_without_its_credentials() -> None:
    result = run_cli(
        "ls", "s3://bkt/ds", "--endpoint-url", f"http://u:{SECRET}@127.0.0.1:80x", env=ENV
    )
    assert result.returncode == 2, result.stderr  # was 70, "internal error"
    assert SECRET not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_every_url_in_a_message_loses_its_credentials() -> None:
    text = (
        f"cannot reach http://user:{SECRET}@h:9/x via https://:{SECRET}@proxy:3128 or "
        f"redis://:{SECRET}@q:6379/0; s3://bucket/a@b.txt and http://h/p@q stay"
    )
    assert redact_credentials(text) == (
        "cannot reach http://***@h:9/x via https://***@proxy:3128 or redis://***@q:6379/0; "
        "s3://bucket/a@b.txt and http://h/p@q stay"
    )


NAMES = {
    "esc\x1b[31mred.txt": b"1",  # an escape sequence would recolour the terminal
    "esc\\x1b[31mred.txt": b"2",  # the same, spelled out with a backslash: must differ
    "new\nline.txt": b"3",
    "tab\there.txt": b"4",
    "rlo\u202etxt.exe": b"5",  # a bidirectional override would show "exe.txt"
    "plain.txt": b"6",
}


def test_ls_escapes_control_characters_and_json_keeps_the_names(
    s3_env: LocalS3Info, bucket: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name, data in NAMES.items():
        (src / name).write_bytes(data)
    url = f"s3://{bucket}/ds"
    uploaded = run_cli("upload", str(src), url, "--quiet")
    assert uploaded.returncode == 0, uploaded.stderr

    listed = run_cli("ls", url)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == len(NAMES)  # one line per file: no name broke a line
    names = [line[len(f"{0:>14,}  object  ") :] for line in lines]  # size, where, path
    assert sorted(names) == sorted(
        [
            "esc\\x1b[31mred.txt",
            "esc\\\\x1b[31mred.txt",
            "new\\x0aline.txt",
            "tab\\x09here.txt",
            "rlo\\u202etxt.exe",
            "plain.txt",
        ]
    )
    assert all(line.isprintable() for line in lines)

    as_json: list[dict[str, Any]] = json.loads(run_cli("ls", url, "--json").stdout)
    assert sorted(item["path"] for item in as_json) == sorted(NAMES)
