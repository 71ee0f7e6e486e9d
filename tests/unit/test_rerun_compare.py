"""The unchanged re-run's comparison (write/rerun.py): the walk and the manifest's rows
merge-joined in path order, holding one shard's members at most; and the manifest read as a
stream (dataset/validate.py ObjectRowStream, gunzip_pieces; dataset/manifest.py
ManifestRows), never its whole text."""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from s3xfer.config import MiB, TransferConfig
from s3xfer.dataset.keys import S3Url
from s3xfer.dataset.manifest import Manifest, ManifestRecord, ManifestRows, ShardRecord
from s3xfer.dataset.validate import ObjectRowStream, compress_bounded, gunzip_pieces
from s3xfer.errors import BadValue, CorruptMetadataError
from s3xfer.planning.globs import PathFilter
from s3xfer.planning.plan import make_plan
from s3xfer.planning.survey import FileEntry, Problem, SizeStats, Survey
from s3xfer.write.rerun import _Differs, _shards_as_recorded, compare

DEST = S3Url.parse("s3://bkt/ds")
# Shards of about 50 files of 100 KiB.
CONFIG = TransferConfig(shard_size=5 * MiB, part_size=5 * MiB)
SIZE = 100 * 1024


def entries(count: int) -> list[FileEntry]:
    return [
        FileEntry(f"d{n // 100}/f{n:05d}", SIZE, 1_700_000_000_000_000_000 + n, 0o644)
        for n in range(count)
    ] + [FileEntry("z/big", 2 * MiB, 5, 0o600)]


def recorded(files: list[FileEntry]) -> Manifest:
    """The manifest an upload of `files` writes: records as the engine makes them."""
    plan = make_plan(_survey_of(files), DEST, CONFIG)
    records: dict[str, ManifestRecord] = {}
    shards: dict[str, ShardRecord] = {}
    for unit in plan.units:
        records[unit.path] = ManifestRecord(
            unit.path, unit.key, unit.size, unit.mtime_ns, unit.mode, "AAAAAA==", 0, etag='"e"'
        )
    for shard in plan.shards:
        layout = shard.layout()
        for n, member in enumerate(shard.members):
            records[member.path] = ManifestRecord(
                member.path,
                shard.key,
                member.size,
                member.mtime_ns,
                member.mode,
                "AAAAAA==",
                0,
                layout.data_offset(n),
                '"s"',
            )
        shards[shard.key] = ShardRecord(shard.key, layout.size, '"s"', len(shard.members))
    return Manifest(str(DEST), records, shards)


def _survey_of(files: list[FileEntry]) -> Survey:
    stats = SizeStats()
    for entry in files:
        stats.add(entry.size, entry.path)
    return Survey(root=Path("/tree"), files=files, problems=[], stats=stats.summary())


class Lockstep:
    """The walk and the rows as generators that fail the test if the rows are taken more
    than one ahead of the walk: the join holds no more of the manifest than that (and the
    records of one shard being cut)."""

    def __init__(self, walk: list[FileEntry | Problem], rows: list[ManifestRecord]) -> None:
        self.walked = 0
        self.read = 0
        self._walk, self._rows = walk, rows

    def walk(self) -> Iterator[FileEntry | Problem]:
        for item in self._walk:
            self.walked += 1
            yield item

    def rows(self) -> Iterator[ManifestRecord]:
        for row in self._rows:
            self.read += 1
            if self.read > self.walked + 1:
                raise AssertionError(f"row {self.read} taken with {self.walked} walked")
            yield row


def run(walk: list[FileEntry | Problem], manifest: Manifest, **options: object) -> tuple[int, int]:
    rows = [manifest.records[p] for p in sorted(manifest.records)]
    both = Lockstep(walk, rows)
    found = compare(both.rows(), both.walk(), DEST, CONFIG, **options)  # type: ignore[arg-type]
    return found.files, found.size


def test_an_unchanged_tree_is_compared_row_by_row_as_it_is_walked() -> None:
    files = entries(1000)
    manifest = recorded(files)
    assert len(manifest.shards) > 15  # many shards cut while walking
    assert run(list(files), manifest) == (1001, 1000 * SIZE + 2 * MiB)


@pytest.mark.parametrize(
    "change",
    ["mtime", "mode", "size of the big file", "new", "gone", "problem", "offset", "order"],
)
def test_every_difference_is_found(change: str) -> None:
    files = entries(300)
    manifest = recorded(files)
    walk: list[FileEntry | Problem] = list(files)
    if change == "mtime":
        walk[150] = replace(files[150], mtime_ns=1)
    elif change == "mode":
        walk[10] = replace(files[10], mode=0o600)
    elif change == "size of the big file":
        walk[-1] = replace(files[-1], size=3 * MiB)
    elif change == "new":
        walk.insert(5, FileEntry("d0/f00004a", 3, 4, 0o644))
    elif change == "gone":
        del walk[299]
    elif change == "problem":
        walk.insert(1, Problem("d0/f00000a", "permission denied"))
    elif change == "offset":
        path = files[42].path
        manifest.records[path] = replace(manifest.records[path], offset=512)
    else:
        walk[3], walk[4] = walk[4], walk[3]
    with pytest.raises(_Differs):
        run(walk, manifest)


