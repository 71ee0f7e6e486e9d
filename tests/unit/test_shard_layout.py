"""Random access to a planned shard: any split into parts reassembles into exactly the bytes
the streaming ShardWriter produces, and Python's tarfile reads the result."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
import zlib

from hypothesis import given, settings
from hypothesis import strategies as st

from s3xfer.dataset.tarpack import (
    INDEX_MEMBER_NAME,
    FilePiece,
    FixedPiece,
    ShardLayout,
    ShardMember,
    index_from_bytes,
    index_size,
    index_to_bytes,
)
from tests.shardwriter import ShardWriter

names = st.lists(
    st.text(
        st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\"),
        min_size=1,
        max_size=40,
    ).filter(lambda n: n not in (".", "..")),
    min_size=1,
    max_size=4,
).map("/".join)


@st.composite
def shards(draw: st.DrawFn) -> list[tuple[ShardMember, bytes]]:
    paths = draw(st.lists(names, max_size=12, unique=True))
    out = []
    for n, path in enumerate(paths):
        size = draw(st.integers(min_value=0, max_value=70_000))
        data = (bytes([n % 251, 7, 42]) * (size // 3 + 1))[:size]
        mtime = draw(st.integers(min_value=0, max_value=2**33))
        out.append((ShardMember(path, size, mtime, draw(st.integers(0, 0o7777))), data))
    return out


def streamed(members: list[tuple[ShardMember, bytes]], key: str) -> bytes:
    writer = ShardWriter()
    chunks = []
    for member, data in members:
        chunks.append(
            writer.add_member_header(member.path, member.size, mtime=member.mtime, mode=member.mode)
        )
        chunks.append(writer.member_data(data))
        chunks.append(writer.end_member())
    index = index_to_bytes(writer.entries, shard_key=key)
    chunks.append(writer.finish([(INDEX_MEMBER_NAME, index)]))
    return b"".join(chunks)


@settings(max_examples=60, deadline=None)
@given(members=shards(), cuts=st.lists(st.floats(min_value=0, max_value=1), max_size=6))
def test_any_split_reassembles_the_streamed_shard(
    members: list[tuple[ShardMember, bytes]], cuts: list[float]
) -> None:
    key = "p/.s3xfer/shards/ab/x.tar"
    layout = ShardLayout([m for m, _ in members], shard_key=key)
    expected = streamed(members, key)
    assert layout.size == len(expected)
    index = layout.index_bytes([zlib.crc32(data) for _, data in members])
    bounds = sorted({0, layout.size, *(int(c * layout.size) for c in cuts)})
    out = bytearray()
    for start, end in itertools.pairwise(bounds):
        for piece in layout.pieces(
            start, end, index=index if layout.needs_index(start, end) else None
        ):
            if isinstance(piece, FixedPiece):
                out += piece.data
            else:
                assert isinstance(piece, FilePiece)
                out += members[piece.member][1][piece.offset : piece.offset + piece.length]
    assert bytes(out) == expected
    # Every member's planned data range holds its bytes, and the index inside agrees.
    for n, (_member, data) in enumerate(members):
        start = layout.data_offset(n)
        assert expected[start : start + len(data)] == data
    inner = expected[layout.index_data_offset : layout.index_data_offset + layout.index_size]
    assert index_from_bytes(inner, shard_key=key) == layout.entries(
        [zlib.crc32(d) for _, d in members]
    )
    with tarfile.open(fileobj=io.BytesIO(expected)) as archive:
        assert archive.getnames() == [m.path for m, _ in members] + [INDEX_MEMBER_NAME]


@given(shards(), st.text(max_size=30))
@settings(max_examples=60, deadline=None)
def test_the_index_is_the_whole_envelope_json_encoded_member_by_member(
    members: list[tuple[ShardMember, bytes]], key: str
) -> None:
    """index_to_bytes writes each member on its own (no dict per member held for a shard of
    100,000), and must stay byte for byte what json.dumps of the whole envelope gives, as
    the shards already stored were written; index_size is its length, one member at a time."""
    layout = ShardLayout([m for m, _ in members], shard_key=key)
    crcs = [zlib.crc32(data) for _, data in members]
    entries = layout.entries(crcs)
    whole = {
        "format": "s3xfer-shard-index",
        "version": 1,
        "shard_key": key,
        "members": [entry.to_json() for entry in entries],
    }
    expected = json.dumps(whole, separators=(",", ":")).encode("ascii")
    assert index_to_bytes(entries, shard_key=key) == expected
    assert layout.index_bytes(crcs) == expected
    assert index_size(entries, shard_key=key) == len(expected) == layout.index_size


def test_the_index_of_names_json_escapes_is_the_same_json() -> None:
    """The index member text is written out directly for plain names: names JSON escapes
    (quote, backslash, non-ASCII, DEL, lone surrogates) still come out as json.dumps has them."""
    names = ['a"b', "a\\b", "é/ü", "a\x7fb", "x\udcff", "plain/name.jpg"]
    layout = ShardLayout([ShardMember(n, 3, 5, 0o644) for n in names], shard_key="k")
    crcs = list(range(len(names)))
    whole = {
        "format": "s3xfer-shard-index",
        "version": 1,
        "shard_key": "k",
        "members": [entry.to_json() for entry in layout.entries(crcs)],
    }
    assert layout.index_bytes(crcs) == json.dumps(whole, separators=(",", ":")).encode("ascii")
    assert layout.index_size == len(layout.index_bytes(crcs))
