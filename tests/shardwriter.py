"""A shard written in one pass, member by member, holding none of its bytes: an independent
writer of the tar format that tests check the engine's random-access layout
(s3xfer/dataset/tarpack.py ShardLayout) and the readers against. Test tooling, not in the
wheel: uploads build each part of a shard on its own from its ShardLayout."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from s3xfer.checksums import crc32
from s3xfer.dataset.tarpack import (
    END_OF_ARCHIVE,
    EXTRA_MEMBER_MODE,
    IndexEntry,
    MemberLayout,
    member_layout,
)
from s3xfer.errors import SourceError, UsageError


@dataclass(slots=True)
class _OpenMember:
    layout: MemberLayout
    header_offset: int
    mtime: int
    mode: int
    received: int = 0
    crc32: int = 0


class ShardWriter:
    """Produces a shard's bytes in order, member by member, holding none of them.

    For each member: add_member_header, then member_data for each chunk, then end_member;
    finally finish. Every call returns the next bytes of the shard, to be sent as they come.
    """

    def __init__(self) -> None:
        self._offset = 0
        self._entries: list[IndexEntry] = []
        self._extra_entries: list[IndexEntry] = []
        self._names: set[str] = set()
        self._open: _OpenMember | None = None
        self._finished = False

    @property
    def offset(self) -> int:
        """Bytes handed out so far."""
        return self._offset

    @property
    def entries(self) -> list[IndexEntry]:
        """Index entries of the completed members, in shard order (a copy)."""
        return list(self._entries)

    @property
    def extra_entries(self) -> list[IndexEntry]:
        """Entries of the members finish appended (such as the index itself), not indexed."""
        return list(self._extra_entries)

    @property
    def finished(self) -> bool:
        return self._finished

    def _emit(self, data: bytes) -> bytes:
        self._offset += len(data)
        return data

    def _check_idle(self, action: str) -> None:
        if self._finished:
            raise UsageError(f"cannot {action}: the shard is finished")
        if self._open is not None:
            raise UsageError(f"cannot {action}: member {self._open.layout.name!r} is not ended")

    def add_member_header(self, name: str, size: int, *, mtime: int, mode: int) -> bytes:
        """Start a member: returns its header bytes. Its data must follow, exactly size bytes."""
        self._check_idle(f"add {name!r}")
        if name in self._names:
            raise UsageError(f"member {name!r} is already in this shard")
        layout = member_layout(name, size, mtime=mtime, mode=mode)
        self._names.add(name)
        self._open = _OpenMember(layout, header_offset=self._offset, mtime=mtime, mode=mode)
        return self._emit(layout.header_bytes)

    def member_data(self, chunk: bytes) -> bytes:
        """Pass the next chunk of the open member through, counting and checksumming it."""
        member = self._open
        if member is None:
            raise UsageError("member_data without an open member")
        if member.received + len(chunk) > member.layout.data_size:
            # The header already promised a size: a file that grew cannot be fitted in.
            raise SourceError(
                f"{member.layout.name!r} grew while being packed: more than the "
                f"{member.layout.data_size} bytes declared"
            )
        member.received += len(chunk)
        member.crc32 = crc32(chunk, member.crc32)
        return self._emit(chunk)

    def end_member(self) -> bytes:
        """Close the open member: returns its padding and records its index entry."""
        member = self._open
        if member is None:
            raise UsageError("end_member without an open member")
        layout = member.layout
        if member.received != layout.data_size:
            raise SourceError(
                f"{layout.name!r} shrank while being packed: {member.received} of "
                f"{layout.data_size} declared bytes"
            )
        self._open = None
        self._entries.append(
            IndexEntry(
                path=layout.name,
                header_offset=member.header_offset,
                data_offset=member.header_offset + layout.header_size,
                size=layout.data_size,
                mtime=member.mtime,
                mode=member.mode & 0o7777,
                crc32=member.crc32,
            )
        )
        return self._emit(layout.padding)

    def finish(self, extra_members: Sequence[tuple[str, bytes]] = (), *, mtime: int = 0) -> bytes:
        """Append whole in-memory members (the index, named INDEX_MEMBER_NAME, goes last)
        and the end-of-archive blocks. They are recorded in extra_entries, not entries."""
        self._check_idle("finish")
        names = [name for name, _ in extra_members]
        if len(set(names)) != len(names):
            raise UsageError(f"extra members have duplicate names: {names!r}")
        layouts = [
            member_layout(name, len(data), mtime=mtime, mode=EXTRA_MEMBER_MODE)
            for name, data in extra_members
        ]
        pieces: list[bytes] = []
        for layout, (name, data) in zip(layouts, extra_members, strict=True):
            self._extra_entries.append(
                IndexEntry(
                    path=name,
                    header_offset=self._offset,
                    data_offset=self._offset + layout.header_size,
                    size=len(data),
                    mtime=mtime,
                    mode=EXTRA_MEMBER_MODE,
                    crc32=crc32(data),
                )
            )
            pieces += [
                self._emit(layout.header_bytes),
                self._emit(data),
                self._emit(layout.padding),
            ]
        pieces.append(self._emit(END_OF_ARCHIVE))
        self._finished = True
        return b"".join(pieces)
