"""Tar shards: exact offsets, readable by Python's tarfile and GNU tar, and a strict index."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import stat
import subprocess
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from s3xfer.dataset.tarpack import (
    BLOCK,
    INDEX_MEMBER_NAME,
    IndexEntry,
    clamp_mtime,
    index_from_bytes,
    index_to_bytes,
    member_footprint,
    member_header_size,
    member_layout,
    shard_size_estimate,
)
from s3xfer.errors import IntegrityError, SourceError, UsageError
from tests.shardwriter import ShardWriter

GNU_TAR = "/usr/bin/tar"
MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Source:
    """A file to pack; its bytes are a repeated pattern so big sizes stay cheap to generate."""

    name: str
    size: int
    pattern: bytes
    mtime: int
    mode: int

    def data(self) -> bytes:
        return (self.pattern * (self.size // len(self.pattern) + 1))[: self.size]


def pack(
    sources: list[Source], *, chunk: int = 65536, with_index: bool = True
) -> tuple[bytes, ShardWriter]:
    """The shard as a caller builds it: streamed chunk by chunk, the index appended last."""
    writer = ShardWriter()
    out = io.BytesIO()
    for src in sources:
        out.write(writer.add_member_header(src.name, src.size, mtime=src.mtime, mode=src.mode))
        data = src.data()
        for start in range(0, len(data), chunk):
            out.write(writer.member_data(data[start : start + chunk]))
        out.write(writer.end_member())
        assert writer.offset == out.tell()
    extra = [(INDEX_MEMBER_NAME, index_to_bytes(writer.entries, shard_key="s/0"))]
    out.write(writer.finish(extra if with_index else []))
    assert writer.offset == out.tell()
    return out.getvalue(), writer


def expected_size(sources: list[Source], writer: ShardWriter) -> int:
    extras = [(e.path, e.size) for e in writer.extra_entries]
    return shard_size_estimate([(s.name, s.size) for s in sources] + extras)


# --- strategies --------------------------------------------------------------------------

# Lone surrogates (category Cs) are tested separately.
_component_chars = st.characters(exclude_characters="/\x00", exclude_categories=["Cs"])


def _within_name_max(component: str) -> str:
    # Extraction needs each component to fit the filesystem's NAME_MAX of 255 bytes.
    return component.encode()[:255].decode(errors="ignore")


components = st.one_of(
    st.text(_component_chars, min_size=1, max_size=12),
    st.text(st.sampled_from("abc xyz-_.é日😀"), min_size=1, max_size=40),
    # Past ustar's 100-byte name field.
    st.text(_component_chars, min_size=90, max_size=130).map(_within_name_max),
).filter(lambda component: component not in ("", ".", ".."))

names = st.lists(components, min_size=1, max_size=6).map("/".join)

small_sizes = st.one_of(
    st.integers(0, 2 * BLOCK + 1), st.sampled_from([BLOCK - 1, BLOCK, BLOCK + 1])
)
sizes = st.one_of(
    st.integers(0, 2 * BLOCK + 1),
    st.sampled_from([BLOCK - 1, BLOCK, BLOCK + 1, 65536, 65537]),
    st.integers(0, 3 * MiB),
)


@st.composite
def sources_lists(
    draw: st.DrawFn, max_size: int = 20, size: st.SearchStrategy[int] = sizes
) -> list[Source]:
    chosen = draw(st.lists(names, max_size=max_size, unique=True))
    # A name that is also a directory of another name could not be extracted.
    chosen = [n for n in chosen if not any(o.startswith(n + "/") for o in chosen)]
    chosen = [n for n in chosen if n != INDEX_MEMBER_NAME]
    return [
        Source(
            name=name,
            size=draw(size),
            pattern=draw(st.binary(min_size=1, max_size=37)),
            mtime=draw(st.integers(0, 8**11 - 1)),
            mode=draw(st.integers(0, 0o7777)),
        )
        for name in chosen
    ]


# --- layout and the writer ---------------------------------------------------------------


@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(sources=sources_lists(), chunk=st.sampled_from([1000, 4096, 65536]))
def test_offsets_sizes_and_bytes_are_exact(sources: list[Source], chunk: int) -> None:
    shard, writer = pack(sources, chunk=chunk)
    entries = writer.entries
    assert [e.path for e in entries] == [s.name for s in sources]
    assert len(shard) == expected_size(sources, writer)
    assert len(shard) % BLOCK == 0
    assert shard.endswith(bytes(2 * BLOCK))
    offsets = [e.header_offset for e in entries + writer.extra_entries]
    assert offsets == sorted(set(offsets))
    for entry, src in zip(entries, sources, strict=True):
        assert entry.header_offset % BLOCK == 0
        assert entry.data_offset == entry.header_offset + member_header_size(src.name, src.size)
        member = shard[entry.data_offset : entry.data_offset + entry.size]
        assert member == src.data()
        assert entry.crc32 == zlib.crc32(member)
        assert (entry.size, entry.mtime, entry.mode) == (src.size, src.mtime, src.mode)
    # The index inside the shard is the one the writer recorded.
    [index] = writer.extra_entries
    stored = shard[index.data_offset : index.data_offset + index.size]
    assert index_from_bytes(stored, shard_key="s/0") == entries


@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(sources=sources_lists())
def test_python_tarfile_reads_what_the_index_says(sources: list[Source]) -> None:
    shard, writer = pack(sources)
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(fileobj=io.BytesIO(shard)) as tar:
        infos = tar.getmembers()
        assert [i.name for i in infos] == [s.name for s in sources] + [INDEX_MEMBER_NAME]
        for info, entry in zip(infos, writer.entries + writer.extra_entries, strict=True):
            assert info.isreg()
            assert (info.size, info.mtime, info.mode) == (entry.size, entry.mtime, entry.mode)
            assert (info.uid, info.gid, info.uname, info.gname) == (0, 0, "", "")
            assert info.offset == entry.header_offset
            assert info.offset_data == entry.data_offset
        tar.extractall(tmp, filter="data")
        for src in sources:
            assert (Path(tmp) / src.name).read_bytes() == src.data()


def test_member_layout_matches_what_the_writer_emits() -> None:
    layout = member_layout("dir/file.txt", 1000, mtime=1_700_000_000, mode=0o100755)
    assert (layout.header_size, layout.data_size, layout.padded_size) == (512, 1000, 1024)
    assert layout.total_size == member_footprint("dir/file.txt", 1000) == 1536
    writer = ShardWriter()
    assert writer.add_member_header("dir/file.txt", 1000, mtime=1_700_000_000, mode=0o755) == (
        layout.header_bytes
    )
    info = tarfile.TarInfo.frombuf(layout.header_bytes, "utf-8", "surrogateescape")
    assert (info.name, info.size, info.mode, info.type) == ("dir/file.txt", 1000, 0o755, b"0")


def test_checksum_field_is_six_octal_digits_nul_space() -> None:
    header = member_layout("a", 1, mtime=0, mode=0o644).header_bytes
    field = header[148:156]
    assert re.fullmatch(rb"[0-7]{6}\x00 ", field)
    assert int(field[:6], 8) == sum(header[:148]) + 8 * ord(" ") + sum(header[156:])


@pytest.mark.parametrize(
    ("name", "pax"),
    [
        ("a" * 100, False),  # exactly fills the name field, no NUL
        ("d" * 155 + "/" + "f" * 100, False),  # exactly fills prefix and name
        ("d" * 156 + "/" + "f" * 10, True),  # prefix one byte too long
        ("d" * 10 + "/" + "f" * 101, True),  # last component alone too long
        ("x" * 101, True),
        ("é", True),
        ("plain/ascii name.txt", False),
    ],
)
def test_pax_header_only_when_ustar_cannot_hold_the_name(name: str, pax: bool) -> None:
    layout = member_layout(name, 5, mtime=0, mode=0o644)
    assert (layout.header_bytes[156:157] == b"x") is pax
    assert layout.header_size == member_header_size(name, 5) == (512 * 3 if pax else 512)
    with tarfile.open(fileobj=io.BytesIO(layout.header_bytes + b"hello" + bytes(507))) as tar:
        [info] = tar.getmembers()
    assert (info.name, info.offset, info.offset_data) == (name, 0, layout.header_size)


def test_sizes_beyond_ustar_use_a_pax_size_record() -> None:
    size = 8 * 1024**3  # one more than the 11 octal digits hold
    layout = member_layout("huge.bin", size, mtime=0, mode=0o644)
    assert b" size=8589934592\n" in layout.header_bytes
    assert layout.header_size == member_header_size("huge.bin", size) == 3 * BLOCK
    assert layout.padded_size == size
    # Stream mode reads the header without needing the 8 GiB behind it.
    with tarfile.open(fileobj=io.BytesIO(layout.header_bytes), mode="r|") as tar:
        info = tar.next()
        assert info is not None
        assert (info.name, info.size, info.offset_data) == ("huge.bin", size, 3 * BLOCK)
    assert member_layout("max.bin", 8**11 - 1, mtime=0, mode=0).header_size == BLOCK


def test_pax_record_lengths_count_their_own_digits() -> None:
    # Lengths around 99/100 and 999/1000 are where a digit is gained.
    for length in range(101, 1100):
        name = "n" * length
        header = member_layout(name, 0, mtime=0, mode=0o644).header_bytes
        size = int(header[124:135], 8)
        record = header[BLOCK : BLOCK + size]
        digits, _, rest = record.partition(b" ")
        assert int(digits) == len(record)
        assert rest == b"path=" + name.encode() + b"\n"


def test_undecodable_names_keep_their_raw_bytes(tmp_path: Path) -> None:
    raw = b"caf\xe9/\xff.txt"  # Latin-1 bytes on a UTF-8 system
    name = os.fsdecode(raw)
    shard, writer = pack([Source(name, 3, b"abc", 1, 0o600)])
    assert b" path=" + raw + b"\n" in shard
    with tarfile.open(fileobj=io.BytesIO(shard)) as tar:
        assert tar.getnames()[0] == name
    assert index_from_bytes(index_to_bytes(writer.entries, shard_key="k"))[0].path == name
    (tmp_path / "shard.tar").write_bytes(shard)
    _gnu_tar("-xf", "shard.tar", cwd=tmp_path)
    assert (tmp_path / name).read_bytes() == b"abc"  # Path encodes the name back to raw


def test_mtimes_outside_ustar_are_clamped_in_the_header_only() -> None:
    assert clamp_mtime(-5) == 0
    assert clamp_mtime(8**11) == 8**11 - 1
    src = Source("old", 1, b"x", -86400, 0o644)
    shard, writer = pack([src])
    assert writer.entries[0].mtime == -86400
    with tarfile.open(fileobj=io.BytesIO(shard)) as tar:
        assert tar.getmembers()[0].mtime == 0


def test_empty_shard_is_just_the_end_of_archive() -> None:
    shard, writer = pack([], with_index=False)
    assert shard == bytes(1024) == bytes(shard_size_estimate([]))
    assert writer.entries == [] and writer.finished


@pytest.mark.parametrize(
    "name", ["", "/abs", "a//b", "a/", "./a", "a/../b", "..", "nul\x00", "\ud800"]
)
def test_non_canonical_names_are_refused(name: str) -> None:
    with pytest.raises(UsageError):
        member_layout(name, 0, mtime=0, mode=0o644)
    with pytest.raises(UsageError):
        ShardWriter().add_member_header(name, 0, mtime=0, mode=0o644)


def test_a_file_that_grew_or_shrank_is_refused() -> None:
    writer = ShardWriter()
    writer.add_member_header("f", 10, mtime=0, mode=0o644)
    writer.member_data(b"12345")
    with pytest.raises(SourceError, match="grew"):
        writer.member_data(b"123456")
    assert writer.offset == 512 + 5  # the refused chunk was not handed out
    with pytest.raises(SourceError, match="shrank"):
        writer.end_member()


def test_calls_out_of_order_are_refused() -> None:
    writer = ShardWriter()
    with pytest.raises(UsageError):
        writer.member_data(b"x")
    with pytest.raises(UsageError):
        writer.end_member()
    writer.add_member_header("f", 1, mtime=0, mode=0o644)
    with pytest.raises(UsageError):
        writer.add_member_header("g", 1, mtime=0, mode=0o644)
    with pytest.raises(UsageError):
        writer.finish()
    writer.member_data(b"x")
    writer.end_member()
    with pytest.raises(UsageError, match="already"):
        writer.add_member_header("f", 1, mtime=0, mode=0o644)
    writer.finish()
    with pytest.raises(UsageError, match="finished"):
        writer.add_member_header("g", 1, mtime=0, mode=0o644)


# --- GNU tar -------------------------------------------------------------------------------

TRICKY = [
    Source("a.txt", 0, b"-", 0, 0o644),
    Source("dir/sub dir/file with spaces.txt", 1, b"x", 1_700_000_000, 0o755),
    Source("n" * 100, 511, b"ab", 1_600_000_000, 0o600),
    Source("d" * 150 + "/" + "f" * 99, 512, b"abc", 1_500_000_000, 0o640),
    Source("x" * 120, 513, b"xyz", 1_400_000_000, 0o444),
    Source("long/" + "b" * 120, 100_000, b"0123456789", 1_300_000_000, 0o700),
    Source("p" * 160 + "/f", 7, b"P", 1_200_000_000, 0o644),
    Source("données/été/naïve ☃.txt", 33, b"\xe9", 1_100_000_000, 0o644),
    Source("日本語/ファイル.bin", 4097, b"\x00\xff", 1_000_000_000, 0o2755),
    Source("emoji 😀/-rf *?[x]'\"\\#.txt", 1025, b"q", 900_000_000, 0o1777),
    Source("far/future", 3, b"f", 8**11 - 1, 0o644),
    Source("é" * 60 + "/" + "ü" * 60, 2, b"u", 123, 0o644),
]

_LISTING = re.compile(
    r"(?P<mode>\S{10}) (?P<uid>\d+)/(?P<gid>\d+) +(?P<size>\d+) "
    r"(?P<date>\d{4,}-\d\d-\d\d \d\d:\d\d:\d\d) (?P<name>.*)"
)


def _gnu_tar(*args: str, cwd: Path) -> str:
    env = {"LC_ALL": "C.UTF-8", "TZ": "UTC", "PATH": os.environ.get("PATH", "")}
    done = subprocess.run(
        [GNU_TAR, *args], cwd=cwd, env=env, capture_output=True, check=False, timeout=60
    )
    assert (done.returncode, done.stderr) == (0, b"")
    return done.stdout.decode("utf-8")


def _check_with_gnu_tar(sources: list[Source], where: Path) -> None:
    shard, writer = pack(sources)
    where.mkdir()
    (where / "shard.tar").write_bytes(shard)
    listing = _gnu_tar(
        "-tvf", "shard.tar", "--full-time", "--numeric-owner", "--quoting-style=literal", cwd=where
    )
    # Not splitlines(): names may hold \v, \x1c, \u2028 and the like, which GNU tar prints raw.
    lines = listing.split("\n")
    assert lines.pop() == ""
    rows = [_LISTING.fullmatch(line) for line in lines]
    assert all(rows), listing
    got = [(r["name"], int(r["size"]), r["mode"], r["date"], r["uid"], r["gid"]) for r in rows if r]
    expected = [
        (e.path, e.size, stat.filemode(stat.S_IFREG | e.mode), _utc(e.mtime), "0", "0")
        for e in writer.entries + writer.extra_entries
    ]
    assert got == expected

    out = where / "out"
    out.mkdir()
    # Extraction warns about timestamps in the future (2242); that is the point of the test.
    _gnu_tar("-xf", "../shard.tar", "--warning=no-timestamp", cwd=out)
    for src in sources:
        path = out / src.name
        assert path.read_bytes() == src.data()
        assert path.stat().st_mtime == clamp_mtime(src.mtime)
    assert (out / INDEX_MEMBER_NAME).read_bytes() == index_to_bytes(writer.entries, shard_key="s/0")


def _utc(mtime: int) -> str:
    return datetime.fromtimestamp(clamp_mtime(mtime), UTC).strftime("%Y-%m-%d %H:%M:%S")


def test_gnu_tar_lists_and_extracts_tricky_names(tmp_path: Path) -> None:
    _check_with_gnu_tar(TRICKY, tmp_path / "tricky")


@settings(deadline=None, max_examples=20, suppress_health_check=[HealthCheck.too_slow])
@given(sources=sources_lists(max_size=8))
def test_gnu_tar_agrees_on_generated_shards(sources: list[Source]) -> None:
    # Names are printed one per line, so names holding a line break cannot be compared.
    sources = [s for s in sources if "\n" not in s.name]
    with tempfile.TemporaryDirectory() as tmp:
        _check_with_gnu_tar(sources, Path(tmp) / "g")


# --- the index -----------------------------------------------------------------------------

entries_strategy = sources_lists(max_size=10, size=small_sizes).map(
    lambda sources: pack(sources)[1].entries
)


@given(entries=entries_strategy)
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_index_round_trips(entries: list[IndexEntry]) -> None:
    data = index_to_bytes(entries, shard_key="shards/000042.tar")
    assert index_from_bytes(data) == entries
    assert index_from_bytes(data, shard_key="shards/000042.tar") == entries
    assert [IndexEntry.from_json(e.to_json()) for e in entries] == entries


GOOD = [
    IndexEntry("a", 0, 512, 10, 1, 0o644, 7),
    IndexEntry("b", 1024, 2560, 600, 1, 0o644, 8),
    IndexEntry("c", 3584, 4096, 0, 1, 0o644, 9),
]


def _envelope(**changes: Any) -> dict[str, Any]:
    envelope: dict[str, Any] = json.loads(index_to_bytes(GOOD, shard_key="k"))
    envelope.update(changes)
    return envelope


def _with_entry(i: int, **changes: Any) -> list[dict[str, Any]]:
    members = [e.to_json() for e in GOOD]
    members[i].update(changes)
    return members


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{not json",
        b"\xff\xfe",
        b"[]",
        json.dumps(_envelope(format="other")).encode(),
        json.dumps(_envelope(version=3)).encode(),
        json.dumps(_envelope(version="1")).encode(),
        json.dumps(_envelope(shard_key=None)).encode(),
        json.dumps(_envelope(members={})).encode(),
        json.dumps(_envelope(members=[[1, 2]])).encode(),
        json.dumps(_envelope(members=_with_entry(1, size=-1))).encode(),
        json.dumps(_envelope(members=_with_entry(1, size=1.5))).encode(),
        json.dumps(_envelope(members=_with_entry(1, size=True))).encode(),
        json.dumps(_envelope(members=_with_entry(1, path=3))).encode(),
        json.dumps(_envelope(members=_with_entry(1, path="../escape"))).encode(),
        json.dumps(_envelope(members=_with_entry(1, path="a"))).encode(),  # duplicate
        json.dumps(_envelope(members=_with_entry(1, header_offset=1000))).encode(),
        json.dumps(_envelope(members=_with_entry(1, data_offset=2561))).encode(),
        json.dumps(_envelope(members=_with_entry(1, data_offset=1024))).encode(),  # no header
        json.dumps(_envelope(members=_with_entry(1, header_offset=0, data_offset=512))).encode(),
        json.dumps(_envelope(members=_with_entry(2, header_offset=2560))).encode(),  # overlap
        json.dumps(_envelope(members=_with_entry(0, crc32=2**32))).encode(),
        json.dumps(_envelope(members=_with_entry(0, mode=0o10000))).encode(),
        json.dumps(_envelope(members=[{**GOOD[0].to_json(), "extra": 1}])).encode(),
        json.dumps(_envelope(members=list(reversed(_with_entry(0))))).encode(),
    ],
)
def test_corrupt_indexes_raise_integrity_error(data: bytes) -> None:
    with pytest.raises(IntegrityError):
        index_from_bytes(data)


def test_the_reference_index_is_valid_and_bound_to_its_shard() -> None:
    data = index_to_bytes(GOOD, shard_key="k")
    assert index_from_bytes(data) == GOOD
    with pytest.raises(IntegrityError, match="belongs to"):
        index_from_bytes(data, shard_key="other")


@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_never_escape_as_another_error(data: bytes) -> None:
    with contextlib.suppress(IntegrityError):
        index_from_bytes(data)


@given(entries=entries_strategy, position=st.integers(0, 10**6), byte=st.integers(0, 255))
@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_flipped_index_bytes_are_detected_or_harmless(
    entries: list[IndexEntry], position: int, byte: int
) -> None:
    data = bytearray(index_to_bytes(entries, shard_key="k"))
    data[position % len(data)] = byte
    try:
        parsed = index_from_bytes(bytes(data))
    except IntegrityError:
        return
    # Whatever still parses is a valid layout (the crc32 of each member guards the rest).
    for entry in parsed:
        assert entry.header_offset % BLOCK == 0 and entry.size >= 0
