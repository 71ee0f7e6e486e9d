"""What the engine holds for each object in flight, shared by the parts of one upload: a
multipart upload's state (parts done, reused, listed on resume), a shard's (its members as
found, their CRCs as its parts are read, its layout), and the jobs its workers take.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from ..checksums import combine_parts
from ..dataset.tarpack import FilePiece, ShardLayout
from ..errors import S3XferError, SourceError
from ..localfs import FileIdentity, Identities
from ..planning.plan import FileUnit, Part, ShardUnit
from ..planning.survey import FileEntry


@dataclass(eq=False)
class ShardBuild:
    """What the parts of one shard share: its members as they were found before it was laid
    out, member CRC pieces, the index once known, and the members seen changing."""

    unit: ShardUnit  # as laid out now (ShardUnit.relaid of the planned one)
    planned: ShardUnit
    identities: Identities  # of unit.members, taken before the layout
    layout: ShardLayout
    data_parts_left: int
    layouts: int = 1  # this is the shard's n-th layout in this run
    data_ready: anyio.Event = field(default_factory=anyio.Event)
    read_crcs: MemberCrcs = field(init=False)  # of every member, as its parts are read
    crcs: array[int] | None = None  # of every member, once all are read
    index: bytes | None = None
    failed: bool = False
    # Members (by index) that changed while the shard was read. When the shard failed only
    # for them, it is laid out again without them.
    changed: dict[int, str] = field(default_factory=dict)
    relayable: bool = False

    def __post_init__(self) -> None:
        self.read_crcs = MemberCrcs(self.unit.members)


class MemberCrcs:
    """The CRC32 of each member of a shard, from the CRCs of the pieces its parts read: 4
    bytes a member read whole by one part (almost every small file), the pieces kept only for
    the few a part boundary splits. A dict of piece lists per member cost about 300 bytes a
    member (30 MB a shard of 100,000) while the shard was uploaded."""

    def __init__(self, members: Sequence[FileEntry]) -> None:
        self._members = members
        self._whole = array("I", bytes(4 * len(members)))
        self._read_whole = bytearray(len(members))
        self._split: dict[int, list[tuple[int, int, int]]] = {}

    def add(self, piece: FilePiece, crc: int) -> None:
        """The CRC32 of `piece` (a member's bytes [offset, offset + length)), as read."""
        if piece.offset == 0 and piece.length == self._members[piece.member].size:
            self._whole[piece.member] = crc
            self._read_whole[piece.member] = 1
        else:
            self._split.setdefault(piece.member, []).append((piece.offset, crc, piece.length))

    def pieces_held(self) -> int:
        return len(self._split)

    def final(self) -> array[int]:
        """Every member's CRC32, once all its bytes were read (S3XferError if not)."""
        crcs = array("I", self._whole)
        for n, member in enumerate(self._members):
            if self._read_whole[n]:
                continue
            pieces = sorted(self._split.get(n, []))
            covered = sum(length for _offset, _crc, length in pieces)
            if covered != member.size:
                raise S3XferError(f"{member.path}: {covered} of {member.size} bytes read")
            crcs[n] = combine_parts((crc, length) for _offset, crc, length in pieces)
        return crcs


@dataclass(eq=False)  # identity semantics: kept in a set of open uploads
class Multipart:
    """Shared state of one object's multipart upload while its parts are in flight."""

    key: str
    remaining: int
    file: FileUnit | None = None
    shard: ShardBuild | None = None
    upload_id: str | None = None
    error: str | None = None
    done: dict[int, tuple[str, int, int]] = field(default_factory=dict)  # number → etag, crc, len
    # A coded file's parts: the CRC32 and length of the original bytes each part holds (the
    # record's crc32 is the original file's; `done` has the stored bytes' for S3).
    original: dict[int, tuple[int, int]] = field(default_factory=dict)
    reused: set[int] = field(default_factory=set)  # parts that were already there (not sent)
    listed: dict[int, dict[str, Any]] = field(default_factory=dict)  # parts S3 has, on resume
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    identity: FileIdentity | None = None  # of the file, taken before its first part is read
    # A shard's own handle on the job stream, kept open until the shard is settled: a shard
    # laid out again sends its new parts through it.
    jobs: MemoryObjectSendStream[PutJob | PartJob] | None = None

    @property
    def paths(self) -> list[str]:
        if self.shard is not None:
            return [m.path for m in self.shard.unit.members]
        assert self.file is not None
        return [self.file.path]


@dataclass(frozen=True, slots=True)
class PutJob:
    unit: FileUnit
    # A small file read already, with others (its bytes held in the budget), or its error;
    # None: the worker reads it.
    read: tuple[bytes, int] | SourceError | None = None


@dataclass(frozen=True, slots=True)
class PartJob:
    upload: Multipart
    part: Part
