"""Checks for every value s3xfer reads back from its own metadata (manifest, catalog, shard
indexes, slice results, plans): one definition of a sane size, offset, mtime, mode, path,
key, ETag and CRC32, and gzip inflated within a bound.

The parsers call these and turn a BadValue into one error naming the object it came from
(errors.CorruptMetadataError). Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import gzip
import json
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final

from ..config import MAX_OBJECT_SIZE, MAX_PART_SIZE, MAX_PARTS, MiB
from ..errors import BadValue, CorruptMetadataError

# os.utime takes nanoseconds as a C time_t of seconds: beyond this it overflows.
_TIME_T_LIMIT: Final = 2**63
MTIME_NS_LIMIT: Final = _TIME_T_LIMIT * 1_000_000_000
PERMISSION_BITS: Final = 0o7777
# Restores never set setuid or setgid (as bsdtar without -p): a dataset must not be able to
# plant a program that runs as the user, or root, who restored it. The sticky bit is kept.
RESTORED_MODE_BITS: Final = 0o1777
MAX_PATH_BYTES: Final = 4096  # Linux PATH_MAX: no longer relative path can be read to upload
MAX_KEY_BYTES: Final = 1024  # S3's limit
MAX_ETAG_CHARS: Final = 1024
TAR_BLOCK: Final = 512

# Inflating s3xfer's gzip metadata: at most MAX_INFLATE_RATIO times its stored size (never
# less than INFLATE_FLOOR), so a small object cannot take a lot of memory (a 2 MB "gzip bomb"
# stops at 128 MiB, not 2 GiB). Writers keep to it: compress_bounded falls back to Huffman-only
# coding (at most 8:1) for the rare metadata that deflates better than WRITER_RATIO (measured:
# 9 for a typical dataset, 20 for 200,000 empty files in one directory, 168 for empty files
# under 16 directories of 250-character names).
MAX_INFLATE_RATIO: Final = 64
WRITER_RATIO: Final = 32
INFLATE_FLOOR: Final = 1 * MiB
INFLATE_CEILING: Final = 4096 * MiB  # gzip records sizes modulo 4 GiB


def corrupt(kind: str, where: str, problem: object) -> CorruptMetadataError:
    """The error for metadata of this kind ("manifest", "catalog piece"...) at `where`."""
    return CorruptMetadataError(f"corrupt dataset metadata: {kind} {where}: {problem}")


def inflate_limit(stored: int) -> int:
    """The most bytes `stored` bytes of s3xfer's gzip metadata may inflate to."""
    return min(INFLATE_CEILING, max(INFLATE_FLOOR, MAX_INFLATE_RATIO * stored))


def compress_bounded(data: bytes) -> bytes:
    """gzip of data that gunzip accepts: deflated as usual, or, when that would inflate more
    than WRITER_RATIO times its size, Huffman-only (each byte at least one bit). Deterministic
    (no timestamp)."""
    packed = gzip.compress(data, mtime=0)
    if len(data) <= WRITER_RATIO * len(packed):
        return packed
    huffman = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS, 9, zlib.Z_HUFFMAN_ONLY)
    return huffman.compress(data) + huffman.flush()


def compress_bounded_pieces(pieces: Callable[[], Iterable[bytes]]) -> bytes:
    """compress_bounded of the concatenation of pieces() (called again in the rare Huffman-only
    case), without ever holding the whole: a manifest of a million files is 150 MB of JSON,
    its gzip a tenth. The stored bytes may differ from compress_bounded's (deflate's header),
    the inflated ones not."""
    deflater = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunks: list[bytes] = []
    size = 0
    for piece in pieces():
        size += len(piece)
        chunks.append(deflater.compress(piece))
    chunks.append(deflater.flush())
    packed = b"".join(chunks)
    if size <= WRITER_RATIO * len(packed):
        return packed
    huffman = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS, 9, zlib.Z_HUFFMAN_ONLY)
    return b"".join([*(huffman.compress(piece) for piece in pieces()), huffman.flush()])


