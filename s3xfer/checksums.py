"""CRC32 as S3 wants it: base64 of the big-endian value, and combination of part CRCs.

The only module that imports isal: ISA-L's CRC32 gives zlib's values at about 65 GB/s (a
folding implementation on the CPU's carry-less multiply) where zlib 1.2 manages 7. At zlib's
speed the checksum alone was a sixth of the CPU a download of large files takes.

S3's full-object CRC32 of a multipart upload is the CRC of the whole byte stream. Parts are
read in any order, so the whole-object value is combined from the part values (crc32_combine)
instead of re-reading the file.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable

from isal import isal_zlib

crc32 = isal_zlib.crc32  # crc32(data, value=0): zlib.crc32, faster; releases the GIL


def crc32_to_base64(value: int) -> str:
    return base64.b64encode(value.to_bytes(4, "big")).decode("ascii")


def crc32_from_base64(text: str) -> int:
    raw = base64.b64decode(text, validate=True)
    if len(raw) != 4:
        raise ValueError(f"not a base64 CRC32: {text!r}")
    return int.from_bytes(raw, "big")


def crc32_combine(crc_a: int, crc_b: int, length_b: int) -> int:
    """CRC32 of A+B from crc32(A), crc32(B) and len(B)."""
    return isal_zlib.crc32_combine(crc_a, crc_b, length_b)


def combine_parts(parts: Iterable[tuple[int, int]]) -> int:
    """Whole-stream CRC32 from (crc32, length) of consecutive parts."""
    total = 0
    for value, length in parts:
        total = crc32_combine(total, value, length)
    return total
