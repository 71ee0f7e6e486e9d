"""Frozen, validated settings, the S3 limits as named constants, and size parsing."""

from __future__ import annotations

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

DEFAULT_CONCURRENCY = 32
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


@dataclass(frozen=True, slots=True)
class TransferConfig:
    """How an upload is shaped and bounded. Validated on construction."""

    concurrency: int = DEFAULT_CONCURRENCY
    max_memory: int = DEFAULT_MAX_MEMORY
    part_size: int = DEFAULT_PART_SIZE
    multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD
    key_prefix: str = "none"  # "none" | "hash"
    pack: bool = True
    pack_threshold: int = DEFAULT_PACK_THRESHOLD
    shard_size: int = DEFAULT_SHARD_SIZE
    max_attempts: int = 10  # as s5cmd and rclone: throttling can last a while
    prices: PriceTable = field(default_factory=PriceTable)

    def __post_init__(self) -> None:
        if not 1 <= self.concurrency <= 1024:
            raise UsageError(f"concurrency must be between 1 and 1024, got {self.concurrency}")
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
        if not 1 <= self.max_attempts <= 100:
            raise UsageError("max attempts must be between 1 and 100")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["prices"] = self.prices.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TransferConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "prices" in known:
            known["prices"] = PriceTable.from_json(known["prices"])
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
