"""S3 URLs and object key naming, including deterministic hashed key prefixes."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ..errors import UsageError

# Bucket names per S3 rules (lowercase, digits, dots, hyphens, 3-63 characters).
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")

# Where s3xfer keeps its own objects (manifest, catalog, shards) under a dataset prefix.
META_DIR = ".s3xfer"
# Why a source path under META_DIR is not uploaded: its objects would overwrite s3xfer's own.
RESERVED_REASON = "reserved for s3xfer's own objects at the dataset root"


def is_reserved_path(relative_path: str) -> bool:
    """Whether a dataset path is s3xfer's: META_DIR at the dataset root, or anything in it."""
    return relative_path == META_DIR or relative_path.startswith(META_DIR + "/")


@dataclass(frozen=True, slots=True)
class S3Url:
    bucket: str
    prefix: str  # no leading or trailing '/'; may be empty

    @classmethod
    def parse(cls, url: str) -> S3Url:
        """Parse 's3://bucket/some/prefix' (trailing '/' optional). Raises UsageError."""
        if not url.startswith("s3://"):
            raise UsageError(f"not an S3 URL: {url!r} (expected s3://bucket/prefix)")
        bucket, _, prefix = url[len("s3://") :].partition("/")
        if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
            raise UsageError(f"not a valid bucket name in {url!r}: {bucket!r}")
        prefix = prefix.strip("/")
        if "//" in prefix or any(part in (".", "..") for part in prefix.split("/")):
            raise UsageError(f"S3 prefix must not contain empty, '.' or '..' segments: {url!r}")
        return cls(bucket, prefix)

    def key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


def enclosing_prefixes(url: S3Url) -> Iterator[tuple[S3Url, str]]:
    """Where a file that a URL names may live when no object has its key: (dataset URL, path
    inside it) for each prefix above the key, nearest first, the bucket's root last
    (s3://b/ds/img/1.jpg: s3://b/ds/img and 1.jpg, s3://b/ds and img/1.jpg, s3://b and
    ds/img/1.jpg)."""
    parts = url.prefix.split("/") if url.prefix else []
    for cut in range(len(parts) - 1, -1, -1):
        yield S3Url(url.bucket, "/".join(parts[:cut])), "/".join(parts[cut:])


def hashed_prefix(relative_path: str, *, width: int = 4) -> str:
    """A short, stable hex prefix derived from the path: same file, same key, every run.

    Spreading keys over 16**width leading characters lets S3 split the load over
    partitions instead of hammering one prefix.
    """
    return hashlib.blake2b(relative_path.encode("utf-8"), digest_size=8).hexdigest()[:width]


def object_key(dest: S3Url, relative_path: str, *, style: str) -> str:
    """Key of a file uploaded as its own object."""
    if style == "hash":
        return dest.key(f"{hashed_prefix(relative_path)}/{relative_path}")
    return dest.key(relative_path)


def manifest_key(dest: S3Url) -> str:
    return dest.key(f"{META_DIR}/manifest.json.gz")


def data_key_record_key(dest: S3Url) -> str:
    """The dataset's data key, wrapped by the user's key (docs/format.md, "Coded files")."""
    return dest.key(f"{META_DIR}/keys.json")


def shard_index_key(shard_key: str) -> str:
    """A shard's index, stored beside it so a reader need not touch the shard."""
    return shard_key + ".index.json"


def sync_deletable(dest: S3Url, key: str) -> bool:
    """Whether a re-upload may delete `key` once nothing refers to it: a file's object or a
    shard under the dataset's prefix, never s3xfer's manifest, catalog or slice results, and
    never a key outside the prefix (whatever a manifest says)."""
    inside = dest.key("")
    if not key.startswith(inside) or key == inside:
        return False
    relative = key[len(inside) :]
    return not relative.startswith(f"{META_DIR}/") or relative.startswith(f"{META_DIR}/shards/")


SLICES_DIR = f"{META_DIR}/slices/"
LEASE_NAME = f"{META_DIR}/lease.json"


def unfinished_upload(url: S3Url, paths: Iterable[str]) -> str | None:
    """For a prefix with no manifest: what s3xfer's own objects among `paths` (relative to
    the URL's prefix) say is there, as the message of NotFinalizedError; None when there are
    none (a plain prefix). A lease alone is no upload: it is left by one that wrote nothing."""
    own = [p for p in paths if is_reserved_path(p) and p != LEASE_NAME]
    if any(p.startswith(SLICES_DIR) for p in own):
        return (
            f"{url} holds a sliced upload that is not finalized (slice results under "
            f"{url}/{SLICES_DIR}, no manifest yet): run `s3xfer finalize --plan PLAN` once "
            "every slice has run"
        )
    if own:
        return (
            f"{url} holds an s3xfer upload that has not finished (its objects are under "
            f"{url}/{META_DIR}/, no manifest yet): run the upload again to finish it (`s3xfer "
            "finalize --plan PLAN` if it was sliced)"
        )
    return None
