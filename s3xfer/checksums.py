"""CRC32 as S3 wants it: base64 of the big-endian value, and combination of part CRCs.

S3's full-object CRC32 of a multipart upload is the CRC of the whole byte stream. Parts are
read in any order, so the whole-object value is combined from the part values (zlib's
crc32_combine, in pure Python) instead of re-reading the file.
"""

from __future__ import annotations

import base64
import functools
import zlib
from collections.abc import Iterable, Sequence

_CRC32_POLY_REVERSED = 0xEDB88320


def crc32(data: bytes | memoryview, value: int = 0) -> int:
    return zlib.crc32(data, value)


def crc32_to_base64(value: int) -> str:
    return base64.b64encode(value.to_bytes(4, "big")).decode("ascii")


def crc32_from_base64(text: str) -> int:
    raw = base64.b64decode(text, validate=True)
    if len(raw) != 4:
        raise ValueError(f"not a base64 CRC32: {text!r}")
    return int.from_bytes(raw, "big")


def _gf2_times(matrix: Sequence[int], vector: int) -> int:
    total = 0
    row = 0
    while vector:
        if vector & 1:
            total ^= matrix[row]
        vector >>= 1
        row += 1
    return total


def _gf2_square(matrix: Sequence[int]) -> list[int]:
    return [_gf2_times(matrix, matrix[n]) for n in range(32)]


@functools.lru_cache(maxsize=512)
def _append_zeros_operator(length: int) -> tuple[int, ...]:
    """The GF(2) matrix that advances a CRC32 state over `length` zero bytes.

    Cached: the parts of an upload mostly share one length, so combining a part's CRC costs one
    32-step matrix-vector product instead of a few hundred matrix squarings.
    """
    operator = [1 << n for n in range(32)]  # identity
    odd = [_CRC32_POLY_REVERSED] + [1 << n for n in range(31)]  # one zero bit
    even = _gf2_square(odd)  # two zero bits
    odd = _gf2_square(even)  # four zero bits
    while True:
        even = _gf2_square(odd)  # one zero byte, then 4, 16, ...: one bit of length at a time
        if length & 1:
            operator = [_gf2_times(even, column) for column in operator]
        length >>= 1
        if not length:
            break
        odd = _gf2_square(even)
        if length & 1:
            operator = [_gf2_times(odd, column) for column in operator]
        length >>= 1
        if not length:
            break
    return tuple(operator)


def crc32_combine(crc_a: int, crc_b: int, length_b: int) -> int:
    """CRC32 of A+B from crc32(A), crc32(B) and len(B) (zlib's algorithm)."""
    if length_b <= 0 or crc_a == 0:  # the operator is linear: it maps 0 to 0
        return crc_a ^ crc_b if length_b > 0 else crc_a
    return _gf2_times(_append_zeros_operator(length_b), crc_a) ^ crc_b


def combine_parts(parts: Iterable[tuple[int, int]]) -> int:
    """Whole-stream CRC32 from (crc32, length) of consecutive parts."""
    total = 0
    for value, length in parts:
        total = crc32_combine(total, value, length)
    return total
