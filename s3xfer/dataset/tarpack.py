"""Tar shard layout: ustar/pax header bytes, exact member offsets, and a streaming shard writer.

Owns the byte format of shards (plain POSIX tar) and of their index, which maps each member
to the one byte range a ranged GET needs. Pure: no S3, no files, no asyncio.
"""

from __future__ import annotations

import bisect
import itertools
import json
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

from ..errors import BadValue, UsageError
from . import validate

BLOCK: Final = 512
END_OF_ARCHIVE: Final = bytes(2 * BLOCK)
INDEX_MEMBER_NAME: Final = ".s3xfer-index.json"
INDEX_FORMAT: Final = "s3xfer-shard-index"
INDEX_VERSION: Final = 1
# Version 2: entries of coded members (docs/format.md, "Coded files") also name their coding
# and original size; written only when some member is coded.
CODED_INDEX_VERSION: Final = 2

# Largest values the ustar octal fields hold (11 digits for size/mtime, 7 for mode).
_MAX_USTAR_SIZE: Final = 8**11 - 1
_MAX_USTAR_MTIME: Final = 8**11 - 1
_NAME_LEN: Final = 100
_PREFIX_LEN: Final = 155
_PAX_HEADER_NAME: Final = b"././@PaxHeader"
_PAX_HEADER_MODE: Final = 0o644
EXTRA_MEMBER_MODE: Final = 0o644


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _check_name(name: str) -> None:
    # Canonical relative names only: they must extract inside the destination, and one path
    # must have one spelling so that index lookups and `tar -x` agree.
    if validate.is_plain_path(name):
        return  # the usual name, told valid at a fraction of the cost (a plan checks each)
    try:
        validate.relative_path(name, "tar member name")
    except BadValue as exc:
        raise UsageError(str(exc)) from exc


def _encode_name(name: str) -> bytes:
    # Names from os.scandir carry undecodable bytes as lone surrogates; surrogateescape gives
    # back the original bytes.
    return name.encode("utf-8", "surrogateescape")


def _split_ustar(raw: bytes) -> tuple[bytes, bytes] | None:
    """(prefix, name) fields holding `raw`, or None when ustar cannot hold it."""
    if len(raw) <= _NAME_LEN:
        return b"", raw
    # The reader rebuilds prefix + "/" + name; the leftmost usable slash keeps the most in name.
    start = len(raw) - _NAME_LEN - 1
    for slash in range(max(start, 1), min(len(raw) - 1, _PREFIX_LEN + 1)):
        if raw[slash] == ord("/"):
            return raw[:slash], raw[slash + 1 :]
    return None


def _pax_record(key: str, value: bytes) -> bytes:
    # "%d key=value\n" where %d counts the whole record, including its own digits.
    body = b" " + key.encode("ascii") + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode("ascii") + body


def _pax_data(name: str, size: int) -> bytes:
    """Extended-header records this member needs; empty when plain ustar holds it."""
    records: list[bytes] = []
    if not name.isascii() or _split_ustar(name.encode("ascii")) is None:
        # No hdrcharset=BINARY for undecodable names: GNU tar 1.34 warns it is unknown, and
        # both GNU tar and tarfile already take the raw bytes when they are not UTF-8.
        records.append(_pax_record("path", _encode_name(name)))
    if size > _MAX_USTAR_SIZE:
        records.append(_pax_record("size", str(size).encode("ascii")))
    return b"".join(records)


def _octal(value: int, width: int) -> bytes:
    return f"{value:0{width - 1}o}".encode("ascii") + b"\x00"


def _ustar_block(
    name_field: bytes, *, prefix_field: bytes, size: int, mtime: int, mode: int, typeflag: bytes
) -> bytes:
    header = bytearray(BLOCK)
    header[0 : len(name_field)] = name_field
    header[100:108] = _octal(mode, 8)
    header[108:116] = _octal(0, 8)  # uid
    header[116:124] = _octal(0, 8)  # gid
    header[124:136] = _octal(size, 12)
    header[136:148] = _octal(mtime, 12)
    header[148:156] = b" " * 8  # the checksum is computed with its own field as spaces
    header[156:157] = typeflag
    header[257:263] = b"ustar\x00"
    header[263:265] = b"00"
    # uname/gname (265:329) stay empty: readers then fall back to the numeric ids.
    header[329:337] = _octal(0, 8)  # devmajor
    header[337:345] = _octal(0, 8)  # devminor
    header[345 : 345 + len(prefix_field)] = prefix_field
    # GNU tar and POSIX: six octal digits, NUL, space.
    header[148:156] = f"{sum(header):06o}".encode("ascii") + b"\x00 "
    return bytes(header)


