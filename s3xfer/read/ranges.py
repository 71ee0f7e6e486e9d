"""Pure range logic for reads: merge nearby member ranges into single GETs, and check what a
ranged GET returned. One GET always asks for one range: multi-range headers are never sent
(some S3 front ends answer them with the whole object)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import IntegrityError

DEFAULT_GAP = 256 * 1024  # reading this many unwanted bytes costs less than another request
DEFAULT_MAX_SPAN = 8 * 1024 * 1024  # larger reads go as several GETs, fetched in parallel


@dataclass(frozen=True, slots=True)
class Wanted:
    """One file's bytes: [offset, offset + size) of object `key`, as catalogued with `etag`."""

    path: str
    key: str
    offset: int
    size: int
    etag: str = ""


@dataclass(frozen=True, slots=True)
class RangeGet:
    """One GET of bytes [start, end) of `key`, serving several wanted files catalogued with
    the same `etag` (sent as If-Match)."""

    key: str
    start: int
    end: int
    members: tuple[Wanted, ...]
    etag: str = ""

    @property
    def header(self) -> str:
        return f"bytes={self.start}-{self.end - 1}"

    def slice_of(self, body: bytes, wanted: Wanted) -> bytes:
        return body[wanted.offset - self.start : wanted.offset - self.start + wanted.size]


def coalesce(
    wanted: Iterable[Wanted], *, gap: int = DEFAULT_GAP, max_span: int = DEFAULT_MAX_SPAN
) -> list[RangeGet]:
    """Group wanted ranges into GETs: same object and ETag, at most `gap` bytes apart, each GET
    at most `max_span` long unless ranges overlap (a single larger file still gets its own GET).
    Empty files need no GET. Records of one key catalogued with different ETags never share a
    GET: the If-Match of one must not refuse the bytes of the others."""
    by_key: dict[tuple[str, str], list[Wanted]] = {}
    for item in wanted:
        if item.size > 0:
            by_key.setdefault((item.key, item.etag), []).append(item)
    gets: list[RangeGet] = []
    for key, etag in sorted(by_key):
        items = sorted(by_key[key, etag], key=lambda w: (w.offset, w.size))
        group = [items[0]]
        start, end = items[0].offset, items[0].offset + items[0].size
        for item in items[1:]:
            item_end = item.offset + item.size
            overlaps = item.offset < end  # overlapping ranges are never fetched twice
            if overlaps or (item.offset - end <= gap and item_end - start <= max_span):
                group.append(item)
                end = max(end, item_end)
            else:
                gets.append(RangeGet(key, start, end, tuple(group), etag))
                group, start, end = [item], item.offset, item_end
        gets.append(RangeGet(key, start, end, tuple(group), etag))
    return gets


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def check_ranged_response(
    get: RangeGet, *, status: int, content_range: str | None, body_length: int, where: str
) -> None:
    """A ranged GET must answer 206 with exactly the asked range; anything else is refused."""
    if status != 206:
        raise IntegrityError(
            f"{where}: expected 206 Partial Content for {get.header}, got {status}"
        )
    match = _CONTENT_RANGE.fullmatch(content_range or "")
    if not match or (int(match.group(1)), int(match.group(2))) != (get.start, get.end - 1):
        raise IntegrityError(
            f"{where}: asked for {get.header}, server answered Content-Range {content_range!r}"
        )
    if body_length != get.end - get.start:
        raise IntegrityError(
            f"{where}: truncated response, {body_length} of {get.end - get.start} bytes"
        )