def test_files_outside_the_tree_are_kept_or_left_alone_as_told() -> None:
    files = entries(50)
    manifest = recorded(files)
    walk: list[FileEntry | Problem] = list(files[:-1])  # the big file is gone
    with pytest.raises(_Differs):
        run(walk, manifest)
    found = compare(
        iter(manifest.records[p] for p in sorted(manifest.records)),
        iter(walk),
        DEST,
        CONFIG,
        keep_deleted=True,
    )
    assert found.kept_deleted == 1
    found = compare(
        iter(manifest.records[p] for p in sorted(manifest.records)),
        iter(walk),
        DEST,
        CONFIG,
        selection=PathFilter(exclude=("z/*",)),
    )
    assert (found.not_selected, found.files) == (1, 50)


def test_a_stale_record_or_an_unused_shard_is_a_difference() -> None:
    files = entries(100)
    manifest = recorded(files)

    def rows_of(m: Manifest) -> Iterator[ManifestRecord]:
        return iter(m.records[p] for p in sorted(m.records))

    def as_recorded(m: Manifest) -> bool:
        found = compare(rows_of(m), iter(files), DEST, CONFIG)
        rows = ManifestRows(m.to_bytes(), where="m")
        list(rows)
        return _shards_as_recorded(found, rows)

    assert as_recorded(manifest)
    key = next(iter(manifest.shards))
    stale = Manifest(manifest.dest, manifest.records, dict(manifest.shards))
    stale.shards[key] = replace(stale.shards[key], etag='"rewritten"')
    assert not as_recorded(stale)
    unused = Manifest(manifest.dest, manifest.records, dict(manifest.shards))
    unused.shards["ds/other.tar"] = ShardRecord("ds/other.tar", 2048, '"o"', 1)
    assert not as_recorded(unused)


def test_manifest_rows_are_the_records_from_bytes_reads_in_path_order() -> None:
    manifest = recorded(entries(500))
    raw = manifest.to_bytes()
    rows = ManifestRows(raw, where="m")
    streamed = list(rows)
    assert [r.path for r in streamed] == sorted(manifest.records)
    read = Manifest.from_bytes(raw, where="m")
    assert {r.path: r for r in streamed} == read.records
    assert rows.shards == read.shards and rows.dest == read.dest


def test_a_corrupt_manifest_is_refused_by_the_stream_too() -> None:
    manifest = recorded(entries(30))
    text = json.loads(zlib.decompress(manifest.to_bytes(), 16 + zlib.MAX_WBITS))
    path = text["files"][3][0]
    text["files"][3][7] = 10**9  # past the end of its shard
    raw = compress_bounded(json.dumps(text).encode())
    with pytest.raises(CorruptMetadataError, match="past the end of its shard"):
        list(ManifestRows(raw, where="m"))
    with pytest.raises(CorruptMetadataError):
        Manifest.from_bytes(raw, where="m")
    text["version"] = 99
    with pytest.raises(CorruptMetadataError, match="version"):
        list(ManifestRows(compress_bounded(json.dumps(text).encode()), where="m"))
    assert path


@pytest.mark.parametrize("piece", [1, 2, 5, 64, 10**6])
def test_an_object_read_in_pieces_of_any_size_is_the_same_object(piece: int) -> None:
    obj = {
        "format": "x",
        "version": 2,
        "files": [[f"é/{n}", n, -n * 1.5, True, None, {"a": [1, "]"]}] for n in range(300)],
        "shards": [[1, 22], [333]],
    }
    text = json.dumps(obj, ensure_ascii=False).encode()
    stream = ObjectRowStream((text[i : i + piece] for i in range(0, len(text), piece)), "files")
    assert list(stream) == obj["files"]
    assert stream.data == {**obj, "files": []}


@pytest.mark.parametrize(
    "text",
    [b'{"files":[[1],[2]', b'{"files":[1,2]} x', b"[1]", b'{"files":[1,,2]}', b"\xff"],
)
def test_what_is_not_one_json_object_is_bad(text: bytes) -> None:
    with pytest.raises(BadValue):
        list(ObjectRowStream(iter([text]), "files"))


def test_gunzip_pieces_keeps_gunzips_limits() -> None:
    data = b"x" * 5_000_000
    raw = compress_bounded(data)
    assert b"".join(gunzip_pieces(raw)) == data
    assert max(len(p) for p in gunzip_pieces(raw)) <= 1024 * 1024
    with pytest.raises(BadValue, match="inflates to more than"):
        list(gunzip_pieces(raw, limit=1_000_000))
    with pytest.raises(BadValue, match="truncated"):
        list(gunzip_pieces(raw[:-10]))
    with pytest.raises(BadValue, match="after the end"):
        list(gunzip_pieces(raw + b"junk"))
