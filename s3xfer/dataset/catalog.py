"""The dataset catalog: where is path P? Answered with one small GET (or none, when cached).

The manifest lists every file and is what uploads read; for lookups it is split into pieces
by a hash of the path, so finding one file among millions fetches one small piece:

    <prefix>/.s3xfer/catalog.json            root: totals and shards (size, ETag), for `ls`
    <prefix>/.s3xfer/catalog/<bb>.json.gz    the records whose path hashes to bucket bb

The fan-out is fixed (256), so a reader finds a path's piece without reading anything first:
a cold lookup is one small GET, then the data GET. Only non-empty pieces are written (a small
dataset has as many pieces as files at most); a missing piece means the path is not there.
Records carry the ETag of the object holding the bytes, so a replaced object or shard is
detected instead of returning wrong bytes (reads send If-Match).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..config import MAX_OBJECT_SIZE
from ..errors import BadValue
from . import validate
from .keys import META_DIR, S3Url
from .manifest import Manifest, ManifestRecord, ShardRecord, parse_rows, version_for

CATALOG_FORMAT = "s3xfer-catalog"
PIECE_FORMAT = "s3xfer-catalog-piece"
CATALOG_VERSION = 1
# Version 2: file rows as in the manifest's version 2 (with the Content-Type); 1 still reads.
PIECE_VERSION = 2
PIECE_VERSIONS = (1, 2, 3)  # 3: rows of coded files, as in a version 3 manifest
# 1,000,000 files make pieces of about 4,000 records (~100 KB compressed): still one small GET.
FANOUT = 256
MAX_CATALOG_FILES = 10**12  # a sanity bound on the root's count, far above any real dataset


def root_key(dest: S3Url) -> str:
    return dest.key(f"{META_DIR}/catalog.json")


def piece_key(dest: S3Url, bucket: int) -> str:
    return dest.key(f"{META_DIR}/catalog/{bucket:02x}.json.gz")


def bucket_of(path: str, fanout: int = FANOUT) -> int:
    digest = hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=4).digest()
    return int.from_bytes(digest, "big") % fanout


def pieces_prefix(dest: S3Url) -> str:
    return dest.key(f"{META_DIR}/catalog/")


def piece_bucket(dest: S3Url, key: str) -> int | None:
    """The bucket of a piece's key (piece_key's inverse); None for any other key."""
    name = key.removeprefix(pieces_prefix(dest))
    if name == key or not name.endswith(".json.gz"):
        return None
    digits = name.removesuffix(".json.gz")
    if len(digits) != 2 or any(c not in "0123456789abcdef" for c in digits):
        return None
    bucket = int(digits, 16)
    return bucket if bucket < FANOUT else None


@dataclass(frozen=True)
class CatalogRoot:
    dest: str
    fanout: int
    files: int
    total_bytes: int
    shards: dict[str, ShardRecord]
    # What the catalog was written from, so that an upload can tell it is whole and current:
    # the SHA-256 of the manifest object, and the ETag of every piece as its PUT answered.
    manifest_sha256: str = ""
    pieces: dict[int, str] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        data = {
            "format": CATALOG_FORMAT,
            "version": CATALOG_VERSION,
            "dest": self.dest,
            "fanout": self.fanout,
            "files": self.files,
            "bytes": self.total_bytes,
            "shards": [r.to_json() for r in sorted(self.shards.values(), key=lambda r: r.key)],
            "manifest_sha256": self.manifest_sha256,
            "pieces": {f"{b:02x}": self.pieces[b] for b in sorted(self.pieces)},
        }
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_bytes(cls, raw: bytes, *, where: str) -> CatalogRoot:
        """Raises CorruptMetadataError naming the value, and `where`, on anything malformed."""
        try:
            data = validate.json_object(raw)
            validate.envelope(data, format=CATALOG_FORMAT, version=CATALOG_VERSION)
            fanout = validate.field(data, "fanout")
            if fanout != FANOUT:
                raise BadValue(f"fan-out {fanout!r:.40}, expected {FANOUT}")
            files = validate.integer(
                validate.field(data, "files"), "files", low=0, high=MAX_CATALOG_FILES
            )
            total = validate.integer(
                validate.field(data, "bytes"), "bytes", low=0, high=files * MAX_OBJECT_SIZE
            )
            _, shards = parse_rows([], validate.field(data, "shards"))
            dest = validate.text(validate.field(data, "dest"), "dest", max_bytes=2048)
            # Absent in roots written before s3xfer checked them: such a catalog is rewritten.
            digest = validate.text(
                data.get("manifest_sha256", ""), "manifest_sha256", max_bytes=64, empty=True
            )
            pieces = _piece_etags(data.get("pieces", {}))
        except BadValue as exc:
            raise validate.corrupt("catalog", where, exc) from exc
        return cls(dest, fanout, files, total, shards, digest, pieces)


def _piece_etags(value: Any) -> dict[int, str]:
    if not isinstance(value, dict):
        raise BadValue(f"pieces is not an object: {value!r:.80}")
    pieces: dict[int, str] = {}
    for name, etag in value.items():
        if len(name) != 2 or any(c not in "0123456789abcdef" for c in name):
            raise BadValue(f"pieces names {name!r:.20}, not a bucket in hex")
        pieces[int(name, 16)] = validate.etag(etag, f"piece {name} etag")
    return pieces


@dataclass(frozen=True)
class CatalogState:
    """The catalog as an upload finds it: its root (None when absent or unreadable) and the
    piece objects one listing shows, by bucket, with their ETags."""

    root: CatalogRoot | None
    listed: dict[int, str]

    def current(self, manifest_sha256: str | None) -> bool:
        """Written whole from the manifest with this digest (None: no manifest) and untouched
        since: the root names that manifest and exactly the pieces that are there. False
        after a writer died between the pieces and the manifest, two writers raced, or the
        root predates these checks: the catalog is then written again whole."""
        if self.root is None:
            return manifest_sha256 is None and not self.listed
        return self.root.manifest_sha256 == manifest_sha256 and _unquoted(
            self.root.pieces
        ) == _unquoted(self.listed)


def _unquoted(etags: dict[int, str]) -> dict[int, str]:
    # An ETag is quoted in S3's answers; a server that leaves the quotes out of one answer
    # (a PUT's, say) but not another's (a listing's) must not make every catalog look stale.
    return {bucket: etag.strip('"') for bucket, etag in etags.items()}


def piece_bytes(records: list[ManifestRecord], *, fanout: int, bucket: int) -> bytes:
    data = {
        "format": PIECE_FORMAT,
        "version": max(PIECE_VERSION, version_for(records)),
        "fanout": fanout,
        "bucket": bucket,
        "files": [r.to_json() for r in sorted(records, key=lambda r: r.path)],
    }
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return validate.compress_bounded(text.encode("utf-8"))


def parse_piece(raw: bytes, *, fanout: int, bucket: int, where: str) -> dict[str, ManifestRecord]:
    """The records of one piece. Raises CorruptMetadataError naming the value, and `where`, on
    anything malformed, or a record whose path belongs to another piece."""
    try:
        data = validate.json_object(validate.gunzip(raw))
        validate.envelope(data, format=PIECE_FORMAT, version=PIECE_VERSIONS)
        if (data.get("fanout"), data.get("bucket")) != (fanout, bucket):
            raise BadValue(
                f"piece of fan-out {data.get('fanout')!r:.40} bucket {data.get('bucket')!r:.40}, "
                f"expected {fanout} and {bucket}"
            )
        records, _ = parse_rows(validate.field(data, "files"))
        for path in records:
            if bucket_of(path, fanout) != bucket:
                raise BadValue(f"file {path!r} belongs to another piece")
    except BadValue as exc:
        raise validate.corrupt("catalog piece", where, exc) from exc
    return records


def _buckets(manifest: Manifest) -> dict[int, list[ManifestRecord]]:
    buckets: dict[int, list[ManifestRecord]] = {}
    for record in manifest.records.values():
        buckets.setdefault(bucket_of(record.path), []).append(record)
    return buckets


def build(
    manifest: Manifest,
    dest: S3Url,
    *,
    previous: Manifest | None = None,
    stale: Iterable[int] = (),
) -> tuple[CatalogRoot, dict[str, bytes]]:
    """The catalog of a manifest: its root and its pieces to write, by key. With `previous`
    (the manifest the catalog was last written from), only the pieces whose records changed;
    without, every non-empty piece. A piece whose every file left the dataset, or one of the
    `stale` buckets that has no file now, is written empty. The root's manifest_sha256 and
    pieces are left for the writer to fill in. Pure."""
    old = _buckets(previous) if previous is not None else {}
    new = _buckets(manifest)
    pieces = {
        piece_key(dest, b): piece_bytes(new.get(b, []), fanout=FANOUT, bucket=b)
        for b in sorted(new.keys() | old.keys() | set(stale))
        if previous is None
        or sorted(new.get(b, []), key=lambda r: r.path)
        != sorted(old.get(b, []), key=lambda r: r.path)
    }
    root = CatalogRoot(
        dest=str(dest),
        fanout=FANOUT,
        files=len(manifest.records),
        total_bytes=sum(r.size for r in manifest.records.values()),
        shards=dict(manifest.shards),
    )
    return root, pieces


def to_json(record: ManifestRecord) -> dict[str, Any]:
    """A record as `ls --json` shows it."""
    return {
        "path": record.path,
        "size": record.size,
        "mtime_ns": record.mtime_ns,
        "mode": record.mode,
        "crc32": record.crc32,
        "key": record.key,
        "offset": record.offset if record.packed else None,
        "stored": "shard" if record.packed else "object",
        "content_type": record.content_type or None,  # None: none sent, or not recorded
    }
