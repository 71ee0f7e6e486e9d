"""The dataset's data key for an upload that encrypts: read from `.s3xfer/keys.json`, or
made and written there once (a conditional PUT: of two writers racing, both end up with the
one key that was written)."""

from __future__ import annotations

import functools

from ..checksums import crc32, crc32_to_base64
from ..dataset.coding import FrameKey, new_data_key, parse_key_record, unwrap
from ..dataset.keys import S3Url, data_key_record_key
from ..errors import IntegrityError, NoSuchKeyError, S3XferError
from ..transport.retry import RetryPolicy, call_with_retries
from ..transport.s3 import S3

ATTEMPTS = 3  # a keys record that vanishes between a refused PUT and the GET after it


async def open_or_create_data_key(
    s3: S3, dest: S3Url, user_key: bytes, *, policy: RetryPolicy
) -> FrameKey:
    """The dataset's data key, unwrapped with `user_key` (EncryptionKeyError when it is not
    the dataset's key); a dataset without one gets a new one."""
    key = data_key_record_key(dest)
    where = f"s3://{dest.bucket}/{key}"
    for _ in range(ATTEMPTS):
        try:
            raw = await call_with_retries(lambda: s3.get_object(dest.bucket, key), policy=policy)
        except NoSuchKeyError:
            pass
        else:
            return unwrap(parse_key_record(raw, where=where), user_key)
        frame_key, wrapped = new_data_key(user_key)
        body = wrapped.to_bytes()
        try:
            await call_with_retries(
                functools.partial(
                    s3.put_object,
                    dest.bucket,
                    key,
                    body,
                    crc32=crc32_to_base64(crc32(body)),
                    if_none_match=True,
                ),
                policy=policy,
            )
        except IntegrityError:  # 412: another writer (or our own retried PUT) wrote it first
            continue
        return frame_key
    raise S3XferError(f"{where}: could not read or write the dataset's key record")