def _fallback_ustar_name(name: str) -> tuple[bytes, bytes]:
    # Only readers that ignore pax headers ever see this; keep it ASCII and within the fields.
    raw = name.encode("ascii", "replace")
    return _split_ustar(raw) or (b"", raw[:_NAME_LEN])


def clamp_mtime(mtime: int) -> int:
    """The mtime a shard header records: ustar's range, 1970 to 2242, so every header's size
    depends on the name and size alone and shard sizes can be planned from those."""
    return min(max(mtime, 0), _MAX_USTAR_MTIME)


@dataclass(frozen=True, slots=True)
class MemberLayout:
    """Where one member's bytes go: its header blocks, then its data padded to 512."""

    name: str
    header_bytes: bytes  # pax header blocks (if any) + the ustar header
    data_size: int

    @property
    def header_size(self) -> int:
        return len(self.header_bytes)

    @property
    def padded_size(self) -> int:
        return _padded(self.data_size)

    @property
    def padding(self) -> bytes:
        return bytes(self.padded_size - self.data_size)

    @property
    def total_size(self) -> int:
        return self.header_size + self.padded_size


def member_layout(name: str, size: int, *, mtime: int, mode: int) -> MemberLayout:
    """Header bytes and sizes of a regular-file member. mtime is clamped (see clamp_mtime),
    mode is masked to its permission bits."""
    _check_name(name)
    if size < 0:
        raise UsageError(f"tar member size must be >= 0: {name!r} has {size}")
    mtime = clamp_mtime(mtime)
    pax = _pax_data(name, size)
    blocks: list[bytes] = []
    if pax:
        blocks.append(
            _ustar_block(
                _PAX_HEADER_NAME,
                prefix_field=b"",
                size=len(pax),
                mtime=mtime,
                mode=_PAX_HEADER_MODE,
                typeflag=b"x",
            )
        )
        blocks.append(pax + bytes(_padded(len(pax)) - len(pax)))
        prefix_field, name_field = _fallback_ustar_name(name)
    else:
        split = _split_ustar(name.encode("ascii"))
        assert split is not None  # _pax_data returned no path record, so ustar holds the name
        prefix_field, name_field = split
    blocks.append(
        _ustar_block(
            name_field,
            prefix_field=prefix_field,
            # With a pax size= record the ustar field cannot hold the size; readers use the pax one.
            size=size if size <= _MAX_USTAR_SIZE else 0,
            mtime=mtime,
            mode=mode & 0o7777,
            typeflag=b"0",
        )
    )
    return MemberLayout(name=name, header_bytes=b"".join(blocks), data_size=size)


def member_header_size(name: str, size: int) -> int:
    """Bytes of header before a member's data; same as member_layout(...).header_size."""
    if len(name) <= _NAME_LEN and size <= _MAX_USTAR_SIZE and validate.is_plain_path(name):
        return BLOCK  # plain ustar holds it (the usual member: a plan asks for every one)
    _check_name(name)
    pax = _pax_data(name, size)
    return BLOCK + (BLOCK + _padded(len(pax)) if pax else 0)


def member_data_offset(header_offset: int, footprint: int, size: int) -> int:
    """Where the data of a member of this footprint and size starts, its header starting at
    header_offset: its data and padding end its footprint."""
    return header_offset + footprint - _padded(size)


def member_footprint(name: str, size: int) -> int:
    """Bytes a member occupies in a shard: header blocks plus padded data."""
    return member_header_size(name, size) + _padded(size)


