"""The one validator of values read back from metadata (s3xfer/dataset/validate.py) and the parsers
built on it: what they accept round-trips, what they refuse is named, and the quick paths
never accept what the full checks refuse."""

from __future__ import annotations

import functools
import gzip
import json
import os
import zlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from s3xfer.dataset import catalog, validate
from s3xfer.dataset.keys import S3Url
from s3xfer.dataset.manifest import Manifest, ManifestRecord, ShardRecord
from s3xfer.distributed.slices import SliceResult
from s3xfer.errors import BadValue, CorruptMetadataError, IntegrityError

# --- bounded inflation ----------------------------------------------------------------------


@given(
    unit=st.binary(min_size=1, max_size=200),
    repeat=st.integers(1, 5_000),
    tail=st.binary(max_size=100),
)
@settings(deadline=None, max_examples=60)
def test_what_writers_compress_always_inflates_within_the_readers_bound(
    unit: bytes, repeat: int, tail: bytes
) -> None:
    data = unit * repeat + tail  # repetitive on purpose: deflate's best case
    packed = validate.compress_bounded(data)
    assert len(data) <= validate.inflate_limit(len(packed))
    assert validate.gunzip(packed) == data


def test_a_gzip_bomb_is_refused_after_the_bound_not_inflated_whole() -> None:
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    bomb = b"".join(packer.compress(bytes(1 << 20)) for _ in range(256)) + packer.flush()
    assert len(bomb) * validate.MAX_INFLATE_RATIO < 256 << 20  # it would inflate to 256 MiB
    limit = validate.MAX_INFLATE_RATIO * len(bomb)
    with pytest.raises(BadValue, match=f"inflates to more than {limit:,} bytes"):
        validate.gunzip(bomb)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "truncated gzip stream"),
        (b"{}", "not a valid gzip stream"),
        (gzip.compress(b"{}")[:10] + b"\xff" * 20, "not a valid gzip stream"),
        (gzip.compress(b"x" * 1000)[:-12], "truncated"),
        (gzip.compress(b"{}") + b"more", "4 bytes after the end"),
        (gzip.compress(b"{}") + gzip.compress(b"{}"), "after the end"),  # one member only
    ],
)
def test_broken_gzip_is_named(raw: bytes, message: str) -> None:
    with pytest.raises(BadValue, match=message):
        validate.gunzip(raw)


# --- single values --------------------------------------------------------------------------


@pytest.mark.parametrize("value", [True, 1.0, "1", None, [1]])
def test_only_true_integers_are_integers(value: Any) -> None:
    with pytest.raises(BadValue, match="not an integer"):
        validate.size(value)


@given(st.integers())
def test_modes_are_permission_bits_only(value: int) -> None:
    if 0 <= value <= 0o7777:
        assert validate.mode(value) == value
    else:
        with pytest.raises(BadValue, match="not permission bits"):
            validate.mode(value)


@given(st.integers(0, 0o7777))
def test_restores_never_set_setuid_or_setgid(mode: int) -> None:
    restored = validate.restored_mode(mode)
    assert restored & 0o6000 == 0
    assert restored == mode & 0o1777  # everything else, the sticky bit too, kept


@given(st.integers())
def test_mtimes_are_what_os_utime_can_set(value: int) -> None:
    try:
        validate.mtime_ns(value)
    except BadValue:
        assert abs(value) >= 2**63 * 10**9 - 1
    else:
        seconds = value // 10**9
        assert -(2**63) <= seconds < 2**63  # a C time_t


@given(st.text(alphabet="ab./\\\x00:", max_size=12))
def test_accepted_paths_stay_inside_any_root(path: str) -> None:
    try:
        validate.relative_path(path)
    except BadValue:
        return
    root = "/root/dest"
    joined = os.path.normpath(os.path.join(root, path))
    assert joined.startswith(root + "/") and "\x00" not in path


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("", "is empty"),
        ("/etc/passwd", "is absolute"),
        ("a/../b", "not normalized"),
        ("a//b", "not normalized"),
        ("./a", "not normalized"),
        ("a/", "not normalized"),
        ("a\x00b", "NUL"),
        ("\ud800", "not encodable"),
        ("x" * 4097, "more than 4,096"),
        (7, "not a string"),
    ],
)
def test_bad_paths_are_named(path: Any, message: str) -> None:
    with pytest.raises(BadValue, match=message):
        validate.relative_path(path)


