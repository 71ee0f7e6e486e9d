"""How a file's bytes are stored: zstd compression, then AES-256-GCM encryption, frame by frame.

Pure functions over bytes (no I/O). A file is cut into frames of `FRAME_SIZE` original bytes
(the last one shorter; an empty file is one empty frame), each coded on its own, so a byte
range of the original maps to whole frames and ranged reads stay ranged. docs/format.md
("Coded files") describes the layout; this module is its only writer and reader.

- Encryption only: a frame is `nonce (12) || ciphertext || tag (16)`, so the stored size is a
  pure function of the original size (`stored_size`) and frame `i` starts at
  `i * (FRAME_SIZE + SEAL_OVERHEAD)`.
- With compression: a frame is `length (4, big-endian) || body`, the body zstd's frame of the
  original bytes (sealed as above when encrypted). Stored sizes depend on the content, so the
  planner compresses small files once to learn theirs (`coded_size`).

A frame's nonce is derived from its bytes and place (`synthetic_nonce`), so coding a frame
twice gives the same bytes. Every sealed frame's associated data names the dataset key, the
file's path, the frame's index and whether it is the last, so a frame moved to another file
or place, or a file cut short at a frame boundary, fails to open instead of decoding to other
bytes.
"""

from __future__ import annotations

import base64
import functools
import hmac
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from ..errors import BadValue, EncryptionKeyError, IntegrityError

if TYPE_CHECKING:
    import zstandard
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MiB = 1024 * 1024
FRAME_SIZE = MiB  # original bytes per frame: a ranged read decodes at most one extra MiB each end
NONCE_SIZE = 12
TAG_SIZE = 16
SEAL_OVERHEAD = NONCE_SIZE + TAG_SIZE
LENGTH_SIZE = 4
KEY_SIZE = 32  # AES-256
# zstd's level and parameters are fixed so that the planner and the engine, compressing the
# same bytes, get the same size (a size that differs at upload is a changed file).
ZSTD_LEVEL = 3
SAMPLE_SIZE = 64 * 1024  # what `auto` compresses to decide
AUTO_MIN_SAVING = 0.1  # `auto` stores a file raw unless its sample shrinks by at least this


class Compression(StrEnum):
    NONE = "none"
    ZSTD = "zstd"


class Encryption(StrEnum):
    NONE = "none"
    AES_256_GCM = "aes-256-gcm"


@dataclass(frozen=True)
class Coding:
    """How one file is stored. The identity coding (`Coding()`) stores the bytes as they are."""

    compression: Compression = Compression.NONE
    encryption: Encryption = Encryption.NONE

    @property
    def identity(self) -> bool:
        return self.compression is Compression.NONE and self.encryption is Encryption.NONE

    @property
    def compressed(self) -> bool:
        return self.compression is not Compression.NONE

    @property
    def encrypted(self) -> bool:
        return self.encryption is not Encryption.NONE

    def to_json(self) -> str:
        """`""` for the identity, else the codings applied in order, joined by `+`."""
        steps = [str(step) for step in (self.compression, self.encryption) if step != "none"]
        return "+".join(steps)

    @classmethod
    def from_json(cls, text: Any) -> Coding:
        if not isinstance(text, str):
            raise BadValue(f"coding {text!r} is not a string")
        if text == "":
            return cls()
        compression, encryption = Compression.NONE, Encryption.NONE
        steps = text.split("+")
        if steps[0] == Compression.ZSTD:
            compression = Compression.ZSTD
            steps = steps[1:]
        if steps == [Encryption.AES_256_GCM]:
            encryption = Encryption.AES_256_GCM
        elif steps:
            raise BadValue(f"unknown coding {text!r}")
        return cls(compression, encryption)


IDENTITY = Coding()
ENCRYPTED = Coding(encryption=Encryption.AES_256_GCM)