def shard_size_estimate(members: Iterable[tuple[str, int]]) -> int:
    """Exact byte length of a shard holding these (name, size) members, in any order, plus
    the end-of-archive blocks. Include the index member to get the whole shard's size."""
    return sum(member_footprint(name, size) for name, size in members) + len(END_OF_ARCHIVE)


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One member of a shard: fetch bytes [data_offset, data_offset + size) of the shard."""

    path: str
    header_offset: int
    data_offset: int
    size: int
    mtime: int  # seconds, as given to the writer (the tar header holds clamp_mtime of it)
    mode: int
    crc32: int  # CRC32 (zlib's) of the member's data (of the original file, when coded)
    coding: str = ""  # a coded member: its coding; `size` is then its stored size
    original_size: int = -1

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "path": self.path,
            "header_offset": self.header_offset,
            "data_offset": self.data_offset,
            "size": self.size,
            "mtime": self.mtime,
            "mode": self.mode,
            # Fixed width (8 hex digits) so an index's size is known before the CRCs are:
            # a shard's layout, the index member included, is planned from names and sizes.
            "crc32": f"{self.crc32:08x}",
        }
        if self.coding:
            data |= {"coding": self.coding, "original_size": self.original_size}
        return data

    @classmethod
    def from_json(cls, data: Any) -> IndexEntry:
        """Raises BadValue on anything but the exact shape to_json produces, with values in
        range (see validate.py)."""
        plain = set(cls.__dataclass_fields__) - {"coding", "original_size"}
        if not isinstance(data, dict) or set(data) not in (plain, set(cls.__dataclass_fields__)):
            raise BadValue(f"shard index entry has the wrong fields: {data!r:.200}")
        path = validate.relative_path(data["path"], "shard index entry path")
        what = f"shard index entry {path!r}:"
        crc = data["crc32"]
        if not isinstance(crc, str) or len(crc) != 8:
            raise BadValue(f"{what} crc32 is not 8 hex digits")
        try:
            crc_value = int(crc, 16)
        except ValueError as exc:
            raise BadValue(f"{what} crc32 is not hex") from exc
        if not 0 <= crc_value < 2**32:
            raise BadValue(f"{what} crc32 {crc!r} out of range")
        return cls(
            path=path,
            header_offset=validate.size(data["header_offset"], f"{what} header_offset"),
            data_offset=validate.size(data["data_offset"], f"{what} data_offset"),
            size=validate.size(data["size"], f"{what} size"),
            mtime=validate.mtime_seconds(data["mtime"], f"{what} mtime"),
            mode=validate.mode(data["mode"], f"{what} mode"),
            crc32=crc_value,
            coding=_entry_coding(data.get("coding", ""), what),
            original_size=(
                validate.size(data["original_size"], f"{what} original_size")
                if "coding" in data
                else -1
            ),
        )


def _entry_coding(value: Any, what: str) -> str:
    from .coding import Coding  # the index of an uncoded shard never needs it

    if value == "":
        return ""
    if Coding.from_json(value).identity:
        raise BadValue(f"{what} a coded entry names no coding")
    return str(value)


def _index_head(shard_key: str, *, coded: bool = False) -> str:
    # The envelope with its members left out: "members" is its last field, so the index is
    # this text up to "[", the members joined by ",", and "]}". (Either version is one digit:
    # the index's size does not depend on it.)
    envelope: dict[str, Any] = {
        "format": INDEX_FORMAT,
        "version": CODED_INDEX_VERSION if coded else INDEX_VERSION,
        "shard_key": shard_key,
        "members": [],
    }
    return json.dumps(envelope, separators=(",", ":")).removesuffix("]}")


def _entry_text(entry: IndexEntry) -> str:
    """json.dumps(entry.to_json(), separators=(",", ":")), written out directly for a path
    JSON leaves as it is (most): a tenth of the time, for every member of every shard."""
    path = entry.path
    if entry.coding or not (path.isascii() and path.isprintable()) or '"' in path or "\\" in path:
        return json.dumps(entry.to_json(), separators=(",", ":"))
    return (
        f'{{"path":"{path}","header_offset":{entry.header_offset:d},'
        f'"data_offset":{entry.data_offset:d},"size":{entry.size:d},"mtime":{entry.mtime:d},'
        f'"mode":{entry.mode:d},"crc32":"{entry.crc32:08x}"}}'
    )


def index_to_bytes(entries: Iterable[IndexEntry], *, shard_key: str) -> bytes:
    """The shard index as JSON (ASCII: lone surrogates in names survive as \\udcxx escapes),
    exactly as json.dumps writes the whole envelope, encoded member by member: a shard of
    100,000 members holds its members' text, not a dict per member (about 90 MB more)."""
    coded = False

    def texts() -> Iterator[str]:
        nonlocal coded
        for entry in entries:
            coded = coded or bool(entry.coding)
            yield _entry_text(entry)

    members = ",".join(texts())
    return f"{_index_head(shard_key, coded=coded)}{members}]}}".encode("ascii")


