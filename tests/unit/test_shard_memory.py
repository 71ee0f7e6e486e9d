"""What the engine holds per member of a shard while it is uploaded (issue 19: memory flat in
the number of files): identities in arrays, a member's CRC32 as 4 bytes unless a part
boundary splits it, a layout that makes no object per member, and parts written from their
pieces as they are made. Each gives what the per-member objects gave."""

from __future__ import annotations

import functools
import os
import zlib
from pathlib import Path

import pytest

from s3xfer.dataset.tarpack import FilePiece, ShardLayout, ShardMember
from s3xfer.errors import S3XferError
from s3xfer.localfs import FileIdentity, Identities, _fill_part, _identify_members
from s3xfer.planning.plan import ShardUnit, parts_of
from s3xfer.planning.survey import FileEntry
from s3xfer.write.inflight import MemberCrcs
from tests.unit.test_shard_layout import streamed


def test_identities_give_back_what_was_appended() -> None:
    extremes = [
        FileIdentity(2**64 - 1, 2**64 - 1, 2**63 - 1, -(2**63), 2**63 - 1, 0o7777),
        FileIdentity(0, 1, 0, -1_500_000_000_123, 1_700_000_000_000_000_001, 0o644),
    ]
    identities = Identities()
    for identity in extremes:
        identities.append(identity)
    assert len(identities) == 2
    assert list(identities) == extremes
    assert identities[-1] == extremes[1] and identities[0:1] == extremes[:1]
    with pytest.raises(IndexError):
        identities[2]


def test_members_that_cannot_be_read_are_named_by_index(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x")
    (tmp_path / "c").write_bytes(b"yz")
    members = [FileEntry(name, 1, 0, 0o644) for name in ("a", "b", "c")]
    found, unreadable = _identify_members(tmp_path, members, "after it was planned")
    assert len(found) == 3 and list(unreadable) == [1]
    assert found[2] == FileIdentity.of(os.stat(tmp_path / "c"))


def test_a_member_read_whole_is_kept_as_its_crc_only() -> None:
    members = [FileEntry("a", 5, 0, 0o644), FileEntry("b", 10, 0, 0o644), FileEntry("c", 0, 0, 0)]
    crcs = MemberCrcs(members)
    crcs.add(FilePiece(0, 0, 5), zlib.crc32(b"aaaaa"))
    crcs.add(FilePiece(1, 4, 6), zlib.crc32(b"456789"))  # a part boundary splits b
    assert crcs.pieces_held() == 1
    with pytest.raises(S3XferError, match="b: 6 of 10 bytes read"):
        crcs.final()
    crcs.add(FilePiece(1, 0, 4), zlib.crc32(b"0123"))
    assert list(crcs.final()) == [zlib.crc32(b"aaaaa"), zlib.crc32(b"0123456789"), 0]


def test_a_layout_of_a_unit_is_its_members_seen_as_shard_members() -> None:
    entries = [FileEntry(f"d/{n}", n * 100, n * 1_500_000_000, 0o600) for n in range(5)]
    unit = ShardUnit("p/x.tar", 5 * 2**20, entries)
    made = ShardLayout(
        [ShardMember(e.path, e.size, e.mtime_ns // 10**9, e.mode) for e in entries],
        shard_key=unit.key,
    )
    layout = unit.layout()
    assert list(layout.members) == list(made.members) and layout.members[1:3] == made.members[1:3]
    assert layout.index_bytes(range(5)) == made.index_bytes(range(5))
    assert list(layout.header_offsets) == list(made.header_offsets)


def test_parts_filled_from_pieces_made_one_at_a_time_are_the_shard(tmp_path: Path) -> None:
    """Every part written from a one-pass stream of its pieces (never a list of them): the
    parts together are the streamed shard, and the member CRCs are those of their bytes."""
    datas = [bytes([n]) * size for n, size in enumerate([0, 700, 5000, 1, 12_345, 512])]
    entries = []
    for n, data in enumerate(datas):
        (tmp_path / f"f{n}").write_bytes(data)
        st = os.stat(tmp_path / f"f{n}")
        entries.append(FileEntry(f"f{n}", st.st_size, st.st_mtime_ns, st.st_mode & 0o7777))
    unit = ShardUnit("p/x.tar", 4096, entries)
    layout = unit.layout()
    identities, unreadable = _identify_members(tmp_path, entries, "after it was planned")
    assert not unreadable
    crcs = MemberCrcs(entries)
    parts = list(parts_of(layout.size, 4096))
    assert len(parts) > 5
    index = layout.index_bytes([zlib.crc32(d) for d in datas])
    out = bytearray()
    for part in parts:
        start, end = part.offset, part.offset + part.length
        pieces = layout.iter_pieces(start, end, index=index)  # one pass only
        buffer, file_pieces, piece_crcs = _fill_part(
            tmp_path, entries, identities, part.length, functools.partial(iter, pieces)
        )
        for piece, crc in zip(file_pieces, piece_crcs, strict=True):
            crcs.add(piece, crc)
        out += buffer
    members = [
        (ShardMember(e.path, e.size, e.mtime_ns // 10**9, e.mode), d)
        for e, d in zip(entries, datas, strict=True)
    ]
    assert bytes(out) == streamed(members, unit.key)
    assert list(crcs.final()) == [zlib.crc32(d) for d in datas]
    assert crcs.pieces_held() < len(entries)