def test_undecodable_names_as_os_scandir_gives_them_are_paths() -> None:
    assert validate.relative_path("caf\udce9.txt") == "caf\udce9.txt"


@pytest.mark.parametrize("tag", ['"abc"\r\nX-Evil: 1', "é", "\x7f"])
def test_etags_that_would_not_be_a_clean_header_are_refused(tag: str) -> None:
    with pytest.raises(BadValue, match="printable ASCII"):
        validate.etag(tag)


@pytest.mark.parametrize("crc", ["AAAA", "!!!!!!==", "AAAAAAAA", "AAAAAAA="])
def test_crc32_is_the_base64_of_four_bytes(crc: str) -> None:
    with pytest.raises(BadValue):
        validate.crc32_base64(crc)
    assert validate.crc32_base64("DUoRhQ==") == "DUoRhQ=="
    assert validate.crc32_base64("") == ""  # not known


# --- records: the quick path agrees with the full checks ------------------------------------

values = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 512, 1024, 513, 0o644, 0o4755, 0o100644, 5 * 2**40, 2**63 * 10**9]),
    st.booleans(),
    st.floats(allow_nan=False),
    st.text(max_size=6),
    st.sampled_from(["a.txt", "../x", "/x", "a//b", "DUoRhQ==", '"etag"', "k/a.txt", "", "é"]),
    st.none(),
)


@given(row=st.lists(values, min_size=8, max_size=10))
@settings(max_examples=500)
def test_the_quick_path_never_accepts_what_the_full_checks_refuse(row: list[Any]) -> None:
    try:
        full = ManifestRecord._checked(row)
    except BadValue:
        with pytest.raises(BadValue):
            ManifestRecord.from_json(row)
    else:
        assert ManifestRecord.from_json(row) == full


def test_quick_path_helpers_agree_with_their_full_checks() -> None:
    for path in ["a", "a/b", "a/../b", "/a", "a/", ".", "..", "a/./b", "a\x00", "é", ""]:
        if validate.is_plain_path(path):
            validate.relative_path(path)
    for tag in ['"x"', "x\n", "é", ""]:
        if validate.is_plain_etag(tag):
            validate.etag(tag)


# No lone surrogates: the survey refuses names that are not UTF-8 before they reach a manifest.
paths = st.lists(st.text(alphabet="abc_-é", min_size=1, max_size=8), min_size=1, max_size=3).map(
    "/".join
)
records = st.builds(
    ManifestRecord,
    path=paths,
    key=st.just("p/.s3xfer/shards/0000/0000000000000000.tar"),
    size=st.integers(0, 10**6),
    mtime_ns=st.integers(-(10**18), 10**19),
    mode=st.integers(0, 0o7777),
    crc32=st.sampled_from(["", "DUoRhQ==", "AAAAAA=="]),
    part_size=st.just(0),
    offset=st.integers(1, 10**6).map(lambda n: n * 512),
    etag=st.just('"abc-1"'),
    content_type=st.sampled_from(["", "image/jpeg", "text/plain; charset=utf-8"]),
)


@given(st.lists(records, max_size=30, unique_by=lambda r: r.path))
@settings(deadline=None)
def test_manifests_round_trip(items: list[ManifestRecord]) -> None:
    manifest = Manifest("s3://b/p", {r.path: r for r in items})
    assert Manifest.from_bytes(manifest.to_bytes(), where="m").records == manifest.records


# --- whole objects --------------------------------------------------------------------------


def manifest_bytes(rows: list[Any], shards: list[Any] | None = None) -> bytes:
    data = {"format": "s3xfer-manifest", "version": 1, "dest": "s3://b/p", "files": rows}
    data["shards"] = shards or []
    return gzip.compress(json.dumps(data).encode())


GOOD_ROW = ["a.txt", "p/a.txt", 10, 0, 0o644, "DUoRhQ==", 0, -1, '"e"']
SHARD = "p/.s3xfer/shards/0000/0000000000000000.tar"


def test_errors_name_the_object_and_the_value() -> None:
    bad = [*GOOD_ROW[:2], -1, *GOOD_ROW[3:]]
    with pytest.raises(CorruptMetadataError) as raised:
        Manifest.from_bytes(manifest_bytes([bad]), where="s3://b/p/.s3xfer/manifest.json.gz")
    assert str(raised.value) == (
        "corrupt dataset metadata: manifest s3://b/p/.s3xfer/manifest.json.gz: "
        "file 'a.txt': size -1 is below 0"
    )
    assert isinstance(raised.value, IntegrityError) and raised.value.exit_code == 4