def gunzip(raw: bytes, *, limit: int | None = None) -> bytes:
    """One gzip member, inflated without ever holding more than `limit` bytes (by default
    inflate_limit(len(raw))). Raises BadValue on a broken stream, trailing bytes, or more
    output than the limit."""
    limit = inflate_limit(len(raw)) if limit is None else limit
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip header and trailer
    try:
        out = inflater.decompress(raw, limit + 1)
    except zlib.error as exc:
        raise BadValue(f"not a valid gzip stream: {exc}") from exc
    if len(out) > limit:
        raise BadValue(
            f"inflates to more than {limit:,} bytes ({MAX_INFLATE_RATIO} times its "
            f"{len(raw):,}): refused"
        )
    if not inflater.eof:
        raise BadValue("truncated gzip stream")
    if inflater.unused_data:
        raise BadValue(f"{len(inflater.unused_data):,} bytes after the end of the gzip stream")
    return out


def json_object(raw: bytes | str) -> dict[str, Any]:
    """A JSON document that must be an object."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, RecursionError, json.JSONDecodeError) as exc:
        raise BadValue(f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadValue(f"not a JSON object but {type(data).__name__}")
    return data


_SPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def json_object_rows(
    raw: bytes, rows: str, on_row: Callable[[dict[str, Any], Any], None]
) -> dict[str, Any]:
    """A JSON object (as json_object reads it) whose array field `rows` is decoded one item
    at a time: each item goes to on_row(the fields before it, item) and is not kept; `rows`
    is an empty list in the object returned. So a million rows are never all decoded at
    once (the manifest's files: docs/architecture.md, "Memory per file"). Raises BadValue."""
    try:
        text = raw.decode("utf-8")
        data: dict[str, Any] = {}
        if text[_skip(text, 0) :][:1] != "{":
            return json_object(raw)  # not an object: says what it is instead
        mark, at = _next(text, _skip(text, 0), "{")
        mark, at = (mark, at) if text[at] != "}" else _next(text, at, "}")
        while mark != "}":
            if text[at] != '"':
                raise BadValue(f"not JSON: expected a name at {at}")
            name, at = _DECODER.raw_decode(text, at)
            _, at = _next(text, at, ":")
            if name == rows and text[at] == "[":
                if rows in data:
                    raise BadValue(f"{rows!r} given twice")
                mark, at = _next(text, at, "[")
                mark, at = (mark, at) if text[at] != "]" else _next(text, at, "]")
                while mark != "]":
                    item, at = _DECODER.raw_decode(text, at)
                    on_row(data, item)
                    mark, at = _next(text, at, ",]")
                data[rows] = []
            else:
                data[name], at = _DECODER.raw_decode(text, at)
            mark, at = _next(text, at, ",}")
        if at != len(text):
            raise BadValue(f"not JSON: extra data at {at}")
    except (UnicodeDecodeError, RecursionError, json.JSONDecodeError) as exc:
        raise BadValue(f"not JSON: {exc}") from exc
    except IndexError:
        raise BadValue("not JSON: it ends too soon") from None
    return data


def _skip(text: str, at: int) -> int:
    found = _SPACE.match(text, at)
    assert found is not None  # the pattern matches the empty string
    return found.end()


def _next(text: str, at: int, one_of: str) -> tuple[str, int]:
    """The character at `at` (after spaces), one of `one_of`, and where the next token
    starts (after the spaces that follow it)."""
    at = _skip(text, at)
    mark = text[at]
    if mark not in one_of:
        raise BadValue(f"not JSON: expected one of {one_of!r} at {at}")
    return mark, _skip(text, at + 1)


def envelope(data: dict[str, Any], *, format: str, version: int | tuple[int, ...]) -> None:
    """The `format` and `version` fields name what this reader knows (one of `version`)."""
    known = (version,) if isinstance(version, int) else version
    if data.get("format") != format or data.get("version") not in known:
        raise BadValue(
            f"not an {format} version {' or '.join(map(str, known))} "
            f"(format {data.get('format')!r:.80}, version {data.get('version')!r:.80})"
        )


def field(data: dict[str, Any], name: str) -> Any:
    try:
        return data[name]
    except KeyError:
        raise BadValue(f"no {name!r} field") from None


def array(value: Any, what: str, *, length: int | None = None) -> list[Any]:
    """A JSON array (of exactly `length` items, when given)."""
    if not isinstance(value, list):
        raise BadValue(f"{what} is not a list: {value!r:.80}")
    if length is not None and len(value) != length:
        raise BadValue(f"{what} has {len(value)} fields, expected {length}")
    return value


def integer(value: Any, what: str, *, low: int, high: int) -> int:
    """An integer (JSON true and 1.0 are not) in [low, high]."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadValue(f"{what} is not an integer: {value!r:.80}")
    if value < low:
        raise BadValue(f"{what} {value} is below {low}")
    if value > high:
        raise BadValue(f"{what} {value} is above {high}")
    return value


def size(value: Any, what: str = "size") -> int:
    """A byte count of one object or file: 0 to 5 TiB, S3's largest object."""
    return integer(value, what, low=0, high=MAX_OBJECT_SIZE)


def mtime_ns(value: Any, what: str = "mtime_ns") -> int:
    """A modification time that the local file system can be given (os.utime)."""
    return integer(value, what, low=-MTIME_NS_LIMIT, high=MTIME_NS_LIMIT - 1)


def mtime_seconds(value: Any, what: str = "mtime") -> int:
    return integer(value, what, low=-_TIME_T_LIMIT, high=_TIME_T_LIMIT - 1)


def mode(value: Any, what: str = "mode") -> int:
    """Permission bits only (0 to 0o7777): no file type, nothing negative."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadValue(f"{what} is not an integer: {value!r:.80}")
    if not 0 <= value <= PERMISSION_BITS:
        raise BadValue(f"{what} {value:#o} is not permission bits (0 to 0o7777)")
    return value


def restored_mode(value: int) -> int:
    """The mode a restored file gets: its permission bits without setuid and setgid."""
    return value & RESTORED_MODE_BITS


def text(value: Any, what: str, *, max_bytes: int, empty: bool = False) -> str:
    """A string (possibly holding undecodable bytes as lone surrogates, as os.scandir gives
    them) of at most max_bytes once encoded, without NUL."""
    if not isinstance(value, str):
        raise BadValue(f"{what} is not a string: {value!r:.80}")
    if not value and not empty:
        raise BadValue(f"{what} is empty")
    try:
        encoded = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise BadValue(f"{what} {value!r:.80} is not encodable: {exc.reason}") from exc
    if len(encoded) > max_bytes:
        raise BadValue(f"{what} is {len(encoded):,} bytes long, more than {max_bytes:,}")
    if "\x00" in value:
        raise BadValue(f"{what} {value!r:.80} holds a NUL character")
    return value


# Quick yeses for the common case, used by parsers before the full checks (which they call
# only when a quick check says no, to accept the value after all or to say what is wrong):
# a million-file manifest is read in seconds. Each must never accept what the full check
# refuses (tests/unit/test_validate.py checks they agree).
_PLAIN_CRC32 = re.compile(r"(?:[A-Za-z0-9+/]{6}==)?")


def is_plain_path(value: Any) -> bool:
    """An ASCII relative_path (which ASCII-only, short paths mostly are)."""
    if type(value) is not str or not 0 < len(value) <= MAX_PATH_BYTES or not value.isascii():
        return False
    framed = f"/{value}/"
    return (
        "//" not in framed
        and "/./" not in framed
        and "/../" not in framed
        and ("\x00" not in value)
    )


def is_plain_text(value: Any, max_bytes: int) -> bool:
    """A non-empty ASCII text() of at most max_bytes."""
    return (
        type(value) is str
        and 0 < len(value) <= max_bytes
        and value.isascii()
        and "\x00" not in value
    )


def is_plain_etag(value: Any) -> bool:
    return (
        type(value) is str
        and len(value) <= MAX_ETAG_CHARS
        and value.isascii()
        and (value.isprintable())
    )


def is_plain_crc32(value: Any) -> bool:
    return type(value) is str and _PLAIN_CRC32.fullmatch(value) is not None


def relative_path(value: Any, what: str = "path") -> str:
    """A dataset path: relative, '/'-separated, normalized (no empty, '.' or '..' component)
    and without NUL, so that it can only name a file inside the destination."""
    path = text(value, what, max_bytes=MAX_PATH_BYTES)
    if path.startswith("/"):
        raise BadValue(f"{what} {path!r:.200} is absolute")
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise BadValue(f"{what} {path!r:.200} is not normalized (empty, '.' or '..' component)")
    return path


def object_key(value: Any, what: str = "key") -> str:
    return text(value, what, max_bytes=MAX_KEY_BYTES)


def etag(value: Any, what: str = "etag") -> str:
    """An ETag (sent back as If-Match): printable ASCII only, so never a header injection."""
    tag = text(value, what, max_bytes=MAX_ETAG_CHARS, empty=True)
    if not all(" " <= c <= "~" for c in tag):
        raise BadValue(f"{what} {tag!r:.80} is not printable ASCII")
    return tag


MAX_CONTENT_TYPE_CHARS = 256


def content_type(value: Any, what: str = "content_type") -> str:
    """A recorded Content-Type: printable ASCII (reported, never sent as a header), or empty
    when not known."""
    kind = text(value, what, max_bytes=MAX_CONTENT_TYPE_CHARS, empty=True)
    if not all(" " <= c <= "~" for c in kind):
        raise BadValue(f"{what} {kind!r:.80} is not printable ASCII")
    return kind


def is_plain_content_type(value: Any) -> bool:
    return (
        type(value) is str
        and len(value) <= MAX_CONTENT_TYPE_CHARS
        and value.isascii()
        and value.isprintable()
    )


def crc32_base64(value: Any, what: str = "crc32") -> str:
    """The base64 of a big-endian CRC32 (8 characters), or empty when not known."""
    crc = text(value, what, max_bytes=8, empty=True)
    if crc:
        try:
            ok = len(base64.b64decode(crc, validate=True)) == 4
        except binascii.Error:
            ok = False
        if not ok:
            raise BadValue(f"{what} {crc!r} is not the base64 of 4 bytes")
    return crc


def part_size(value: Any, object_size: int, what: str = "part_size") -> int:
    """0 (one PUT), or a part size S3 allows that cuts the object into at most 10,000 parts."""
    part = integer(value, what, low=0, high=MAX_PART_SIZE)
    if part and -(-object_size // part) > MAX_PARTS:
        raise BadValue(f"{what} {part} cuts {object_size} bytes into more than {MAX_PARTS} parts")
    return part


def shard_offset(value: Any, length: int, what: str = "offset") -> int:
    """Where a packed file's data starts in its tar shard: after a 512-byte header at least,
    on a 512-byte block, with the file's `length` bytes inside the largest object S3 holds."""
    offset = integer(value, what, low=TAR_BLOCK, high=MAX_OBJECT_SIZE - length)
    if offset % TAR_BLOCK:
        raise BadValue(f"{what} {offset} is not on a {TAR_BLOCK}-byte tar block")
    return offset


GUNZIP_PIECE = 1 * MiB  # inflated at once by gunzip_pieces


def gunzip_pieces(raw: bytes, *, limit: int | None = None) -> Iterator[bytes]:
    """gunzip(raw) a piece of at most GUNZIP_PIECE bytes at a time, never the whole (a
    manifest of a million files inflates to 150 MB). The same checks, raised as BadValue
    when the piece they concern is reached."""
    limit = inflate_limit(len(raw)) if limit is None else limit
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    pending = raw
    total = 0
    while not inflater.eof:
        try:
            out = inflater.decompress(pending, GUNZIP_PIECE)
        except zlib.error as exc:
            raise BadValue(f"not a valid gzip stream: {exc}") from exc
        pending = inflater.unconsumed_tail
        total += len(out)
        if total > limit:
            raise BadValue(
                f"inflates to more than {limit:,} bytes ({MAX_INFLATE_RATIO} times its "
                f"{len(raw):,}): refused"
            )
        if out:
            yield out
        elif not pending and not inflater.eof:
            raise BadValue("truncated gzip stream")
    if inflater.unused_data:
        raise BadValue(f"{len(inflater.unused_data):,} bytes after the end of the gzip stream")


class ObjectRowStream:
    """json_object_rows over text that comes in pieces: the items of the array field `rows`
    one at a time (iterating), with the fields before it in `before`; once every item was
    taken, `data` is the whole object (`rows` an empty list). Only the text of one item, and
    of one piece, is held. Raises BadValue as json_object_rows does."""

    def __init__(self, pieces: Iterable[bytes], rows: str) -> None:
        self._pieces = iter(pieces)
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._text = ""
        self._at = 0
        self._eof = False
        self._rows = rows
        self.before: dict[str, Any] = {}
        self.data: dict[str, Any] | None = None

    def _more(self) -> bool:
        """Append the next piece to what is left unread; False at the end of the input."""
        if self._eof:
            return False
        piece = next(self._pieces, None)
        try:
            added = self._decoder.decode(piece or b"", final=piece is None)
        except UnicodeDecodeError as exc:
            raise BadValue(f"not JSON: {exc}") from exc
        self._eof = piece is None
        self._text = self._text[self._at :] + added
        self._at = 0
        return True

    def _mark(self, one_of: str) -> str:
        """The next character after spaces, one of `one_of`, consumed."""
        while True:
            self._at = _skip(self._text, self._at)
            if self._at < len(self._text):
                break
            if not self._more():
                raise BadValue("not JSON: it ends too soon")
        mark = self._text[self._at]
        if mark not in one_of:
            raise BadValue(f"not JSON: expected one of {one_of!r}")
        self._at += 1
        return mark

    def _peek(self) -> str:
        """The next character after spaces, not consumed."""
        while True:
            self._at = _skip(self._text, self._at)
            if self._at < len(self._text):
                return self._text[self._at]
            if not self._more():
                raise BadValue("not JSON: it ends too soon")

    def _value(self) -> Any:
        """The next JSON value. A value that ends where the text read so far ends may go on
        (a number cut by a piece boundary): decoded again with more text."""
        self._peek()
        while True:
            try:
                value, end = _DECODER.raw_decode(self._text, self._at)
            except json.JSONDecodeError as exc:
                if not self._more():
                    raise BadValue(f"not JSON: {exc}") from exc
                continue
            except RecursionError as exc:
                raise BadValue(f"not JSON: {exc}") from exc
            if end == len(self._text) and self._more():
                continue
            self._at = end
            return value

    def __iter__(self) -> Iterator[Any]:
        if self._peek() != "{":
            raise BadValue("not a JSON object")
        self._mark("{")
        data = self.before
        mark = "," if self._peek() != "}" else self._mark("}")
        while mark != "}":
            if self._peek() != '"':
                raise BadValue("not JSON: expected a name")
            name = self._value()
            self._mark(":")
            if name == self._rows and self._peek() == "[":
                if name in data:
                    raise BadValue(f"{name!r} given twice")
                self._mark("[")
                item_mark = "," if self._peek() != "]" else self._mark("]")
                while item_mark != "]":
                    yield self._value()
                    item_mark = self._mark(",]")
                data[name] = []
            else:
                data[name] = self._value()
            mark = self._mark(",}")
        while True:
            self._at = _skip(self._text, self._at)
            if self._at < len(self._text):
                raise BadValue("not JSON: extra data after the object")
            if not self._more():
                break
        self.data = data
