"""A request body is read by awscrt from the caller's buffer itself: a shard part is filled in
a bytearray, and a bytes copy of it for the request held every part in flight twice."""

from __future__ import annotations

import io

from s3xfer.transport.http import _CountingBody, _Exchange


def read_all(body: _CountingBody, size: int = 7) -> bytes:
    out = bytearray()
    chunk = bytearray(size)
    while n := body.readinto(chunk):
        out += chunk[:n]
    return bytes(out)


def test_the_body_reads_the_buffer_not_a_copy() -> None:
    buffer = bytearray(b"abcdefghij")
    body = _CountingBody(buffer, _Exchange(None, None, collect=False))
    buffer[0:3] = b"XYZ"  # a copy taken when the body was made would not see this
    assert read_all(body) == b"XYZdefghij"


def test_a_body_read_again_from_its_start_counts_what_was_read() -> None:
    exchange = _Exchange(None, None, collect=False)
    body = _CountingBody(memoryview(b"0123456789")[2:8], exchange)
    assert read_all(body, 4) == b"234567"
    assert body.seek(0, io.SEEK_SET) == 0  # awscrt rewinds a body to send it again
    assert read_all(body, 100) == b"234567"
    assert body.seek(-2, io.SEEK_END) == 4 and read_all(body) == b"67"
    assert exchange.progress == 14
