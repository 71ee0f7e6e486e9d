"""Per-file coding (zstd, AES-256-GCM, frames): round trips, ranges, and every tampering refused."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from s3xfer.dataset.coding import (
    FRAME_SIZE,
    IDENTITY,
    SEAL_OVERHEAD,
    Coding,
    Compression,
    Encryption,
    FrameKey,
    WrappedKey,
    coded_size,
    decode,
    decode_range,
    encode,
    encode_frames,
    frame_count,
    new_data_key,
    stored_size,
    stored_span,
    unwrap,
    worth_compressing,
)
from s3xfer.errors import BadValue, EncryptionKeyError, IntegrityError

KEY = FrameKey(bytes(range(32)), bytes(16))
ZSTD = Coding(Compression.ZSTD)
AES = Coding(encryption=Encryption.AES_256_GCM)
BOTH = Coding(Compression.ZSTD, Encryption.AES_256_GCM)
ALL = [IDENTITY, ZSTD, AES, BOTH]

# sizes around frame boundaries, small enough to keep the tests fast
sizes = st.one_of(
    st.integers(0, 3000),
    st.sampled_from(
        [FRAME_SIZE - 1, FRAME_SIZE, FRAME_SIZE + 1, 2 * FRAME_SIZE, 2 * FRAME_SIZE + 7]
    ),
)


def content(size: int, seed: int) -> bytes:
    """Half compressible text, half random, so both zstd paths run."""
    text = (b"line %d of a compressible file\n" % seed) * (size // 60 + 1)
    return (text[: size // 2] + os.urandom(size - size // 2))[:size]


@pytest.mark.parametrize("coding", ALL, ids=lambda c: c.to_json() or "identity")
@settings(max_examples=15, deadline=None)
@given(size=sizes, seed=st.integers(0, 100))
def test_round_trip_and_sizes(coding: Coding, size: int, seed: int) -> None:
    data = content(size, seed)
    stored = encode(data, coding=coding, path="a/b.txt", key=KEY)
    assert decode(stored, coding=coding, path="a/b.txt", size=size, key=KEY) == data
    assert coded_size(data, coding=coding) == len(stored)
    fixed = stored_size(size, coding)
    assert fixed is None if coding.compressed else fixed == len(stored)
    if coding.encrypted:
        assert data[:64] not in stored or size < 16


@settings(max_examples=40, deadline=None)
@given(data=st.data(), size=sizes)
def test_any_range_of_an_encrypted_file_reads_from_its_frames(
    data: st.DataObject, size: int
) -> None:
    plain = os.urandom(size)
    stored = encode(plain, coding=AES, path="p", key=KEY)
    start = data.draw(st.integers(0, size))
    end = data.draw(st.integers(start, size))
    span = stored_span(start, end, size=size, stored=len(stored), coding=AES)
    # the span is whole frames: it starts on a frame and holds at most one partial frame, the last
    assert span.start % (FRAME_SIZE + SEAL_OVERHEAD) == 0
    assert span.end - span.start <= (end - start + 2 * FRAME_SIZE) + 3 * SEAL_OVERHEAD
    got = decode_range(
        stored[span.start : span.end],
        span,
        start=start,
        end=end,
        coding=AES,
        path="p",
        size=size,
        key=KEY,
    )
    assert got == plain[start:end]


def test_a_range_of_a_compressed_file_reads_it_whole() -> None:
    plain = b"x" * 5000
    stored = encode(plain, coding=BOTH, path="p", key=KEY)
    span = stored_span(100, 200, size=5000, stored=len(stored), coding=BOTH)
    assert (span.start, span.end, span.skip) == (0, len(stored), 100)
    got = decode_range(stored, span, start=100, end=200, coding=BOTH, path="p", size=5000, key=KEY)
    assert got == plain[100:200]


def test_frames_coded_apart_join_to_the_whole_file() -> None:
    """The engine codes a multipart file part by part: frames `first_frame` onwards."""
    plain = os.urandom(3 * FRAME_SIZE + 5)
    first = b"".join(
        encode_frames(plain[: 2 * FRAME_SIZE], coding=AES, path="p", key=KEY, final=False)
    )
    rest = b"".join(
        encode_frames(plain[2 * FRAME_SIZE :], coding=AES, path="p", key=KEY, first_frame=2)
    )
    assert decode(first + rest, coding=AES, path="p", size=len(plain), key=KEY) == plain
    with pytest.raises(BadValue):
        list(encode_frames(b"abc", coding=AES, path="p", key=KEY, final=False))


@pytest.mark.parametrize("coding", [ZSTD, AES, BOTH], ids=lambda c: c.to_json())
def test_a_changed_byte_anywhere_is_refused(coding: Coding) -> None:
    plain = b"some text that compresses well " * 40
    stored = encode(plain, coding=coding, path="p", key=KEY)
    # zstd alone has no checksum here (the CRC32 of the original catches what it lets through):
    # every byte of an encrypted file, and the length and header of a compressed one, is checked
    positions = range(len(stored)) if coding.encrypted else range(8)
    for at in positions:
        changed = bytearray(stored)
        changed[at] ^= 0x01
        try:
            got = decode(bytes(changed), coding=coding, path="p", size=len(plain), key=KEY)
        except IntegrityError:
            continue
        assert not coding.encrypted, f"byte {at} changed and still decrypted"
        assert got != plain or at >= 4


@pytest.mark.parametrize("coding", [AES, BOTH], ids=lambda c: c.to_json())
def test_a_frame_of_another_file_or_place_is_refused(coding: Coding) -> None:
    a = encode(b"A" * 100, coding=coding, path="a.txt", key=KEY)
    with pytest.raises(IntegrityError, match=r"b\.txt: stored frame 0 fails authentication"):
        decode(a, coding=coding, path="b.txt", size=100, key=KEY)
    other_dataset = FrameKey(KEY.key, b"\x01" * 16)
    with pytest.raises(IntegrityError):
        decode(a, coding=coding, path="a.txt", size=100, key=other_dataset)
    # frames swapped within one file
    plain = os.urandom(2 * FRAME_SIZE)
    frames = list(encode_frames(plain, coding=coding, path="p", key=KEY))
    with pytest.raises(IntegrityError):
        decode(frames[1] + frames[0], coding=coding, path="p", size=len(plain), key=KEY)


def test_a_file_cut_at_a_frame_boundary_is_refused() -> None:
    plain = os.urandom(2 * FRAME_SIZE)
    stored = encode(plain, coding=AES, path="p", key=KEY)
    first_frame = stored[: FRAME_SIZE + SEAL_OVERHEAD]
    # read as a file of one frame: the frame was sealed as "not the last"
    with pytest.raises(IntegrityError, match="fails authentication"):
        decode(first_frame, coding=AES, path="p", size=FRAME_SIZE, key=KEY)
    with pytest.raises(IntegrityError, match="cut short"):
        decode(first_frame, coding=AES, path="p", size=len(plain), key=KEY)
    with pytest.raises(IntegrityError, match="cut short"):
        decode(b"", coding=BOTH, path="p", size=0, key=KEY)


def test_a_compressed_frame_that_inflates_beyond_its_size_is_refused() -> None:
    bomb = encode(b"\0" * FRAME_SIZE, coding=ZSTD, path="p", key=None)
    with pytest.raises(IntegrityError, match="holds"):
        decode(bomb, coding=ZSTD, path="p", size=10, key=None)
    garbage = struct.pack(">I", 5) + b"hello"
    with pytest.raises(IntegrityError, match="does not decompress"):
        decode(garbage, coding=ZSTD, path="p", size=5, key=None)


def test_no_key_is_a_clear_error() -> None:
    stored = encode(b"abc", coding=AES, path="p", key=KEY)
    with pytest.raises(EncryptionKeyError, match="give the dataset's --encryption-key"):
        decode(stored, coding=AES, path="p", size=3, key=None)


def test_coding_names_round_trip_and_unknown_ones_are_refused() -> None:
    assert [c.to_json() for c in ALL] == ["", "zstd", "aes-256-gcm", "zstd+aes-256-gcm"]
    for coding in ALL:
        assert Coding.from_json(coding.to_json()) == coding
    for bad in ["gzip", "aes-256-gcm+zstd", "zstd+", "zstd+zstd", 3, "none"]:
        with pytest.raises(BadValue):
            Coding.from_json(bad)


def test_frame_count() -> None:
    assert [frame_count(n) for n in (0, 1, FRAME_SIZE, FRAME_SIZE + 1)] == [1, 1, 1, 2]
    assert stored_size(0, AES) == SEAL_OVERHEAD


def test_auto_compresses_text_and_not_random_bytes() -> None:
    assert worth_compressing(b'{"id": 1, "name": "text"}\n' * 2000)
    assert not worth_compressing(os.urandom(65536))
    assert not worth_compressing(b"")


def test_the_data_key_opens_only_with_the_user_key() -> None:
    user_key = os.urandom(32)
    frame_key, wrapped = new_data_key(user_key)
    record = WrappedKey.from_bytes(wrapped.to_bytes())
    assert unwrap(record, user_key) == frame_key
    assert frame_key.key.hex() not in repr(frame_key)
    assert frame_key.key not in wrapped.to_bytes() and user_key not in wrapped.to_bytes()
    with pytest.raises(EncryptionKeyError, match="wrong encryption key"):
        unwrap(record, os.urandom(32))
    with pytest.raises(EncryptionKeyError, match="must be 32 bytes"):
        unwrap(record, b"short")
    for bad in [b"{}", b"not json", wrapped.to_bytes().replace(b'"version": 1', b'"version": 9')]:
        with pytest.raises(BadValue):
            WrappedKey.from_bytes(bad)


def test_bytes_after_the_last_frame_are_refused() -> None:
    stored = encode(b"abc", coding=AES, path="p", key=KEY)
    with pytest.raises(IntegrityError, match="follows the file's end"):
        decode(stored + b"\0", coding=AES, path="p", size=3, key=KEY)


def test_a_frame_coded_twice_is_the_same_bytes_and_nonces_never_repeat() -> None:
    """Two parts of a shard each code the member their boundary splits: the halves must come
    from one ciphertext. Any difference (content, path, place, dataset) changes the nonce."""
    plain = os.urandom(1000)
    a = encode(plain, coding=AES, path="p", key=KEY)
    assert encode(plain, coding=AES, path="p", key=KEY) == a
    others = [
        encode(plain[:-1] + bytes([plain[-1] ^ 1]), coding=AES, path="p", key=KEY),
        encode(plain, coding=AES, path="q", key=KEY),
        encode(plain, coding=AES, path="p", key=FrameKey(KEY.key, b"\x02" * 16)),
        encode(plain, coding=BOTH, path="p", key=KEY)[4:],
    ]
    nonces = {a[:12]} | {other[:12] for other in others}
    assert len(nonces) == 5


def test_an_empty_range_at_the_end_of_a_file_of_whole_frames() -> None:
    """Found by Hypothesis: [size, size) of a file of exactly two frames."""
    plain = os.urandom(2 * FRAME_SIZE)
    stored = encode(plain, coding=AES, path="p", key=KEY)
    size = len(plain)
    span = stored_span(size, size, size=size, stored=len(stored), coding=AES)
    got = decode_range(
        stored[span.start : span.end], span, start=size, end=size, coding=AES, path="p",
        size=size, key=KEY,
    )  # fmt: skip
    assert got == b""