def test_a_packed_file_must_lie_inside_its_listed_shard() -> None:
    row = ["a.txt", SHARD, 600, 0, 0o644, "DUoRhQ==", 0, 512, '"s"']
    inside = manifest_bytes([row], [[SHARD, 2048, '"s"', 1]])
    assert Manifest.from_bytes(inside, where="m").records["a.txt"].offset == 512
    with pytest.raises(CorruptMetadataError, match="past the end of its shard"):
        Manifest.from_bytes(manifest_bytes([row], [[SHARD, 1024, '"s"', 1]]), where="m")


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([GOOD_ROW, GOOD_ROW], "'a.txt' is listed twice"),
        ([GOOD_ROW[:8]], "has 8 fields, expected 9, 10 or 12"),
        ("not rows", "files is not a list"),
    ],
)
def test_malformed_manifests_are_named(rows: Any, message: str) -> None:
    with pytest.raises(CorruptMetadataError, match=message):
        Manifest.from_bytes(manifest_bytes(rows), where="m")


def test_content_types_are_read_from_version_2_rows_and_unknown_in_version_1() -> None:
    old = Manifest.from_bytes(manifest_bytes([GOOD_ROW]), where="m")  # version 1, 9 fields
    assert old.records["a.txt"].content_type == ""
    typed = [*GOOD_ROW, "text/plain"]
    data = {"format": "s3xfer-manifest", "version": 2, "dest": "s3://b/p", "files": [typed]}
    new = Manifest.from_bytes(gzip.compress(json.dumps(data).encode()), where="m")
    assert new.records["a.txt"].content_type == "text/plain"
    assert new.records["a.txt"].to_json() == typed
    for hostile in ("text/plain\r\nx-evil: 1", "caf\u00e9/x", 7, "x" * 300):
        data["files"] = [[*GOOD_ROW, hostile]]
        with pytest.raises(CorruptMetadataError, match="content_type"):
            Manifest.from_bytes(gzip.compress(json.dumps(data).encode()), where="m")
    data["version"] = 4
    with pytest.raises(CorruptMetadataError, match="version 1 or 2 or 3"):
        Manifest.from_bytes(gzip.compress(json.dumps(data).encode()), where="m")


CODED_ROW = [*GOOD_ROW, "text/plain", "aes-256-gcm", 10 + 28]


def test_coded_rows_are_version_3_and_keep_their_coding_and_stored_size() -> None:
    coded = ManifestRecord.from_json(["b.txt", *CODED_ROW[1:]])
    assert (coded.coding, coded.stored_size, coded.stored, coded.size) == (
        "aes-256-gcm",
        38,
        38,
        10,
    )
    assert coded.to_json() == ["b.txt", *CODED_ROW[1:]]
    plain = ManifestRecord.from_json([*GOOD_ROW, ""])
    assert plain.stored == 10 and len(plain.to_json()) == 10  # uncoded rows stay as they were
    for records, version in (([plain], 2), ([plain, coded], 3)):
        manifest = Manifest("s3://b/p", {r.path: r for r in records})
        raw = manifest.to_bytes()
        assert json.loads(gzip.decompress(raw))["version"] == version
        assert Manifest.from_bytes(raw, where="m").records == manifest.records
        piece = catalog.piece_bytes(records, fanout=1, bucket=0)
        assert json.loads(gzip.decompress(piece))["version"] == version
        assert list(catalog.parse_piece(piece, fanout=1, bucket=0, where="p").values()) == records


@pytest.mark.parametrize(
    ("coding", "stored", "message"),
    [
        ("aes-256-gcm", 11, "stored size 11 is not 38"),
        ("rot13", 10, "unknown coding 'rot13'"),
        ("", 10, "names no coding"),
        ("zstd", -1, "stored size -1 is below 0"),
    ],
)
def test_coded_rows_are_checked(coding: str, stored: int, message: str) -> None:
    data = {"format": "s3xfer-manifest", "version": 3, "dest": "s3://b/p"}
    data["files"] = [[*GOOD_ROW, "", coding, stored]]
    with pytest.raises(CorruptMetadataError, match=message):
        Manifest.from_bytes(gzip.compress(json.dumps(data).encode()), where="m")


