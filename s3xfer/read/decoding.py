"""Reading coded files (docs/format.md, "Coded files"): the dataset's data key, unwrapped once
with the user's key when the first encrypted file is read, and each file's stored bytes
decoded back to the original (whose CRC32 the caller then checks)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

import anyio

from ..dataset.coding import (
    Coding,
    FrameKey,
    StoredSpan,
    decode_range,
    frame_count,
    parse_key_record,
    stored_span,
    unwrap,
)
from ..dataset.keys import S3Url, data_key_record_key
from ..errors import EncryptionKeyError, IntegrityError, NoSuchKeyError
from ..transport.retry import RetryPolicy, call_with_retries
from ..transport.s3 import S3
from .ranges import RangeGet, check_ranged_response

DECODE_IN_THREAD = 256 * 1024  # stored bytes above which decoding leaves the event loop


class CodedFile(Protocol):
    """What decoding needs of a file (a ManifestRecord, a download's Item)."""

    @property
    def path(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def coding(self) -> str: ...
    @property
    def stored(self) -> int: ...


class RecordDecoder:
    """Decodes the records of one dataset; the key record is read at most once."""

    def __init__(self, url: S3Url, user_key: bytes | None, *, policy: RetryPolicy) -> None:
        self.url = url
        self._user_key = user_key
        self._policy = policy
        self._frame_key: FrameKey | None = None
        self._lock = anyio.Lock()

    def __repr__(self) -> str:  # never the key
        return f"<RecordDecoder {self.url} key={'given' if self._user_key else 'none'}>"

    def check_key(self, record: CodedFile) -> None:
        """Before anything is fetched: an encrypted file needs a key (EncryptionKeyError)."""
        if record.coding and self._user_key is None and Coding.from_json(record.coding).encrypted:
            raise EncryptionKeyError(
                f"{record.path} is encrypted: give the dataset's --encryption-key to read it"
            )

    async def ready(self, s3: S3, records: Iterable[CodedFile]) -> None:
        """Before anything is fetched or written: the key of every encrypted file among
        `records` is there and is the dataset's (EncryptionKeyError if not)."""
        encrypted = [r for r in records if r.coding and Coding.from_json(r.coding).encrypted]
        if encrypted:
            self.check_key(encrypted[0])
            await self._key(s3)

    async def _key(self, s3: S3) -> FrameKey:
        async with self._lock:
            if self._frame_key is None:
                assert self._user_key is not None
                key = data_key_record_key(self.url)
                where = f"s3://{self.url.bucket}/{key}"
                try:
                    raw = await call_with_retries(
                        lambda: s3.get_object(self.url.bucket, key), policy=self._policy
                    )
                except NoSuchKeyError:
                    raise IntegrityError(
                        f"{where} is missing: the dataset's encrypted files cannot be read"
                    ) from None
                self._frame_key = unwrap(parse_key_record(raw, where=where), self._user_key)
            return self._frame_key

    async def decode(self, s3: S3, record: CodedFile, stored: bytes | memoryview) -> bytes:
        """The original bytes of a whole coded file from its stored bytes: IntegrityError
        when they do not decode to exactly `record.size` bytes."""
        if len(stored) != record.stored:
            raise IntegrityError(f"{record.path}: {len(stored)} stored bytes, not {record.stored}")
        span = StoredSpan(0, frame_count(record.size), 0, record.stored, 0)
        return await self.decode_span(s3, record, stored, span, start=0, end=record.size)

    async def decode_span(
        self,
        s3: S3,
        record: CodedFile,
        stored: bytes | memoryview,
        span: StoredSpan,
        *,
        start: int,
        end: int,
    ) -> bytes:
        """Original bytes [start, end) of a coded file from the stored bytes of `span`."""
        coding = Coding.from_json(record.coding)
        self.check_key(record)
        key = await self._key(s3) if coding.encrypted else None

        def run() -> bytes:
            return decode_range(
                stored,
                span,
                start=start,
                end=end,
                coding=coding,
                path=record.path,
                size=record.size,
                key=key,
            )

        if len(stored) > DECODE_IN_THREAD:
            return await anyio.to_thread.run_sync(run)
        return run()


class DecodingSource:
    """A RangeSource (rangedl.py) over one coded file: asked for a range of the original file,
    it fetches the frames that hold it (one ranged GET of the stored bytes, at `base` in the
    object), decodes them, and hands over exactly the asked bytes, so the ranged downloader
    works in the original file's coordinates and checks the original CRC32."""

    def __init__(self, s3: S3, decoder: RecordDecoder, record: CodedFile, *, base: int) -> None:
        self._s3 = s3
        self._decoder = decoder
        self._record = record
        self._base = base
        self.stream_piece_size = s3.stream_piece_size

    async def get_range_to(
        self,
        bucket: str,
        key: str,
        *,
        byte_range: str,
        if_match: str | None = None,
        on_head: Callable[[int, str | None, int], None],
        sink: Callable[[memoryview], None],
    ) -> int:
        record = self._record
        start, last = (int(n) for n in byte_range.removeprefix("bytes=").split("-"))
        span = stored_span(
            start,
            last + 1,
            size=record.size,
            stored=record.stored,
            coding=Coding.from_json(record.coding),
        )
        asked = RangeGet(key, self._base + span.start, self._base + span.end, ())
        body, status, content_range = await self._s3.get_range(
            bucket, key, byte_range=asked.header, if_match=if_match
        )
        check_ranged_response(
            asked,
            status=status,
            content_range=content_range,
            body_length=len(body),
            where=f"s3://{bucket}/{key}",
        )
        plain = await self._decoder.decode_span(
            self._s3, record, body, span, start=start, end=last + 1
        )
        on_head(206, f"bytes {start}-{last}/{record.size}", len(plain))
        sink(memoryview(plain))
        return len(plain)
