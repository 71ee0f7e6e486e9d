"""Frozen, validated settings, the S3 limits as named constants, and size parsing."""

from __future__ import annotations

import functools
import mimetypes
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import UsageError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# S3 limits (https://docs.aws.amazon.com/AmazonS3/latest/userguide/qfacts.html).
MIN_PART_SIZE = 5 * MiB
MAX_PART_SIZE = 5 * GiB
MAX_PARTS = 10_000
MAX_PUT_SIZE = 5 * GiB
MAX_OBJECT_SIZE = 5 * 1024 * GiB

# Requests in flight at once (upload and download `--concurrency`): the knob for small
# objects, one request each. Large parts and ranges are held to what the memory budget holds
# whole (8 of 16 MiB in 128 MiB), so this number is what loose small files get: over a 30 ms
# round trip, 2,000 GETs of 16 KiB took 7.3 s at 16 in flight, 4.4 s at 64, 3.0 s at 128 and
# 2.9 s at 256 (s5cmd, 256 workers: 5.2-6.6 s). It is the fixed number of `--concurrency N`
# and of the library; the CLI without --concurrency tunes it during the transfer instead
# (issue 14, transport/throttle.py): from AUTO_CONCURRENCY_START, never above the ceiling.
DEFAULT_CONCURRENCY = 128
AUTO_CONCURRENCY_START = 64
AUTO_CONCURRENCY_CEILING = 512
DEFAULT_MAX_MEMORY = 128 * MiB
DEFAULT_PART_SIZE = (
    16 * MiB
)  # measured ~5% faster than 8 MiB on loopback SeaweedFS; 8 parts per 128 MiB
DEFAULT_MULTIPART_THRESHOLD = 16 * MiB
# Files below the pack threshold go into tar shards: one PUT per ~shard instead of per file.
DEFAULT_PACK_THRESHOLD = 1 * MiB
DEFAULT_SHARD_SIZE = 256 * MiB
MAX_SHARD_MEMBERS = 100_000  # bounds the size of one shard's index


