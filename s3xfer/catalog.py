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

import gzip
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from .errors import IntegrityError
from .keys import META_DIR, S3Url
from .manifest import Manifest, ManifestRecord, ShardRecord

CATALOG_FORMAT = "s3xfer-catalog"
PIECE_FORMAT = "s3xfer-catalog-piece"
CATALOG_VERSION = 1
# 1,000,000 files make pieces of about 4,000 records (~100 KB compressed): still one small GET.
FANOUT = 256


def root_key(dest: S3Url) -> str:
    return dest.key(f"{META_DIR}/catalog.json")


def piece_key(dest: S3Url, bucket: int) -> str:
    return dest.key(f"{META_DIR}/catalog/{bucket:02x}.json.gz")


def bucket_of(path: str, fanout: int = FANOUT) -> int:
    digest = hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=4).digest()
    return int.from_bytes(digest, "big") % fanout


@dataclass(frozen=True)
class CatalogRoot:
    dest: str
    fanout: int
    files: int
    total_bytes: int
    shards: dict[str, ShardRecord]

    def to_bytes(self) -> bytes:
        data = {
            "format": CATALOG_FORMAT,
            "version": CATALOG_VERSION,
            "dest": self.dest,
            "fanout": self.fanout,
            "files": self.files,
            "bytes": self.total_bytes,
            "shards": [r.to_json() for r in sorted(self.shards.values(), key=lambda r: r.key)],
        }
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_bytes(cls, raw: bytes, *, where: str) -> CatalogRoot:
        try:
            data = json.loads(raw)
            if data.get("format") != CATALOG_FORMAT or data.get("version") != CATALOG_VERSION:
                raise ValueError(f"unknown format {data.get('format')!r} v{data.get('version')}")
            fanout = int(data["fanout"])
            if fanout != FANOUT:
                raise ValueError(f"fan-out {fanout}, expected {FANOUT}")
            shards = [ShardRecord.from_json(row) for row in data["shards"]]
            return cls(
                str(data["dest"]),
                fanout,
                int(data["files"]),
                int(data["bytes"]),
                {s.key: s for s in shards},
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise IntegrityError(f"corrupt catalog {where}: {exc}") from exc


def piece_bytes(records: list[ManifestRecord], *, fanout: int, bucket: int) -> bytes:
    data = {
        "format": PIECE_FORMAT,
        "version": CATALOG_VERSION,
        "fanout": fanout,
        "bucket": bucket,
        "files": [r.to_json() for r in sorted(records, key=lambda r: r.path)],
    }
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return gzip.compress(text.encode("utf-8"), mtime=0)


def parse_piece(raw: bytes, *, fanout: int, bucket: int, where: str) -> dict[str, ManifestRecord]:
    try:
        data = json.loads(gzip.decompress(raw))
        if data.get("format") != PIECE_FORMAT or data.get("version") != CATALOG_VERSION:
            raise ValueError(f"unknown format {data.get('format')!r} v{data.get('version')}")
        if (data.get("fanout"), data.get("bucket")) != (fanout, bucket):
            raise ValueError("piece belongs to another fan-out or bucket")
        records = [ManifestRecord.from_json(row) for row in data["files"]]
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise IntegrityError(f"corrupt catalog piece {where}: {exc}") from exc
    return {r.path: r for r in records}


def _buckets(manifest: Manifest) -> dict[int, list[ManifestRecord]]:
    buckets: dict[int, list[ManifestRecord]] = {}
    for record in manifest.records.values():
        buckets.setdefault(bucket_of(record.path), []).append(record)
    return buckets


def build(
    manifest: Manifest, dest: S3Url, *, previous: Manifest | None = None
) -> tuple[CatalogRoot, dict[str, bytes]]:
    """The catalog of a manifest: its root and its non-empty pieces, by key. With `previous`
    (the manifest the catalog was last written from), only the pieces whose records changed:
    the only ones to write; a piece whose every file left the dataset is written empty. Pure."""
    old = _buckets(previous) if previous is not None else {}
    new = _buckets(manifest)
    pieces = {
        piece_key(dest, b): piece_bytes(new.get(b, []), fanout=FANOUT, bucket=b)
        for b in sorted(new.keys() | old.keys())
        if sorted(new.get(b, []), key=lambda r: r.path)
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
    }
