"""Reading coded files (docs/format.md, "Coded files"): the dataset's data key, unwrapped once
with the user's key when the first encrypted file is read, and each file's stored bytes
decoded back to the original (whose CRC32 the caller then checks)."""

from __future__ import annotations

from collections.abc import Iterable

import anyio

from ..dataset.coding import Coding, FrameKey, decode, parse_key_record, unwrap
from ..dataset.keys import S3Url, data_key_record_key
from ..dataset.manifest import ManifestRecord
from ..errors import EncryptionKeyError, IntegrityError, NoSuchKeyError
from ..transport.retry import RetryPolicy, call_with_retries
from ..transport.s3 import S3

DECODE_IN_THREAD = 256 * 1024  # stored bytes above which decoding leaves the event loop


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

    def check_key(self, record: ManifestRecord) -> None:
        """Before anything is fetched: an encrypted file needs a key (EncryptionKeyError)."""
        if record.coding and self._user_key is None and Coding.from_json(record.coding).encrypted:
            raise EncryptionKeyError(
                f"{record.path} is encrypted: give the dataset's --encryption-key to read it"
            )

    async def ready(self, s3: S3, records: Iterable[ManifestRecord]) -> None:
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

    async def decode(self, s3: S3, record: ManifestRecord, stored: bytes) -> bytes:
        """The original bytes of a whole coded file from its stored bytes: IntegrityError
        when they do not decode to exactly `record.size` bytes."""
        coding = Coding.from_json(record.coding)
        self.check_key(record)
        key = await self._key(s3) if coding.encrypted else None
        if len(stored) != record.stored:
            raise IntegrityError(f"{record.path}: {len(stored)} stored bytes, not {record.stored}")

        def run() -> bytes:
            return decode(stored, coding=coding, path=record.path, size=record.size, key=key)

        if len(stored) > DECODE_IN_THREAD:
            return await anyio.to_thread.run_sync(run)
        return run()