def index_size(entries: Iterable[IndexEntry], *, shard_key: str) -> int:
    """len(index_to_bytes(entries, shard_key=...)), holding one member at a time."""
    count = total = 0
    for entry in entries:
        count += 1
        total += len(_entry_text(entry))
    return len(_index_head(shard_key)) + total + max(count - 1, 0) + len("]}")


def _check_entries(entries: Sequence[IndexEntry], *, shard_size: int | None) -> None:
    """Members in order, on tar blocks, not overlapping, and inside the shard when its size
    is known. Raises BadValue."""
    seen: set[str] = set()
    next_free = 0  # first byte not taken by the previous member
    for entry in entries:
        where = f"shard index entry {entry.path!r}"
        if entry.path in seen:
            raise BadValue(f"{where}: listed twice")
        seen.add(entry.path)
        if entry.header_offset % BLOCK or entry.data_offset % BLOCK:
            raise BadValue(
                f"{where}: offsets {entry.header_offset}/{entry.data_offset} not 512-aligned"
            )
        if entry.header_offset < next_free:
            raise BadValue(
                f"{where}: header at {entry.header_offset} overlaps the previous member "
                f"(ends at {next_free})"
            )
        if entry.data_offset < entry.header_offset + BLOCK:
            raise BadValue(
                f"{where}: data at {entry.data_offset} leaves no header after {entry.header_offset}"
            )
        next_free = entry.data_offset + _padded(entry.size)
        if shard_size is not None and entry.data_offset + entry.size > shard_size:
            raise BadValue(
                f"{where}: bytes {entry.data_offset}-{entry.data_offset + entry.size} are past "
                f"the end of the shard ({shard_size} bytes)"
            )


def index_from_bytes(
    data: bytes, *, shard_key: str | None = None, shard_size: int | None = None
) -> list[IndexEntry]:
    """Parse and validate a shard index; CorruptMetadataError (an IntegrityError) on anything
    malformed, when shard_key is given and the index names another shard, or when shard_size
    is given and a member lies past it."""
    where = repr(shard_key) if shard_key is not None else "(of an unnamed shard)"
    try:
        envelope = validate.json_object(data)
        validate.envelope(
            envelope, format=INDEX_FORMAT, version=(INDEX_VERSION, CODED_INDEX_VERSION)
        )
        key = validate.object_key(envelope.get("shard_key"), "shard_key")
        if shard_key is not None and key != shard_key:
            raise BadValue(f"shard index belongs to {key!r}, not {shard_key!r}")
        members = validate.array(envelope.get("members"), f"members of the index of {key!r}")
        entries = [IndexEntry.from_json(member) for member in members]
        _check_entries(entries, shard_size=shard_size)
    except BadValue as exc:
        raise validate.corrupt("shard index", where, exc) from exc
    return entries


# ---------------------------------------------------------------------------------------------
# Random access to a planned shard: any byte range can be produced on its own, so the parts of
# one shard are built and uploaded in parallel, each from just the member ranges it covers.


@dataclass(frozen=True, slots=True)
class ShardMember:
    path: str
    size: int  # of its tar entry: the stored size of a coded member
    mtime: int  # seconds
    mode: int
    coding: str = ""  # coded members only (docs/format.md, "Coded files")
    original_size: int = -1


@dataclass(frozen=True, slots=True)
class FixedPiece:
    """Bytes of the shard that are not file data: headers, padding, the index, the end."""

    data: bytes


@dataclass(frozen=True, slots=True)
class FilePiece:
    """A range of one member's file: member index, offset in the file, length."""

    member: int
    offset: int
    length: int


Piece = FixedPiece | FilePiece