@dataclass(frozen=True)
class FrameKey:
    """What seals a file's frames: the dataset's data key and its id (both from `DataKey`)."""

    key: bytes
    key_id: bytes

    @functools.cached_property
    def nonce_key(self) -> bytes:
        """The key of the nonces' PRF, derived from the data key (one key, one use)."""
        return hmac.digest(self.key, b"s3xfer-nonce-key/1", "sha256")

    @functools.cached_property
    def cipher(self) -> AESGCM:
        return _cipher(self.key)  # made once: every frame of a run shares it

    def __repr__(self) -> str:  # never the key itself, in a traceback or a log
        return f"FrameKey(key_id={self.key_id.hex()})"


def frame_count(size: int) -> int:
    """Frames of a file of `size` original bytes (an empty file is one empty frame)."""
    return max(1, -(-size // FRAME_SIZE))


def frame_length(size: int, index: int) -> int:
    """Original bytes in frame `index` of a file of `size` bytes."""
    return min(FRAME_SIZE, size - index * FRAME_SIZE)


def stored_size(size: int, coding: Coding) -> int | None:
    """The stored size of a file of `size` bytes when it depends on the size alone (no
    compression), else None: the planner must code the file to know it (`coded_size`)."""
    if coding.compressed:
        return None
    if coding.encrypted:
        return size + SEAL_OVERHEAD * frame_count(size)
    return size


@dataclass(frozen=True)
class StoredSpan:
    """The stored bytes holding an original range: frames `first_frame` onwards, from
    `start` to `end` (exclusive) of the stored object; `skip` original bytes of the first
    decoded frame come before the range."""

    first_frame: int
    frames: int
    start: int
    end: int
    skip: int


def stored_span(start: int, end: int, *, size: int, stored: int, coding: Coding) -> StoredSpan:
    """The stored bytes to fetch for original bytes `[start, end)` of a file of `size` bytes
    stored in `stored` bytes.

    Frames of an uncompressed coding have fixed stored sizes, so any range maps to its frames.
    A compressed file's frames do not, so any range of it maps to the whole stored file (most
    compressed files are one frame: docs/format.md says why large files are stored raw).
    """
    if not 0 <= start <= end <= size:
        raise BadValue(f"range [{start}, {end}) outside a file of {size} bytes")
    if coding.identity:
        return StoredSpan(0, 1, start, end, 0)
    if coding.compressed:
        return StoredSpan(0, frame_count(size), 0, stored, start)
    first = min(start // FRAME_SIZE, frame_count(size) - 1)  # an empty range at the end too
    last = frame_count(size) if end == size else max(-(-end // FRAME_SIZE), first + 1)
    stride = FRAME_SIZE + SEAL_OVERHEAD
    return StoredSpan(
        first, last - first, first * stride, min(last * stride, stored), start - first * FRAME_SIZE
    )


def _associated_data(key: FrameKey, path: str, index: int, *, final: bool) -> bytes:
    return b"".join(
        (
            b"s3xfer-frame/1\0",
            key.key_id,
            b"\0",
            path.encode("utf-8", "surrogateescape"),
            b"\0",
            struct.pack(">QB", index, final),
        )
    )


def synthetic_nonce(key: FrameKey, aad: bytes, body: bytes | memoryview) -> bytes:
    """A frame's nonce: HMAC-SHA256 of its associated data and its bytes under a key derived
    from the data key, cut to 12 bytes (the synthetic-IV idea of RFC 5297). Two different
    frames (in content, file, place or dataset) get different nonces but for a 2^-96 chance,
    never a repeat from a bad random source; the same frame coded twice is the same bytes,
    which a shard's parts need: two parts built in parallel each code the member their
    boundary splits, and both halves must come from one ciphertext (docs/format.md)."""
    mac = hmac.new(key.nonce_key, digestmod="sha256")
    mac.update(struct.pack(">Q", len(aad)))
    mac.update(aad)
    mac.update(body)
    return mac.digest()[:NONCE_SIZE]


# zstandard and cryptography are loaded when a file is coded, not by every command that reads
# a manifest (80 ms of imports).


def _compressor() -> zstandard.ZstdCompressor:
    import zstandard

    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True, threads=0)


def _cipher(key: bytes) -> AESGCM:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


def _opened(cipher: AESGCM, nonce: bytes, sealed: bytes | memoryview, aad: bytes) -> bytes | None:
    """AES-GCM's plaintext, or None when the tag does not match."""
    from cryptography.exceptions import InvalidTag

    try:
        return cipher.decrypt(nonce, sealed, aad)
    except InvalidTag:
        return None


def _encode_frame(
    plain: bytes | memoryview,
    *,
    coding: Coding,
    path: str,
    index: int,
    final: bool,
    key: FrameKey | None,
) -> bytes:
    body = _compressor().compress(plain) if coding.compressed else bytes(plain)
    if coding.encrypted:
        if key is None:
            raise EncryptionKeyError(f"{path}: encrypting needs the dataset's key")
        aad = _associated_data(key, path, index, final=final)
        nonce = synthetic_nonce(key, aad, body)
        body = nonce + key.cipher.encrypt(nonce, body, aad)
    if coding.compressed:
        body = struct.pack(">I", len(body)) + body
    return body


def encode_frames(
    data: bytes | bytearray | memoryview,
    *,
    coding: Coding,
    path: str,
    key: FrameKey | None,
    first_frame: int = 0,
    final: bool = True,
) -> Iterator[bytes]:
    """Code consecutive frames of a file, starting at frame `first_frame`: `data` is their
    original bytes (a whole number of frames, but for the file's last). `final` says the last
    of them is the file's last frame."""
    view = memoryview(data)
    count = max(1, -(-len(view) // FRAME_SIZE))
    if not final and len(view) % FRAME_SIZE:
        raise BadValue("only the file's last frame may be shorter than a frame")
    for n in range(count):
        plain = view[n * FRAME_SIZE : (n + 1) * FRAME_SIZE]
        yield _encode_frame(
            plain,
            coding=coding,
            path=path,
            index=first_frame + n,
            final=final and n == count - 1,
            key=key,
        )


def encode(
    data: bytes | bytearray | memoryview, *, coding: Coding, path: str, key: FrameKey | None
) -> bytes:
    """The stored bytes of a whole file."""
    if coding.identity:
        return bytes(data)
    return b"".join(encode_frames(data, coding=coding, path=path, key=key))


def _corrupt(path: str, index: int, why: str) -> IntegrityError:
    return IntegrityError(f"{path}: stored frame {index} {why}: refusing its bytes")


def _open_frame(
    body: bytes | memoryview, *, key: FrameKey, path: str, index: int, final: bool
) -> bytes:
    if len(body) < SEAL_OVERHEAD:
        raise _corrupt(path, index, "is cut short")
    nonce, sealed = bytes(body[:NONCE_SIZE]), body[NONCE_SIZE:]
    plain = _opened(key.cipher, nonce, sealed, _associated_data(key, path, index, final=final))
    if plain is None:
        raise _corrupt(path, index, "fails authentication (changed, moved or cut short)")
    return plain


def _inflate(body: bytes | memoryview, *, path: str, index: int, expected: int) -> bytes:
    import zstandard

    try:
        # max_output_size bounds what a hostile frame can make us allocate
        plain = zstandard.ZstdDecompressor().decompress(body, max_output_size=FRAME_SIZE)
    except zstandard.ZstdError as exc:
        raise _corrupt(path, index, f"does not decompress ({exc})") from None
    if len(plain) != expected:
        raise _corrupt(path, index, f"holds {len(plain)} bytes, not {expected}")
    return plain


def decode(
    stored: bytes | bytearray | memoryview,
    *,
    coding: Coding,
    path: str,
    size: int,
    key: FrameKey | None,
    first_frame: int = 0,
    frames: int | None = None,
) -> bytes:
    """The original bytes of `frames` frames (None: up to the file's end) from frame
    `first_frame` of a file of `size` original bytes, from exactly their stored bytes.

    Anything that does not decode to exactly the frames the caller expects (a changed byte, a
    frame from another file or place, a cut) raises IntegrityError; a missing key raises
    EncryptionKeyError.
    """
    if coding.identity:
        return bytes(stored)
    if coding.encrypted and key is None:
        raise EncryptionKeyError(f"{path} is encrypted: give the dataset's --encryption-key")
    view = memoryview(stored)
    total = frame_count(size)
    stop = total if frames is None else first_frame + frames
    if not 0 <= first_frame < stop <= total:
        raise BadValue(f"frames {first_frame}..{stop} outside a file of {total} frames")
    out: list[bytes | memoryview] = []
    at = 0
    for index in range(first_frame, stop):
        expected = frame_length(size, index)
        if coding.compressed:
            if len(view) - at < LENGTH_SIZE:
                raise _corrupt(path, index, "is cut short")
            (length,) = struct.unpack_from(">I", view, at)
            at += LENGTH_SIZE
        else:
            length = expected + SEAL_OVERHEAD
        if len(view) - at < length:
            raise _corrupt(path, index, "is cut short")
        body: bytes | memoryview = view[at : at + length]  # no copy: AES-GCM reads the view
        at += length
        if coding.encrypted:
            assert key is not None
            body = _open_frame(body, key=key, path=path, index=index, final=index == total - 1)
        if coding.compressed:
            body = _inflate(body, path=path, index=index, expected=expected)
        elif len(body) != expected:
            raise _corrupt(path, index, f"holds {len(body)} bytes, not {expected}")
        out.append(body)
    if at != len(view):
        raise _corrupt(path, stop, "follows the file's end")
    return bytes(out[0]) if len(out) == 1 else b"".join(out)


def decode_range(
    stored: bytes | bytearray | memoryview,
    span: StoredSpan,
    *,
    start: int,
    end: int,
    coding: Coding,
    path: str,
    size: int,
    key: FrameKey | None,
) -> bytes:
    """Original bytes `[start, end)` from the stored bytes of `span` (see `stored_span`)."""
    plain = decode(
        stored,
        coding=coding,
        path=path,
        size=size,
        key=key,
        first_frame=span.first_frame,
        frames=span.frames,
    )
    return plain[span.skip : span.skip + end - start]


def coded_size(data: bytes | bytearray | memoryview, *, coding: Coding) -> int:
    """The stored size of a file under `coding`, found by compressing it as `encode` will."""
    plain = stored_size(len(data), coding)
    if plain is not None:
        return plain
    view = memoryview(data)
    total = 0
    for n in range(frame_count(len(view))):
        body = len(_compressor().compress(view[n * FRAME_SIZE : (n + 1) * FRAME_SIZE]))
        total += LENGTH_SIZE + body + (SEAL_OVERHEAD if coding.encrypted else 0)
    return total


def worth_compressing(sample: bytes | bytearray | memoryview) -> bool:
    """`auto`'s choice from a file's first `SAMPLE_SIZE` bytes: compress unless zstd saves less
    than `AUTO_MIN_SAVING` of it (JPEG, PNG, zip and random bytes do not shrink)."""
    if not sample:
        return False
    packed = len(_compressor().compress(sample))
    return packed <= len(sample) * (1 - AUTO_MIN_SAVING)


# -- the dataset's key, wrapped by the user's --------------------------------------------------

KEYS_FORMAT = "s3xfer-keys"
KEYS_VERSION = 1
_WRAP_AAD = b"s3xfer-data-key/1\0"


@dataclass(frozen=True)
class WrappedKey:
    """The record of `<prefix>/.s3xfer/keys.json`: the dataset's data key sealed with the
    user's key (AES-256-GCM), and the data key's id (random, public)."""

    key_id: bytes
    nonce: bytes
    sealed: bytes

    def to_bytes(self) -> bytes:
        record = {
            "format": KEYS_FORMAT,
            "version": KEYS_VERSION,
            "key_id": self.key_id.hex(),
            "wrapping": "aes-256-gcm",
            "nonce": base64.b64encode(self.nonce).decode("ascii"),
            "wrapped_key": base64.b64encode(self.sealed).decode("ascii"),
        }
        return json.dumps(record, sort_keys=True).encode("ascii")

    @classmethod
    def from_bytes(cls, raw: bytes) -> WrappedKey:
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("format") != KEYS_FORMAT:
                raise BadValue("not an s3xfer keys record")
            if data.get("version") != KEYS_VERSION:
                raise BadValue(f"keys record version {data.get('version')!r} is not known")
            if data.get("wrapping") != "aes-256-gcm":
                raise BadValue(f"key wrapping {data.get('wrapping')!r} is not known")
            key_id = bytes.fromhex(data["key_id"])
            nonce = base64.b64decode(data["nonce"], validate=True)
            sealed = base64.b64decode(data["wrapped_key"], validate=True)
        except (ValueError, KeyError, TypeError) as exc:
            raise BadValue(f"keys record: {exc}") from None
        if len(key_id) != 16 or len(nonce) != NONCE_SIZE or len(sealed) != KEY_SIZE + TAG_SIZE:
            raise BadValue("keys record: a field has the wrong length")
        return cls(key_id, nonce, sealed)


def check_user_key(user_key: bytes) -> None:
    if len(user_key) != KEY_SIZE:
        raise EncryptionKeyError(
            f"the encryption key must be {KEY_SIZE} bytes (got {len(user_key)}); "
            "make one with: head -c 32 /dev/urandom > KEYFILE"
        )


def new_data_key(user_key: bytes) -> tuple[FrameKey, WrappedKey]:
    """A fresh random data key for a new dataset, and its record sealed with `user_key`."""
    check_user_key(user_key)
    frame_key = FrameKey(os.urandom(KEY_SIZE), os.urandom(16))
    nonce = os.urandom(NONCE_SIZE)
    sealed = _cipher(user_key).encrypt(nonce, frame_key.key, _WRAP_AAD + frame_key.key_id)
    return frame_key, WrappedKey(frame_key.key_id, nonce, sealed)


def unwrap(wrapped: WrappedKey, user_key: bytes) -> FrameKey:
    """The dataset's data key; a user key that did not wrap it is an EncryptionKeyError."""
    check_user_key(user_key)
    key = _opened(_cipher(user_key), wrapped.nonce, wrapped.sealed, _WRAP_AAD + wrapped.key_id)
    if key is None:
        raise EncryptionKeyError(
            "wrong encryption key: it is not the key this dataset was encrypted with"
        )
    return FrameKey(key, wrapped.key_id)


@dataclass(frozen=True)
class FileCoder:
    """One run's coding of every file it writes or reads, with the dataset's key."""

    coding: Coding
    key: FrameKey | None

    def stored_size(self, size: int) -> int:
        stored = stored_size(size, self.coding)
        if stored is None:
            raise BadValue("the stored size of a compressed file is found by compressing it")
        return stored

    def encode(self, path: str, data: bytes | bytearray | memoryview) -> bytes:
        return encode(data, coding=self.coding, path=path, key=self.key)

    def encode_part(
        self, path: str, data: bytes | bytearray | memoryview, *, offset: int, size: int
    ) -> bytes:
        """Original bytes `[offset, offset + len(data))` of a file of `size` bytes, a part of
        a multipart upload: whole frames, from a frame boundary."""
        if offset % FRAME_SIZE:
            raise BadValue(f"a coded part must start on a frame ({FRAME_SIZE} bytes)")
        frames = encode_frames(
            data,
            coding=self.coding,
            path=path,
            key=self.key,
            first_frame=offset // FRAME_SIZE,
            final=offset + len(data) == size,
        )
        return b"".join(frames)


def parse_key_record(raw: bytes, *, where: str) -> WrappedKey:
    """The keys record as read from S3; CorruptMetadataError naming `where` if malformed."""
    from .validate import corrupt

    try:
        return WrappedKey.from_bytes(raw)
    except BadValue as exc:
        raise corrupt("keys record", where, exc) from exc


class CompressMode(StrEnum):
    NONE = "none"
    ZSTD = "zstd"
    AUTO = "auto"


def choose_coding(
    data: bytes | bytearray | memoryview, *, mode: CompressMode, base: Coding
) -> Coding:
    """How a file that may be compressed is stored: `base` (its encryption) with zstd when
    `mode` says so; `auto` compresses what its first SAMPLE_SIZE bytes say shrinks, and what
    then shrinks as a whole."""
    if mode is CompressMode.NONE:
        return base
    compressed = Coding(Compression.ZSTD, base.encryption)
    if mode is CompressMode.ZSTD:
        return compressed
    if not worth_compressing(memoryview(data)[:SAMPLE_SIZE]):
        return base
    return compressed if coded_size(data, coding=compressed) < len(data) else base