@dataclass(frozen=True, slots=True)
class PriceTable:
    """List prices in USD used for the plan's cost estimate (S3 Standard, us-east-1)."""

    put_per_1000: float = 0.005
    get_per_1000: float = 0.0004
    storage_gb_month: float = 0.023

    def to_json(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PriceTable:
        return cls(**{k: float(v) for k, v in data.items() if k in cls.__dataclass_fields__})


# Storage classes whose objects cannot be read until restored (RestoreObject, hours later):
# every ranged read of a shard, and every cat, get, download and Dataset read, would fail.
OFFLINE_STORAGE_CLASSES = ("GLACIER", "DEEP_ARCHIVE")
MAX_METADATA_BYTES = 2048  # S3's limit on user metadata: keys and values, UTF-8
_METADATA_KEY = re.compile(r"[a-z0-9][a-z0-9._-]*")
_CONTENT_TYPE = re.compile(r"[!-~]+/[!-~]+(?:[ !-~]*[!-~])?")


@functools.cache
def storage_classes() -> tuple[str, ...]:
    """The storage classes S3's API names: botocore's service model (what awscli accepts),
    read once, only when a storage class is asked for (0.3 s)."""
    from botocore.loaders import create_loader

    model = create_loader().load_service_model("s3", "service-2")
    return tuple(model["shapes"]["StorageClass"]["enum"])


@dataclass(frozen=True, slots=True)
class ObjectOptions:
    """What the objects holding file data (files' own objects and shards) carry besides their
    bytes: Content-Type, storage class, user metadata. s3xfer's own objects under .s3xfer/
    (manifest, catalog, shard indexes) carry none of them."""

    content_type: str | None = None  # --content-type: this one for every file
    guess_content_type: bool = True  # by the name's extension (mimetypes), as awscli does
    storage_class: str | None = None
    metadata: tuple[tuple[str, str], ...] = ()  # keys lower-case, as S3 keeps them

    def __post_init__(self) -> None:
        if self.content_type is not None and not (
            len(self.content_type) <= 256 and _CONTENT_TYPE.fullmatch(self.content_type)
        ):
            raise UsageError(
                f"not a content type: {self.content_type!r:.80} (expected type/subtype in "
                "printable ASCII, e.g. image/jpeg or 'text/plain; charset=utf-8')"
            )
        if self.storage_class is not None:
            check_storage_class(self.storage_class)
        seen: set[str] = set()
        for key, value in self.metadata:
            what = f"metadata {key!r:.60}"
            if not _METADATA_KEY.fullmatch(key):
                raise UsageError(
                    f"{what}: a key is lower-case letters, digits, '-', '_' and '.' (S3 keeps "
                    "x-amz-meta-* names lower-case)"
                )
            if key in seen:
                raise UsageError(f"{what} is given twice")
            seen.add(key)
            if not all(" " <= c <= "~" for c in value) or value != value.strip():
                raise UsageError(
                    f"{what}: a value is printable ASCII without leading or trailing spaces "
                    "(S3's REST API keeps nothing else intact)"
                )
        total = sum(len(k) + len(v) for k, v in self.metadata)
        if total > MAX_METADATA_BYTES:
            raise UsageError(f"metadata of {total:,} bytes: S3 allows {MAX_METADATA_BYTES:,}")

    def content_type_of(self, path: str) -> str:
        """The Content-Type a file's object is given: forced, or guessed from its name's
        extension with the standard mimetypes module as awscli does (its first answer, so
        `x.tar.gz` is application/x-tar); "" for none, when no guess can be made (S3 then
        stores its default, binary/octet-stream) or guessing is off."""
        if self.content_type is not None:
            return self.content_type
        if not self.guess_content_type:
            return ""
        return _type_of_suffix(_type_suffix(path))

    def to_json(self) -> dict[str, Any]:
        return {
            "content_type": self.content_type,
            "guess_content_type": self.guess_content_type,
            "storage_class": self.storage_class,
            "metadata": [list(pair) for pair in self.metadata],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ObjectOptions:
        metadata = data.get("metadata", [])
        if not isinstance(metadata, list) or not all(
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)
            for pair in metadata
        ):
            raise UsageError("metadata must be a list of [key, value] strings")
        content_type, storage_class = data.get("content_type"), data.get("storage_class")
        for name, value in (("content type", content_type), ("storage class", storage_class)):
            if value is not None and not isinstance(value, str):
                raise UsageError(f"{name} must be a string, got {value!r:.80}")
        return cls(
            content_type=content_type,
            guess_content_type=bool(data.get("guess_content_type", True)),
            storage_class=storage_class,
            metadata=tuple((key, value) for key, value in metadata),
        )


def _type_suffix(path: str) -> str:
    """The end of a name mimetypes.guess_type looks at: its last two extensions (the last
    may be an encoding, .gz, whose type is the one before it). Leading dots start no
    extension (`.bashrc` has none), as for guess_type."""
    name = path.rpartition("/")[2].lstrip(".")
    last = name.rfind(".")
    if last < 0:
        return ""
    before = name.rfind(".", 0, last)
    return name[before:] if before >= 0 else name[last:]


@functools.lru_cache(maxsize=4096)
def _type_of_suffix(suffix: str) -> str:
    # Once per distinct ending: guess_type took 11 us a file, a twentieth of a small PUT's
    # client CPU. "/x" roots the name, so that "data:x.jpg" is not taken for a URL.
    if not suffix:
        return ""
    return mimetypes.guess_type("/x" + suffix)[0] or ""


def check_storage_class(name: str) -> None:
    """A storage class S3 knows, and whose objects s3xfer can read back. Raises UsageError."""
    if name in OFFLINE_STORAGE_CLASSES:
        raise UsageError(
            f"storage class {name} keeps objects offline until each is restored (RestoreObject, "
            "hours), so every read of a file (cat, get, download, Dataset) would fail: use "
            "GLACIER_IR (archive prices, reads in milliseconds) or a bucket lifecycle rule"
        )
    known = storage_classes()
    if name not in known:
        raise UsageError(f"unknown storage class {name!r:.60} (S3 knows {', '.join(known)})")


def parse_metadata(items: tuple[str, ...] | list[str]) -> tuple[tuple[str, str], ...]:
    """['Key=value', ...] (--metadata) → (('key', 'value'), ...), keys lower-case as S3 keeps
    them. Raises UsageError; ObjectOptions checks the keys and values."""
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--metadata takes KEY=VALUE, got {item!r:.80}")
        pairs.append((key.lower(), value))
    return tuple(pairs)


@dataclass(frozen=True, slots=True)
class TransferConfig:
    """What an upload sends, and how it is shaped: the settings a plan is made with (and
    saved in it). Validated on construction."""

    # The memory budget parts are fitted to: no part is planned larger. How a run is bounded
    # (requests in flight, the budget it runs with, attempts) is limits.RunLimits, kept out
    # of the plan; plan files that still carry `concurrency` or `max_attempts` have them
    # ignored (from_json).
    max_memory: int = DEFAULT_MAX_MEMORY
    part_size: int = DEFAULT_PART_SIZE
    multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD
    key_prefix: str = "none"  # "none" | "hash"
    pack: bool = True
    pack_threshold: int = DEFAULT_PACK_THRESHOLD
    shard_size: int = DEFAULT_SHARD_SIZE
    prices: PriceTable = field(default_factory=PriceTable)
    objects: ObjectOptions = field(default_factory=ObjectOptions)

    def __post_init__(self) -> None:
        if not MIN_PART_SIZE <= self.part_size <= MAX_PART_SIZE:
            raise UsageError(
                f"part size must be between 5 MiB and 5 GiB, got {format_size(self.part_size)}"
            )
        if self.max_memory < MIN_PART_SIZE:
            raise UsageError(
                f"max memory must be at least 5 MiB, got {format_size(self.max_memory)}"
            )
        if not 1 <= self.multipart_threshold <= MAX_PUT_SIZE:
            raise UsageError("multipart threshold must be between 1 byte and 5 GiB")
        if self.key_prefix not in ("none", "hash"):
            raise UsageError(f"key prefix style must be 'none' or 'hash', got {self.key_prefix!r}")
        if self.pack_threshold < 0 or self.pack_threshold > self.multipart_threshold:
            raise UsageError("pack threshold must be between 0 and the multipart threshold")
        if not MIN_PART_SIZE <= self.shard_size <= MAX_PARTS * self.part_size:
            size = format_size(self.shard_size)
            raise UsageError(f"shard size must be between 5 MiB and 10,000 parts, got {size}")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["prices"] = self.prices.to_json()
        data["objects"] = self.objects.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TransferConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "prices" in known:
            known["prices"] = PriceTable.from_json(known["prices"])
        if "objects" in known:
            if not isinstance(known["objects"], dict):
                raise UsageError("objects must be an object of content type, storage class…")
            known["objects"] = ObjectOptions.from_json(known["objects"])
        return cls(**known)


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": KiB,
    "mib": MiB,
    "gib": GiB,
    "tib": 1024 * GiB,
}


def parse_size(text: str) -> int:
    """'8MiB' → 8388608, '64MB' → 64000000, '1234' → 1234. Raises UsageError."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _SIZE_UNITS:
        raise UsageError(f"not a size: {text!r} (try 8MiB, 64MB, 1GiB or a number of bytes)")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def format_size(n: float) -> str:
    """Binary units for sizes a user typed or will type: 8388608 → '8 MiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" or n == int(n) else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