class ShardLayout:
    """The exact byte layout of a shard planned from its members' names and sizes.

    Members come first in the given order, then the index member (INDEX_MEMBER_NAME), then
    the end-of-archive blocks. Only offsets are kept (headers are rebuilt on demand), so a
    layout costs a few integers per member.
    """

    def __init__(self, members: Sequence[ShardMember], *, shard_key: str) -> None:
        # Kept as given, not copied: a view that makes each ShardMember when asked costs a
        # shard of 100,000 members nothing per member (ShardUnit.layout); the offsets are 8
        # bytes each in an array.
        self.members = members
        self.shard_key = shard_key
        self.header_offsets = array("q")
        offset = 0
        for member in self.members:
            self.header_offsets.append(offset)
            offset += member_footprint(member.path, member.size)
        self.index_header_offset = offset
        self.index_size = index_size(
            self._entries(itertools.repeat(0, len(self.members))), shard_key=shard_key
        )
        self.index_data_offset = offset + member_header_size(INDEX_MEMBER_NAME, self.index_size)
        self.size = self.index_data_offset + _padded(self.index_size) + len(END_OF_ARCHIVE)

    def data_offset(self, member: int) -> int:
        # A member's data ends its footprint (header, data, padding), where the next begins.
        following = member + 1
        end = (
            self.header_offsets[following]
            if following < len(self.header_offsets)
            else self.index_header_offset
        )
        return end - _padded(self.members[member].size)

    def entries(self, crcs: Sequence[int]) -> list[IndexEntry]:
        return list(self._entries(crcs))

    def _entries(self, crcs: Iterable[int]) -> Iterator[IndexEntry]:
        for n, (m, crc) in enumerate(zip(self.members, crcs, strict=True)):
            yield IndexEntry(
                path=m.path,
                header_offset=self.header_offsets[n],
                data_offset=self.data_offset(n),
                size=m.size,
                mtime=m.mtime,
                mode=m.mode & 0o7777,
                crc32=crc,
                coding=m.coding,
                original_size=m.original_size,
            )

    def index_bytes(self, crcs: Sequence[int]) -> bytes:
        return index_to_bytes(self._entries(crcs), shard_key=self.shard_key)

    def needs_index(self, start: int, end: int) -> bool:
        """Whether bytes [start, end) include the index member's data."""
        return start < self.index_data_offset + self.index_size and end > self.index_data_offset

    def members_in(self, start: int, end: int) -> range:
        """Indexes of the members whose data overlaps [start, end)."""
        first = max(bisect.bisect_right(self.header_offsets, start) - 1, 0)
        last = bisect.bisect_left(self.header_offsets, end)
        return range(first, min(last, len(self.members)))

    def pieces(self, start: int, end: int, *, index: bytes | None = None) -> list[Piece]:
        """What bytes [start, end) of the shard are made of, in order. `index` (the finished
        index, exactly index_size bytes) is needed only when the range covers it."""
        return list(self.iter_pieces(start, end, index=index))

    def iter_pieces(self, start: int, end: int, *, index: bytes | None = None) -> Iterator[Piece]:
        """pieces(), one at a time: a part is written as its pieces come, never holding the
        header bytes of all its members at once."""
        if not 0 <= start <= end <= self.size:
            raise ValueError(f"range [{start}, {end}) outside a shard of {self.size} bytes")
        if (
            end > self.index_header_offset
            and self.needs_index(start, end)
            and (index is None or len(index) != self.index_size)
        ):
            raise ValueError("the range covers the index: pass its final bytes")

        def fixed(at: int, data: bytes) -> Iterator[Piece]:
            lo, hi = max(start, at), min(end, at + len(data))
            if lo < hi:
                yield FixedPiece(data[lo - at : hi - at])

        for n in self.members_in(start, end):
            m = self.members[n]
            header = member_layout(m.path, m.size, mtime=m.mtime, mode=m.mode)
            at = self.header_offsets[n]
            yield from fixed(at, header.header_bytes)
            data_at = at + header.header_size
            lo, hi = max(start, data_at), min(end, data_at + m.size)
            if lo < hi:
                yield FilePiece(n, lo - data_at, hi - lo)
            yield from fixed(data_at + m.size, header.padding)
        if end > self.index_header_offset:
            tail = member_layout(
                INDEX_MEMBER_NAME, self.index_size, mtime=0, mode=EXTRA_MEMBER_MODE
            )
            yield from fixed(self.index_header_offset, tail.header_bytes)
            yield from fixed(self.index_data_offset, index or bytes(self.index_size))
            yield from fixed(
                self.index_data_offset + self.index_size, tail.padding + END_OF_ARCHIVE
            )