def test_a_coded_packed_file_lies_inside_its_shard_by_its_stored_size() -> None:
    row = ["a.txt", SHARD, 1000, 0, 0o644, "DUoRhQ==", 0, 512, '"s"', "", "aes-256-gcm", 1028]
    data = {"format": "s3xfer-manifest", "version": 3, "dest": "s3://b/p", "files": [row]}
    data["shards"] = [[SHARD, 1536, '"s"', 1]]  # holds 1000 bytes at 512, not 1028
    with pytest.raises(CorruptMetadataError, match="past the end of its shard"):
        Manifest.from_bytes(gzip.compress(json.dumps(data).encode()), where="m")


def test_a_catalog_piece_holds_only_its_own_bucket() -> None:
    record = ManifestRecord.from_json(GOOD_ROW)
    home = catalog.bucket_of("a.txt")
    raw = catalog.piece_bytes([record], fanout=catalog.FANOUT, bucket=home)
    assert catalog.parse_piece(raw, fanout=catalog.FANOUT, bucket=home, where="p") == {
        "a.txt": record
    }
    elsewhere = (home + 1) % catalog.FANOUT
    raw = catalog.piece_bytes([record], fanout=catalog.FANOUT, bucket=elsewhere)
    with pytest.raises(CorruptMetadataError, match=r"'a\.txt' belongs to another piece"):
        catalog.parse_piece(raw, fanout=catalog.FANOUT, bucket=elsewhere, where="p")


def test_the_catalog_root_is_checked() -> None:
    root = catalog.CatalogRoot("s3://b/p", catalog.FANOUT, 1, 10, {})
    assert catalog.CatalogRoot.from_bytes(root.to_bytes(), where="r") == root
    changes: list[tuple[dict[str, Any], str]] = [
        ({"files": -1}, "files -1 is below 0"),
        ({"bytes": 10**30}, "bytes 10* is above"),
        ({"shards": [["k", -4, '"e"', 1]]}, "size -4"),
        ({"fanout": 16}, "fan-out 16"),
    ]
    for change, message in changes:
        data = {**json.loads(root.to_bytes()), **change}
        with pytest.raises(CorruptMetadataError, match=message):
            catalog.CatalogRoot.from_bytes(json.dumps(data).encode(), where="r")


def test_slice_results_are_checked() -> None:
    result = SliceResult("0123456789abcdef", 2, 3, [ManifestRecord.from_json(GOOD_ROW)])
    assert SliceResult.from_bytes(result.to_bytes(), where="s").records == result.records
    data = json.loads(gzip.decompress(result.to_bytes()))
    data["slice"] = [4, 3]
    with pytest.raises(CorruptMetadataError, match="slice index 4 is above 3"):
        SliceResult.from_bytes(gzip.compress(json.dumps(data).encode()), where="s")


def test_shard_records_are_checked() -> None:
    assert ShardRecord.from_json([SHARD, 1024, '"e"', 2]) == ShardRecord(SHARD, 1024, '"e"', 2)
    with pytest.raises(BadValue, match="members -2 is below 0"):
        ShardRecord.from_json([SHARD, 1024, '"e"', -2])


def test_catalog_build_output_parses_back() -> None:
    manifest = Manifest(
        "s3://b/p",
        {"a.txt": ManifestRecord.from_json(GOOD_ROW)},
        {SHARD: ShardRecord(SHARD, 1024, '"e"', 0)},
    )
    root, pieces = catalog.build(manifest, S3Url("b", "p"))
    assert catalog.CatalogRoot.from_bytes(root.to_bytes(), where="r").shards == manifest.shards
    assert len(pieces) == 1


def test_compressing_in_pieces_keeps_within_the_readers_inflate_ratio() -> None:
    """compress_bounded_pieces (the manifest, written a few rows at a time) gives what
    compress_bounded gives once inflated, and falls back to Huffman-only coding like it when
    deflate would exceed WRITER_RATIO (pieces are asked for again then)."""
    from s3xfer.dataset.validate import WRITER_RATIO, compress_bounded_pieces, gunzip

    cases: list[list[bytes]] = [[b"abc" * 1000, b"xyz" * 7], [b"\0" * 100_000] * 5, [], [b""]]
    for pieces in cases:
        raw = compress_bounded_pieces(functools.partial(iter, pieces))
        data = b"".join(pieces)
        assert gunzip(raw) == data
        assert len(data) <= WRITER_RATIO * len(raw) or len(data) < 100
