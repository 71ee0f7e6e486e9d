"""The dataset manifest: what every uploaded file became (key, size, mtime, mode, CRC32).

Stored gzip-compressed as `<prefix>/.s3xfer/manifest.json.gz`. It makes re-runs incremental
(a file whose size and mtime match its record is not sent again) and downloads verifiable.
Packed files point into their shard (offset); the shards table holds each shard's size and
ETag so that a replaced shard is detected instead of returning wrong bytes.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Container, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..config import MAX_OBJECT_SIZE, MAX_SHARD_MEMBERS
from ..errors import BadValue
from . import validate
from .coding import Coding, stored_size
from .keys import shard_index_key

if TYPE_CHECKING:  # the planner is not loaded by commands that only read a manifest
    from ..planning.plan import FileUnit, ShardUnit

MANIFEST_FORMAT = "s3xfer-manifest"
# Version 2: file rows have a 10th field, the Content-Type. Version 1 (9 fields) still reads,
# every type unknown. Version 3: a coded file's row (compressed or encrypted, coding.py) has
# two more, its coding and stored size; written only when some file is coded, so that an
# s3xfer that cannot decode refuses such a manifest instead of returning stored bytes.
MANIFEST_VERSION = 2
CODED_MANIFEST_VERSION = 3
MANIFEST_VERSIONS = (1, 2, 3)
ROWS_AT_ONCE = 10_000  # rows encoded at once when a manifest is written
_CONTENT_TYPES: dict[str, str] = {}  # one string per distinct type, not one per record
_MODES: dict[int, int] = {}  # one int per distinct mode (a handful), not one per record


def _shared(
    key: str, etag: str, mode: int, offset: int, content_type: str
) -> tuple[str, str, int, str]:
    """One object for the values records repeat, instead of a copy per decoded row: the
    members of a shard share its key and ETag (interned; freed with their last record),
    most files share a few modes and types. A million records read from JSON hold about
    200 MB less (docs/architecture.md, "Memory per file")."""
    if offset >= 0:
        key, etag = sys.intern(key), sys.intern(etag)
    return (
        key,
        etag,
        _MODES.setdefault(mode, mode),
        _CONTENT_TYPES.setdefault(content_type, content_type),
    )


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
    # Of its own object as stored (upload --content-type, or guessed), or that a packed file
    # would be given; "" when none was sent, or the record predates the field.
    content_type: str = ""
    # How the bytes are stored (coding.Coding.to_json(): "" as they are) and how many there
    # are then (-1: `size`, uncoded). `size` and `crc32` are always the original file's.
    coding: str = ""
    stored_size: int = -1

    @property
    def packed(self) -> bool:
        return self.offset >= 0

    @property
    def stored(self) -> int:
        """The bytes of the object (or of the shard, from `offset`) that hold the file."""
        return self.size if self.stored_size < 0 else self.stored_size

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
            self.content_type,
            *((self.coding, self.stored_size) if self.coding else ()),
        ]

    @classmethod
    def from_json(cls, row: Any) -> ManifestRecord:
        """A record checked value by value (see validate.py); BadValue names what is wrong.
        A row of 9 fields (before the Content-Type was recorded) has none."""
        if type(row) is list and len(row) in (9, 10):
            path, key, size, mtime_ns, mode, crc32, part_size, offset, etag = row[:9]
            content_type = row[9] if len(row) == 10 else ""
            if (  # the usual record, accepted at a fraction of the cost of _checked
                validate.is_plain_path(path)
                and validate.is_plain_text(key, validate.MAX_KEY_BYTES)
                and type(size) is int
                and 0 <= size <= MAX_OBJECT_SIZE
                and type(mtime_ns) is int
                and -validate.MTIME_NS_LIMIT <= mtime_ns < validate.MTIME_NS_LIMIT
                and type(mode) is int
                and 0 <= mode <= validate.PERMISSION_BITS
                and validate.is_plain_crc32(crc32)
                and type(part_size) is int
                and part_size == 0
                and type(offset) is int
                and (
                    offset == -1
                    or (
                        offset >= validate.TAR_BLOCK
                        and offset % validate.TAR_BLOCK == 0
                        and offset + size <= MAX_OBJECT_SIZE
                    )
                )
                and validate.is_plain_etag(etag)
                and validate.is_plain_content_type(content_type)
            ):
                key, etag, mode, content_type = _shared(key, etag, mode, offset, content_type)
                return cls(
                    path, key, size, mtime_ns, mode, crc32, part_size, offset, etag, content_type
                )
        return cls._checked(row)

    @classmethod
    def _checked(cls, row: Any) -> ManifestRecord:
        fields = validate.array(row, "file record")
        if len(fields) not in (9, 10, 12):
            raise BadValue(f"file record has {len(fields)} fields, expected 9, 10 or 12")
        path, key, size, mtime_ns, mode, crc32, part_size, offset, etag = fields[:9]
        path = validate.relative_path(path)
        what = f"file {path!r}:"
        size = validate.size(size, f"{what} size")
        coding, stored = "", -1
        if len(fields) == 12:
            coding, stored = _coding_fields(fields[10], fields[11], size, what)
        if offset != -1 or type(offset) is not int:  # -1: the file is its own object
            offset = validate.shard_offset(
                offset, size if stored < 0 else stored, f"{what} offset in its shard"
            )
        return cls(
            path,
            validate.object_key(key, f"{what} key"),
            size,
            validate.mtime_ns(mtime_ns, f"{what} mtime_ns"),
            validate.mode(mode, f"{what} mode"),
            validate.crc32_base64(crc32, f"{what} crc32"),
            validate.part_size(part_size, size, f"{what} part_size"),
            offset,
            validate.etag(etag, f"{what} etag"),
            validate.content_type(fields[9], f"{what} content_type") if len(fields) > 9 else "",
            coding,
            stored,
        )

    def matches(self, unit: FileUnit) -> bool:
        """Unchanged since it was uploaded, to the same key, in the same shape."""
        return (
            self.key == unit.key
            and self.size == unit.size
            and self.mtime_ns == unit.mtime_ns
            and self.mode == unit.mode
            and self.part_size == unit.part_size
            and self.coding == unit.coding.to_json()
            and not self.packed
        )


def _coding_fields(coding: Any, stored: Any, size: int, what: str) -> tuple[str, int]:
    """A coded row's coding and stored size, checked: a size that follows from the original's
    (no compression) must be that size."""
    parsed = Coding.from_json(coding)
    if parsed.identity:
        raise BadValue(f"{what} a coded row names no coding")
    stored = validate.size(stored, f"{what} stored size")
    expected = stored_size(size, parsed)
    if expected is not None and stored != expected:
        raise BadValue(f"{what} stored size {stored} is not {expected} for {size} bytes {coding}")
    return parsed.to_json(), stored


def version_for(records: Iterable[ManifestRecord]) -> int:
    """The version a manifest (or catalog piece) of these records is written as."""
    coded = any(record.coding for record in records)
    return CODED_MANIFEST_VERSION if coded else MANIFEST_VERSION


@dataclass(frozen=True, slots=True)
class ShardRecord:
    key: str
    size: int
    etag: str
    members: int

    def to_json(self) -> list[Any]:
        return [self.key, self.size, self.etag, self.members]

    @classmethod
    def from_json(cls, row: Any) -> ShardRecord:
        key, size, etag, members = validate.array(row, "shard record", length=4)
        key = validate.object_key(key, "shard key")
        what = f"shard {key!r}:"
        return cls(
            key,
            validate.size(size, f"{what} size"),
            validate.etag(etag, f"{what} etag"),
            validate.integer(members, f"{what} members", low=0, high=MAX_SHARD_MEMBERS),
        )


def parse_rows(
    files: Any, shards: Any = None
) -> tuple[dict[str, ManifestRecord], dict[str, ShardRecord]]:
    """File and shard rows (of a manifest, catalog piece or slice result), checked together:
    each path and shard once, and a packed file inside its shard when the shard is listed."""
    shard_records = _shard_rows([] if shards is None else shards)
    records: dict[str, ManifestRecord] = {}
    for row in validate.array(files, "files"):
        _check_in_shards([_add_row(records, row)], shard_records)
    return records, shard_records


def _shard_rows(rows: Any) -> dict[str, ShardRecord]:
    shard_records: dict[str, ShardRecord] = {}
    for row in validate.array(rows, "shards"):
        listed = ShardRecord.from_json(row)
        if listed.key in shard_records:
            raise BadValue(f"shard {listed.key!r} is listed twice")
        shard_records[listed.key] = listed
    return shard_records


def _add_row(records: dict[str, ManifestRecord], row: Any) -> ManifestRecord:
    record = ManifestRecord.from_json(row)
    if record.path in records:
        raise BadValue(f"file {record.path!r} is listed twice")
    records[record.path] = record
    return record


def _check_in_shards(records: Iterable[ManifestRecord], shards: dict[str, ShardRecord]) -> None:
    """A packed file inside its shard, when the shard is listed."""
    for record in records:
        shard = shards.get(record.key) if record.packed else None
        if shard is not None and record.offset + record.stored > shard.size:
            raise BadValue(
                f"file {record.path!r}: bytes {record.offset}-{record.offset + record.stored} "
                f"are past the end of its shard {shard.key!r} ({shard.size} bytes)"
            )


class ManifestRows:
    """A manifest object's file records one at a time, as written (sorted by path), then its
    shards: never every record at once (an unchanged re-run compares them with the tree as it
    walks it, write/rerun.py). Iterating raises CorruptMetadataError on what from_bytes
    refuses, and on rows before the version (from_bytes reads those; s3xfer never wrote
    them). `shards` and `dest` are set once every record was taken."""

    def __init__(self, raw: bytes, *, where: str) -> None:
        self._stream = validate.ObjectRowStream(validate.gunzip_pieces(raw), "files")
        self._where = where
        self.dest = ""
        self.shards: dict[str, ShardRecord] = {}

    def __iter__(self) -> Iterator[ManifestRecord]:
        # The furthest byte each shard's records reach, checked against the shards table at
        # the end (from_bytes checks every record: a few numbers per shard instead).
        reach: dict[str, tuple[int, ManifestRecord]] = {}
        try:
            checked = False
            for row in self._stream:
                if not checked:  # before the first row: a newer version says so
                    validate.envelope(
                        self._stream.before, format=MANIFEST_FORMAT, version=MANIFEST_VERSIONS
                    )
                    checked = True
                record = ManifestRecord.from_json(row)
                if record.packed and reach.get(record.key, (-1, record))[0] < (
                    end := record.offset + record.stored
                ):
                    reach[record.key] = (end, record)
                yield record
            data = self._stream.data
            assert data is not None  # set once the rows are done
            validate.envelope(data, format=MANIFEST_FORMAT, version=MANIFEST_VERSIONS)
            self.dest = validate.text(validate.field(data, "dest"), "dest", max_bytes=2048)
            validate.array(validate.field(data, "files"), "files")
            self.shards = _shard_rows(data.get("shards", []))
            _check_in_shards((record for _end, record in reach.values()), self.shards)
        except BadValue as exc:
            raise validate.corrupt("manifest", self._where, exc) from exc


@dataclass
class Manifest:
    dest: str
    records: dict[str, ManifestRecord]
    shards: dict[str, ShardRecord] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """The manifest object: gzip of the JSON json.dumps gives for {format, version, dest,
        files, shards}, written and compressed ROWS_AT_ONCE files at a time, never the list of
        every row and its whole text (about 450 bytes a file at once)."""
        records = sorted(self.records.values(), key=lambda r: r.path)
        shards = [r.to_json() for r in sorted(self.shards.values(), key=lambda r: r.key)]
        envelope = {"format": MANIFEST_FORMAT, "version": version_for(records), "dest": self.dest}

        def dumps(value: Any) -> str:
            return json.dumps(value, separators=(",", ":"), ensure_ascii=False)

        def pieces() -> Iterator[bytes]:
            yield (dumps(envelope).removesuffix("}") + ',"files":[').encode("utf-8")
            for start in range(0, len(records), ROWS_AT_ONCE):
                rows = dumps([r.to_json() for r in records[start : start + ROWS_AT_ONCE]])
                yield ("," if start else "").encode() + rows[1:-1].encode("utf-8")
            yield ('],"shards":' + dumps(shards) + "}").encode("utf-8")

        return validate.compress_bounded_pieces(pieces)

    @classmethod
    def from_bytes(cls, raw: bytes, *, where: str) -> Manifest:
        """Raises CorruptMetadataError naming the value, and `where`, on anything malformed
        or out of range; inflates at most validate.inflate_limit(len(raw)) bytes."""
        records: dict[str, ManifestRecord] = {}
        waiting: list[Any] = []  # rows before the envelope (not as s3xfer writes it)

        def on_row(before: dict[str, Any], row: Any) -> None:
            # A record as each row is decoded, not a million rows then a million records;
            # the envelope checked first, so that a newer version says so.
            if waiting or "version" not in before:
                waiting.append(row)
            else:
                validate.envelope(before, format=MANIFEST_FORMAT, version=MANIFEST_VERSIONS)
                _add_row(records, row)

        try:
            data = validate.json_object_rows(validate.gunzip(raw), "files", on_row)
            validate.envelope(data, format=MANIFEST_FORMAT, version=MANIFEST_VERSIONS)
            dest = validate.text(validate.field(data, "dest"), "dest", max_bytes=2048)
            validate.array(validate.field(data, "files"), "files")  # [] once streamed
            for row in waiting:
                _add_row(records, row)
            shards = _shard_rows(data.get("shards", []))
            _check_in_shards(records.values(), shards)
        except BadValue as exc:
            raise validate.corrupt("manifest", where, exc) from exc
        return cls(dest=dest, records=records, shards=shards)

    def is_stale(self, record: ManifestRecord) -> bool:
        """A packed record whose shard was rewritten since (the shard's ETag is no longer the
        one it was recorded with): its offset points into bytes that are gone."""
        shard = self.shards.get(record.key)
        return record.packed and shard is not None and shard.etag != record.etag

    def _current(self, record: ManifestRecord, etags: dict[str, str]) -> bool:
        # is_stale, inlined for a million records: `etags` maps shard keys to their ETags.
        return record.offset < 0 or etags.get(record.key, record.etag) == record.etag

    def drop_stale(self) -> list[str]:
        """Forget every stale record (see is_stale); their paths, sorted."""
        etags = {key: shard.etag for key, shard in self.shards.items()}
        stale = sorted(p for p, r in self.records.items() if not self._current(r, etags))
        for path in stale:
            del self.records[path]
        return stale

    def synced(self, tree: Container[str], *, keep: Callable[[str], bool]) -> Manifest:
        """The dataset after an upload of `tree` (the paths of the uploaded tree), as a
        `rclone sync` leaves it: the records of files in the tree, and of files no longer in
        it only where `keep` says so (--keep-deleted, or a path the survey could not read);
        no stale record; only the shards those records point into. Pure."""
        etags = {key: shard.etag for key, shard in self.shards.items()}
        records = {
            path: record
            for path, record in self.records.items()
            if (path in tree or keep(path)) and self._current(record, etags)
        }
        used = {r.key for r in records.values() if r.offset >= 0}
        shards = {key: shard for key, shard in self.shards.items() if key in used}
        return Manifest(self.dest, records, shards)

    def object_keys(self) -> set[str]:
        """Every key this manifest refers to: files' own objects, shards and their indexes."""
        keys = {r.key for r in self.records.values()}
        shards = {*self.shards, *(r.key for r in self.records.values() if r.offset >= 0)}
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
