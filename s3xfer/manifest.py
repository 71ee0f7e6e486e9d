"""The dataset manifest: what every uploaded file became (key, size, mtime, mode, CRC32).

Stored gzip-compressed as `<prefix>/.s3xfer/manifest.json.gz`. It makes re-runs incremental
(a file whose size and mtime match its record is not sent again) and downloads verifiable.
Packed files point into their shard (offset); the shards table holds each shard's size and
ETag so that a replaced shard is detected instead of returning wrong bytes.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import IntegrityError
from .keys import shard_index_key

if TYPE_CHECKING:  # the planner is not loaded by commands that only read a manifest
    from .plan import FileUnit, ShardUnit

MANIFEST_FORMAT = "s3xfer-manifest"
MANIFEST_VERSION = 1


@dataclass(frozen=True, slots=True)
class ManifestRecord:
    path: str
    key: str
    size: int
    mtime_ns: int
    mode: int
    crc32: str  # base64 of the big-endian CRC32 of the whole file, as S3 reports it
    part_size: int  # 0 for a single PUT; lets downloads align ranges to parts
    offset: int = -1  # where the file's bytes start inside its shard; -1 for its own object
    etag: str = ""  # of the object holding the bytes (for a packed file: of the shard)

    @property
    def packed(self) -> bool:
        return self.offset >= 0

    def to_json(self) -> list[Any]:
        return [
            self.path,
            self.key,
            self.size,
            self.mtime_ns,
            self.mode,
            self.crc32,
            self.part_size,
            self.offset,
            self.etag,
        ]

    @classmethod
    def from_json(cls, row: list[Any]) -> ManifestRecord:
        path, key, size, mtime_ns, mode, crc32, part_size, offset, etag = row
        return cls(
            str(path),
            str(key),
            int(size),
            int(mtime_ns),
            int(mode),
            str(crc32),
            int(part_size),
            int(offset),
            str(etag),
        )

    def matches(self, unit: FileUnit) -> bool:
        """Unchanged since it was uploaded, to the same key, in the same shape."""
        return (
            self.key == unit.key
            and self.size == unit.size
            and self.mtime_ns == unit.mtime_ns
            and self.mode == unit.mode
            and self.part_size == unit.part_size
            and not self.packed
        )


@dataclass(frozen=True, slots=True)
class ShardRecord:
    key: str
    size: int
    etag: str
    members: int

    def to_json(self) -> list[Any]:
        return [self.key, self.size, self.etag, self.members]

    @classmethod
    def from_json(cls, row: list[Any]) -> ShardRecord:
        key, size, etag, members = row
        return cls(str(key), int(size), str(etag), int(members))


@dataclass
class Manifest:
    dest: str
    records: dict[str, ManifestRecord]
    shards: dict[str, ShardRecord] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        data = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "dest": self.dest,
            "files": [r.to_json() for r in sorted(self.records.values(), key=lambda r: r.path)],
            "shards": [r.to_json() for r in sorted(self.shards.values(), key=lambda r: r.key)],
        }
        text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
        return gzip.compress(text.encode("utf-8"), mtime=0)

    @classmethod
    def from_bytes(cls, raw: bytes, *, where: str) -> Manifest:
        try:
            data = json.loads(gzip.decompress(raw))
            if data.get("format") != MANIFEST_FORMAT or data.get("version") != MANIFEST_VERSION:
                raise ValueError(f"unknown format {data.get('format')!r} v{data.get('version')}")
            records = [ManifestRecord.from_json(row) for row in data["files"]]
            shards = [ShardRecord.from_json(row) for row in data.get("shards", [])]
        except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise IntegrityError(f"corrupt manifest {where}: {exc}") from exc
        return cls(
            dest=str(data.get("dest", "")),
            records={r.path: r for r in records},
            shards={r.key: r for r in shards},
        )

    def is_stale(self, record: ManifestRecord) -> bool:
        """A packed record whose shard was rewritten since (the shard's ETag is no longer the
        one it was recorded with): its offset points into bytes that are gone."""
        shard = self.shards.get(record.key)
        return record.packed and shard is not None and shard.etag != record.etag

    def drop_stale(self) -> list[str]:
        """Forget every stale record (see is_stale); their paths, sorted."""
        stale = sorted(path for path, record in self.records.items() if self.is_stale(record))
        for path in stale:
            del self.records[path]
        return stale

    def synced(self, tree: Container[str], *, keep: Callable[[str], bool]) -> Manifest:
        """The dataset after an upload of `tree` (the paths of the uploaded tree), as a
        `rclone sync` leaves it: the records of files in the tree, and of files no longer in
        it only where `keep` says so (--keep-deleted, or a path the survey could not read);
        no stale record; only the shards those records point into. Pure."""
        records = {
            path: record
            for path, record in self.records.items()
            if (path in tree or keep(path)) and not self.is_stale(record)
        }
        used = {r.key for r in records.values() if r.packed}
        shards = {key: shard for key, shard in self.shards.items() if key in used}
        return Manifest(self.dest, records, shards)

    def object_keys(self) -> set[str]:
        """Every key this manifest refers to: files' own objects, shards and their indexes."""
        keys = {r.key for r in self.records.values()}
        shards = {*self.shards, *(r.key for r in self.records.values() if r.packed)}
        return keys | shards | {shard_index_key(key) for key in shards}

    def same_as(self, other: Manifest | None) -> bool:
        """Holds the same records and shards (other None: an empty manifest)."""
        if other is None:
            return not self.records and not self.shards
        return self.records == other.records and self.shards == other.shards

    def select_changed(self, units: Iterable[FileUnit]) -> tuple[list[FileUnit], list[FileUnit]]:
        """Split units into (to upload, unchanged)."""
        todo: list[FileUnit] = []
        unchanged: list[FileUnit] = []
        for unit in units:
            record = self.records.get(unit.path)
            (unchanged if record is not None and record.matches(unit) else todo).append(unit)
        return todo, unchanged

    def shard_unchanged(self, shard: ShardUnit) -> bool:
        """Every member recorded in this very shard, at its planned offset, unchanged."""
        recorded = self.shards.get(shard.key)
        if recorded is None or recorded.members != len(shard.members):
            return False
        layout = shard.layout()
        if recorded.size != layout.size:
            return False
        for n, member in enumerate(shard.members):
            record = self.records.get(member.path)
            if record is None or (
                record.key,
                record.offset,
                record.size,
                record.mtime_ns,
                record.mode,
            ) != (shard.key, layout.data_offset(n), member.size, member.mtime_ns, member.mode):
                return False
        return True

    def select_changed_shards(
        self, shards: Iterable[ShardUnit]
    ) -> tuple[list[ShardUnit], list[ShardUnit]]:
        todo: list[ShardUnit] = []
        unchanged: list[ShardUnit] = []
        for shard in shards:
            (unchanged if self.shard_unchanged(shard) else todo).append(shard)
        return todo, unchanged
