"""The only module that talks to S3 (aiobotocore, plus lean single PUTs over aiohttp and lean
GETs in worker threads): one client per run, errors translated here, and the options every
request carries (expected bucket owner, server-side encryption) added here.

aiobotocore and aiohttp are imported, and the client made, only when a request needs them:
together they cost about 0.3 s of start-up, which a download served by the lean paths (given
an endpoint and credentials in the environment) never pays.

Every botocore / aiohttp exception is mapped, in `_translate`, to s3xfer's own: permanent
failures to RemoteError subclasses with a readable message, and retryable ones to
TransientError. botocore's own retries are off so that retries are counted and bounded in
one place (retry.py).
"""

from __future__ import annotations

import asyncio
import datetime
import io
import math
import os
import re
import ssl
import sys
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import anyio
import botocore.exceptions as bx

from . import rawhttp, sigv4
from .errors import (
    AccessDeniedError,
    EndpointError,
    IntegrityError,
    NoSuchBucketError,
    NoSuchKeyError,
    NoSuchUploadError,
    RemoteError,
    S3XferError,
    UsageError,
)
from .retry import TransientError
from .throttle import AdaptiveGate

if TYPE_CHECKING:
    import aiohttp
    from aiobotocore.session import AioSession
    from botocore.model import OperationModel
    from types_aiobotocore_s3 import S3Client

_THROTTLE_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "503",
}
_TRANSIENT_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "RequestTimeout",
    "500",
    "502",
    "504",
    "RequestTimeTooSkewed",
    "OperationAborted",
}
_DENIED_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "403",
    "InvalidToken",
    "ExpiredToken",
    "AllAccessDisabled",
}

MAX_DELETE_KEYS = 1000  # S3's limit per DeleteObjects request
_READ_OPERATIONS = frozenset(
    {
        "check_bucket",
        "get_object",
        "head_object",
        "list_objects",
        "list_multipart_uploads",
        "list_parts",
    }
)

SSE_ALGORITHMS = ("AES256", "aws:kms")
_ACCOUNT_ID = re.compile(r"[0-9]{12}")


@dataclass(frozen=True, slots=True)
class ObjectLayout:
    part_size: int  # of its multipart upload (part 1's length); 0 when not known
    crc32: str | None  # base64 whole-object CRC32 (ChecksumType FULL_OBJECT), when S3 keeps one


class _SharedBytesIO(io.BytesIO):
    """A body for botocore that never copies the bytes it wraps.

    botocore turns a bytes body into io.BytesIO, and aiohttp then calls getbuffer() on it,
    which makes BytesIO copy its (until then shared) buffer: one more full copy of every part
    in flight. Exporting the original bytes instead keeps memory at the budget.
    """

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self._shared = data

    def getbuffer(self) -> memoryview:
        return memoryview(self._shared)


class _WatchedBody(_SharedBytesIO):
    """A large request body that pushes back a deadline each time it is read: aiohttp reads
    the next chunk only once the socket took the previous one, so no read for `timeout`
    means the far end has stopped taking the body (a write that hangs, which no read timeout
    notices). Once it is all read, the response's read timeout takes over.

    A deadline on a cancel scope rather than a watchdog task: a task's closure over the body
    made a reference cycle that kept every part's bytes alive until the next GC pass."""

    def __init__(self, data: bytes, scope: anyio.CancelScope, timeout: float) -> None:
        super().__init__(data)
        self._scope = scope
        self._timeout = timeout

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        self._scope.deadline = anyio.current_time() + self._timeout if chunk else math.inf
        return chunk


@dataclass(frozen=True, slots=True)
class Connection:
    """Where and how to connect. Credentials come from the usual AWS chain unless given here
    (they are then kept out of repr, and so out of logs and reports)."""

    endpoint_url: str | None = None
    profile: str | None = None
    region: str | None = None
    verify_ssl: bool = True
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    # Server-side encryption of the objects written (PutObject, CreateMultipartUpload).
    sse: str | None = None
    sse_kms_key_id: str | None = None
    # Every request then fails (403) unless the bucket belongs to this account: a bucket name
    # deleted and re-created by someone else does not silently receive the data.
    expected_bucket_owner: str | None = None
    # A request whose response makes no progress for this long is cut and retried.
    stall_timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.endpoint_url is not None:
            parts = urlsplit(self.endpoint_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise UsageError(
                    f"bad endpoint URL {self.endpoint_url!r} (expected http(s)://host[:port])"
                )
        if self.sse is not None and self.sse not in SSE_ALGORITHMS:
            raise UsageError(
                f"unknown server-side encryption {self.sse!r} (use {' or '.join(SSE_ALGORITHMS)})"
            )
        if self.sse_kms_key_id and self.sse != "aws:kms":
            raise UsageError("a KMS key id needs server-side encryption aws:kms (--sse aws:kms)")
        owner = self.expected_bucket_owner
        if owner is not None and not _ACCOUNT_ID.fullmatch(owner):
            raise UsageError(f"expected bucket owner must be a 12-digit AWS account id: {owner!r}")


# Accepts or refuses (by raising) a GET's answer before its body: status, Content-Range,
# Content-Length (-1 when not given).
BodyCheck = Callable[[int, str | None, int], None]


class UnreachableError(TransientError):
    """The connection could not even be opened (refused, no route, DNS, connect timeout)."""


def _where(bucket: str, key: str | None, byte_range: str | None) -> str:
    where = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    return f"{where} ({byte_range})" if byte_range else where


def _translate(
    exc: BaseException, *, bucket: str, key: str | None, byte_range: str | None
) -> Exception | None:
    where = _where(bucket, key, byte_range)
    if isinstance(exc, bx.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        message = error.get("Message") or code
        if code == "NoSuchBucket":
            return NoSuchBucketError(f"no such bucket: s3://{bucket}")
        if code == "NoSuchUpload":
            return NoSuchUploadError(
                f"no such multipart upload: {where}: aborted, completed, or never created"
            )
        if code in ("NoSuchKey", "404", "NotFound") and key:
            return NoSuchKeyError(f"no such object: {where}")
        if code in ("404", "NotFound"):
            return NoSuchBucketError(f"no such bucket: s3://{bucket}")
        if code in ("PreconditionFailed", "412") or status == 412:
            return IntegrityError(
                f"{where} was replaced after it was catalogued (ETag no longer matches)"
            )
        if code in _THROTTLE_CODES or status == 503:
            return TransientError(f"throttled ({code}) on {where}", throttled=True)
        if code in _TRANSIENT_CODES or status >= 500:
            return TransientError(f"server error {code or status} on {where}: {message}")
        if code in _DENIED_CODES:
            return AccessDeniedError(
                f"access denied to {where}: {code} (check the credentials and their permissions)"
            )
        return RemoteError(f"{code or status} on {where}: {message}")
    if isinstance(exc, bx.FlexibleChecksumError):
        return IntegrityError(f"{where}: the body does not match the checksum S3 stored: {exc}")
    if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
        return AccessDeniedError(
            "no AWS credentials found: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
            "use --profile, or configure ~/.aws/credentials"
        )
    if isinstance(exc, bx.ProfileNotFound):
        return UsageError(f"no such AWS profile: {exc.kwargs.get('profile')}")
    if isinstance(exc, bx.EndpointConnectionError | bx.ConnectTimeoutError):
        return UnreachableError(f"cannot reach the endpoint for {where}: {exc}")
    if isinstance(exc, rawhttp.ConnectError) and isinstance(
        exc.__cause__, ssl.SSLCertVerificationError
    ):
        return EndpointError(
            f"TLS certificate verification failed for {where}: {exc.__cause__.verify_message} "
            "(--no-verify-ssl turns the check off, for an endpoint you trust)"
        )
    loaded = sys.modules.get("aiohttp")  # no aiohttp error can happen before it is imported
    if isinstance(exc, rawhttp.ConnectError) or (
        loaded is not None and isinstance(exc, loaded.ClientConnectorError)
    ):
        return UnreachableError(f"cannot reach the endpoint for {where}: {exc}")
    if isinstance(exc, bx.ReadTimeoutError | bx.ConnectionClosedError | bx.ResponseStreamingError):
        return TransientError(f"connection failed on {where}: {exc}")
    if isinstance(exc, bx.HTTPClientError | asyncio.TimeoutError) or (
        loaded is not None and isinstance(exc, loaded.ClientError)
    ):
        return TransientError(f"connection failed on {where}: {type(exc).__name__}: {exc}")
    if isinstance(exc, ConnectionError | ssl.SSLError):  # the threaded GETs of rawhttp.py
        return TransientError(f"connection failed on {where}: {type(exc).__name__}: {exc}")
    if isinstance(exc, bx.NoRegionError):
        return UsageError("no AWS region configured: pass --region or set AWS_DEFAULT_REGION")
    return None


def _network_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (
        TimeoutError,
        ConnectionError,
        ssl.SSLError,
        bx.BotoCoreError,
        bx.ClientError,
    )
    loaded = sys.modules.get("aiohttp")
    return (*errors, loaded.ClientError) if loaded is not None else errors


@contextmanager
def map_errors(
    bucket: str, key: str | None = None, byte_range: str | None = None
) -> Iterator[None]:
    try:
        yield
    except S3XferError:
        raise  # ours already (EndpointError is a ConnectionError too)
    except _network_errors() as exc:
        mapped = _translate(exc, bucket=bucket, key=key, byte_range=byte_range)
        if mapped is None:
            where = _where(bucket, key, byte_range)
            raise RemoteError(f"{type(exc).__name__} on {where}: {exc}") from exc
        raise mapped from exc


def _expect_bucket_owner(owner: str) -> Callable[..., None]:
    """A botocore hook giving ExpectedBucketOwner to every operation that accepts it: added
    to the client once, it cannot be forgotten by a call (or by a module using the client)."""

    def add(params: dict[str, Any], model: OperationModel, **_: Any) -> None:
        shape = model.input_shape
        if shape is not None and "ExpectedBucketOwner" in shape.members:
            params.setdefault("ExpectedBucketOwner", owner)

    return add


class S3:
    """Thin async helpers over one S3 client; every call raises only s3xfer errors.

    With expected_bucket_owner, every request carries it (botocore through a client hook, the
    lean path as a signed header). With sse, every object written is encrypted: PutObject and
    CreateMultipartUpload carry it, UploadPart must not (S3 refuses SSE-S3/KMS headers there:
    the parts inherit the upload's encryption)."""

    def __init__(
        self,
        botocore: _Botocore,
        *,
        endpoint_label: str,
        lean: _LeanPut | None = None,
        sse: str | None = None,
        sse_kms_key_id: str | None = None,
        expected_bucket_owner: str | None = None,
        gate: AdaptiveGate | None = None,
    ) -> None:
        self._botocore = botocore
        self.gate = gate
        self._answered = False  # has the endpoint ever answered (a response, even an error)?
        self.endpoint_label = endpoint_label
        self.lean = lean
        self.calls: Counter[str] = Counter()  # requests sent per operation, retries included
        # botocore parameters of the writes that create objects
        self._encryption: dict[str, Any] = {}
        # the same as headers, for the lean path: every request, and PutObject's own
        self._lean_headers: dict[str, str] = {}
        self._lean_put_headers: dict[str, str] = {}
        if sse:
            self._encryption["ServerSideEncryption"] = sse
            self._lean_put_headers["x-amz-server-side-encryption"] = sse
        if sse_kms_key_id:
            self._encryption["SSEKMSKeyId"] = sse_kms_key_id
            self._lean_put_headers["x-amz-server-side-encryption-aws-kms-key-id"] = sse_kms_key_id
        if expected_bucket_owner:
            hook = _expect_bucket_owner(expected_bucket_owner)
            botocore.on_client.append(
                lambda client: client.meta.events.register("before-parameter-build.s3", hook)
            )
            self._lean_headers["x-amz-expected-bucket-owner"] = expected_bucket_owner
        self._lean_put_headers.update(self._lean_headers)

    async def client(self) -> S3Client:
        """The botocore client (made on the first call)."""
        return await self._botocore.client()

    @property
    def requests(self) -> int:
        return sum(self.calls.values())

    @property
    def writes(self) -> int:
        """PUT-class requests: what a re-run of an unchanged upload must not send."""
        return sum(n for op, n in self.calls.items() if op not in _READ_OPERATIONS)

    @asynccontextmanager
    async def _request(
        self, operation: str, bucket: str, key: str | None = None, byte_range: str | None = None
    ) -> AsyncIterator[None]:
        """One request: counted, admitted by the adaptive gate (when there is one), its errors
        translated, and its outcome (success, or throttling) fed back to the gate."""
        self.calls[operation] += 1
        async with self.gate.slot() if self.gate is not None else nullcontext():
            try:
                with map_errors(bucket, key, byte_range):
                    yield
            except UnreachableError as error:
                # Never answered at all: a wrong endpoint, not a passing failure worth retrying.
                if not self._answered:
                    raise EndpointError(
                        f"cannot reach S3 endpoint {self.endpoint_label}"
                    ) from error
                raise
            except TransientError as error:
                if error.throttled and self.gate is not None:
                    self.gate.throttled()
                raise
            except RemoteError:
                self._answered = True
                raise
            self._answered = True
            if self.gate is not None:
                self.gate.succeeded()

    async def prepare_reads(self, bucket: str) -> None:
        """Before the first GETs of bucket. An AWS bucket (no endpoint given) is checked
        with HEAD, which tells its region, which the lean GETs need; elsewhere nothing is
        sent: the first GET fails as the check would (no such bucket, access denied, no
        endpoint), one round trip sooner."""
        if self.lean is not None and not self.lean.can_put(bucket):
            await self.check_bucket(bucket)

    async def check_bucket(self, bucket: str) -> None:
        """Fail early, with one clear line, on a missing bucket, bad credentials or no endpoint."""
        if self.lean is not None and self.lean.endpoint_url is not None:
            async with self._request("check_bucket", bucket):
                await self.lean.head_bucket(bucket, headers=self._lean_headers)
            return
        async with self._request("check_bucket", bucket):
            client = await self.client()
            response = await client.head_bucket(Bucket=bucket)
        if self.lean is not None:
            self.lean.learn_region(bucket, response.get("BucketRegion"))

    async def put_object(
        self, bucket: str, key: str, body: bytes, *, crc32: str, extra: dict[str, Any] | None = None
    ) -> str:
        if self.lean is not None and not extra and self.lean.can_put(bucket):
            async with self._request("put_object", bucket, key):
                return await self.lean.put(
                    bucket, key, body, crc32=crc32, headers=self._lean_put_headers
                )
        async with self._request("put_object", bucket, key):
            client = await self.client()
            response = await client.put_object(
                Bucket=bucket,
                Key=key,
                Body=_SharedBytesIO(body),
                ChecksumCRC32=crc32,
                **self._encryption,
                **(extra or {}),
            )
        return response.get("ETag", "")

    async def create_multipart_upload(self, bucket: str, key: str) -> str:
        async with self._request("create_multipart_upload", bucket, key):
            client = await self.client()
            response = await client.create_multipart_upload(
                Bucket=bucket,
                Key=key,
                ChecksumAlgorithm="CRC32",
                ChecksumType="FULL_OBJECT",
                **self._encryption,
            )
        return response["UploadId"]

    async def upload_part(
        self, bucket: str, key: str, *, upload_id: str, number: int, body: bytes, crc32: str
    ) -> str:
        if self.lean is not None and self.lean.can_put(bucket):
            query = {"partNumber": str(number), "uploadId": upload_id}
            async with self._request("upload_part", bucket, key, f"part {number}"):
                return await self.lean.put(
                    bucket, key, body, crc32=crc32, query=query, headers=self._lean_headers
                )
        async with self._request("upload_part", bucket, key, f"part {number}"):
            client = await self.client()
            response = await client.upload_part(
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=_SharedBytesIO(body),
                ChecksumCRC32=crc32,
            )
        return response["ETag"]

    async def complete_multipart_upload(
        self,
        bucket: str,
        key: str,
        *,
        upload_id: str,
        parts: list[tuple[int, str, str]],
        crc32: str,
    ) -> str:
        """parts: (number, etag, part crc32) in order; crc32: the full-object value."""
        async with self._request("complete_multipart_upload", bucket, key):
            client = await self.client()
            response = await client.complete_multipart_upload(
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={
                    "Parts": [
                        {"PartNumber": n, "ETag": etag, "ChecksumCRC32": c} for n, etag, c in parts
                    ]
                },
                ChecksumCRC32=crc32,
                ChecksumType="FULL_OBJECT",
            )
        return response.get("ETag", "")

    async def abort_multipart_upload(self, bucket: str, key: str, *, upload_id: str) -> None:
        async with self._request("abort_multipart_upload", bucket, key, f"upload id {upload_id}"):
            client = await self.client()
            await client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)

    async def list_multipart_uploads(
        self, bucket: str, prefix: str, *, page_size: int = 1000
    ) -> AsyncIterator[dict[str, Any]]:
        """Every incomplete multipart upload under a prefix (whoever started it), page by page:
        dicts with at least Key, UploadId and Initiated (a timezone-aware datetime).

        A page continues from NextKeyMarker and NextUploadIdMarker. SeaweedFS sends only the
        upload id marker (it pages by upload id), so a missing key marker is sent as none."""
        key_marker = upload_id_marker = ""
        while True:
            kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxUploads": page_size}
            if key_marker:
                kwargs["KeyMarker"] = key_marker
            if upload_id_marker:
                kwargs["UploadIdMarker"] = upload_id_marker
            async with self._request("list_multipart_uploads", bucket, prefix or None):
                client = await self.client()
                page = await client.list_multipart_uploads(**kwargs)
            for upload in page.get("Uploads", []):
                yield dict(upload)
            if not page.get("IsTruncated"):
                return
            markers = (page.get("NextKeyMarker") or "", page.get("NextUploadIdMarker") or "")
            if markers in ((key_marker, upload_id_marker), ("", "")):
                raise RemoteError(
                    f"the listing of incomplete uploads in {_where(bucket, prefix, None)} "
                    "does not advance (a truncated page without a new marker)"
                )
            key_marker, upload_id_marker = markers

    async def list_parts(
        self, bucket: str, key: str, *, upload_id: str, page_size: int = 1000
    ) -> list[dict[str, Any]]:
        """Every part already uploaded, sorted by PartNumber: dicts with PartNumber, Size, ETag
        and ChecksumCRC32 when the server returns it. NoSuchUploadError when the upload is gone.
        """
        parts: dict[int, dict[str, Any]] = {}
        marker = 0
        while True:
            kwargs: dict[str, Any] = {
                "Bucket": bucket,
                "Key": key,
                "UploadId": upload_id,
                "MaxParts": page_size,
            }
            if marker:
                kwargs["PartNumberMarker"] = marker
            async with self._request("list_parts", bucket, key, f"upload id {upload_id}"):
                client = await self.client()
                page = await client.list_parts(**kwargs)
            for part in page.get("Parts", []):
                parts[int(part["PartNumber"])] = dict(part)
            if not page.get("IsTruncated"):
                return [parts[number] for number in sorted(parts)]
            next_marker = int(page.get("NextPartNumberMarker") or 0)
            if next_marker <= marker:
                raise RemoteError(
                    f"the listing of parts of {_where(bucket, key, f'upload id {upload_id}')} "
                    "does not advance (a truncated page without a new marker)"
                )
            marker = next_marker

    async def get_object(self, bucket: str, key: str, *, byte_range: str | None = None) -> bytes:
        """A small object (or a range of one) whole: s3xfer's manifest, catalog and indexes."""
        body, _status, _content_range = await self.get_range(bucket, key, byte_range=byte_range)
        return body

    async def get_range(
        self,
        bucket: str,
        key: str,
        *,
        byte_range: str | None,
        if_match: str | None = None,
        verify_checksum: bool = False,
    ) -> tuple[bytes, int, str | None]:
        """One GET (of one range, or the whole object): body, HTTP status, Content-Range. On
        the lean path (in a worker thread) unless botocore must check S3's stored checksum.

        With if_match, an object replaced since its ETag was recorded is refused by S3 (412)
        instead of returning other bytes. With verify_checksum (whole objects only), botocore
        checks the body against the checksum S3 stored with it, when there is one."""
        if self.lean is not None and self.lean.can_put(bucket) and not verify_checksum:
            answer: list[Any] = [0, None]
            pieces: list[bytes] = []

            def keep_head(status: int, content_range: str | None, length: int) -> None:
                answer[:] = [status, content_range]

            async with self._request("get_object", bucket, key, byte_range):
                await self.lean.get_to(
                    bucket,
                    key,
                    byte_range=byte_range,
                    if_match=if_match,
                    on_head=keep_head,
                    sink=lambda piece: pieces.append(bytes(piece)),
                    headers=self._lean_headers,
                )
            return b"".join(pieces), int(answer[0]), answer[1]
        kwargs: dict[str, Any] = {}
        if byte_range:
            kwargs["Range"] = byte_range
        elif verify_checksum:
            kwargs["ChecksumMode"] = "ENABLED"
        if if_match:
            kwargs["IfMatch"] = if_match
        async with self._request("get_object", bucket, key, byte_range):
            client = await self.client()
            response = await client.get_object(Bucket=bucket, Key=key, **kwargs)
            async with response["Body"] as stream:
                body: bytes = await stream.read()
        status = int(response["ResponseMetadata"]["HTTPStatusCode"])
        return body, status, response.get("ContentRange")

    async def get_range_to(
        self,
        bucket: str,
        key: str,
        *,
        byte_range: str,
        if_match: str | None = None,
        on_head: BodyCheck,
        sink: rawhttp.Sink,
    ) -> int:
        """One ranged GET whose body goes to the sink (a callable given each piece, in a
        worker thread, or a buffer filled from its start) once on_head(status, Content-Range,
        Content-Length) has accepted the answer: the body length.

        On the lean path the bytes come straight from the socket (rawhttp.py); otherwise
        they are botocore's chunks. A retry must start its own sink state afresh."""
        if self.lean is not None and self.lean.can_put(bucket):
            async with self._request("get_object", bucket, key, byte_range):
                return await self.lean.get_to(
                    bucket,
                    key,
                    byte_range=byte_range,
                    if_match=if_match,
                    on_head=on_head,
                    sink=sink,
                    headers=self._lean_headers,
                )
        kwargs: dict[str, Any] = {"Range": byte_range}
        if if_match:
            kwargs["IfMatch"] = if_match
        length = 0
        async with self._request("get_object", bucket, key, byte_range):
            client = await self.client()
            response = await client.get_object(Bucket=bucket, Key=key, **kwargs)
            status = int(response["ResponseMetadata"]["HTTPStatusCode"])
            on_head(status, response.get("ContentRange"), int(response.get("ContentLength", -1)))
            async with response["Body"] as stream:
                async for chunk in stream.iter_chunks(rawhttp.PIECE_SIZE):
                    if not isinstance(sink, memoryview):
                        await anyio.to_thread.run_sync(sink, memoryview(chunk))
                    elif length + len(chunk) <= len(sink):
                        sink[length : length + len(chunk)] = chunk
                    else:
                        raise TransientError(
                            f"{_where(bucket, key, byte_range)}: more bytes answered than the "
                            f"{len(sink):,} asked for"
                        )
                    length += len(chunk)
        return length

    async def delete_objects(self, bucket: str, keys: Sequence[str]) -> list[tuple[str, str]]:
        """Delete at most 1,000 keys with one request; the keys S3 did not delete, each with
        its reason (a key that was already gone counts as deleted)."""
        if not keys:
            return []
        if len(keys) > MAX_DELETE_KEYS:
            raise ValueError(f"at most {MAX_DELETE_KEYS} keys per DeleteObjects request")
        async with self._request("delete_objects", bucket, f"{keys[0]} (+{len(keys) - 1} keys)"):
            client = await self.client()
            response = await client.delete_objects(
                Bucket=bucket,
                Delete={"Objects": [{"Key": key} for key in keys], "Quiet": True},
            )
        return [
            (str(error.get("Key", "")), f"{error.get('Code', '')}: {error.get('Message', '')}")
            for error in response.get("Errors", [])
            if error.get("Code") != "NoSuchKey"
        ]

    async def list_objects(self, bucket: str, prefix: str) -> AsyncIterator[dict[str, Any]]:
        """Every object under a prefix, page by page (1,000 keys per request)."""
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
            if token:
                kwargs["ContinuationToken"] = token
            async with self._request("list_objects", bucket, prefix or None):
                client = await self.client()
                page = await client.list_objects_v2(**kwargs)
            for item in page.get("Contents", []):
                yield dict(item)
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    async def object_layout(self, bucket: str, key: str, *, etag: str) -> ObjectLayout:
        """How an object someone else uploaded was cut, and its whole-object CRC32 when S3
        keeps one: at most two HEADs (the object, and its part 1 when the ETag says it was a
        multipart upload). Both carry If-Match, so they describe the object being fetched."""
        head = await self.head_object(bucket, key, etag=etag)
        crc32 = head.get("ChecksumCRC32") if head.get("ChecksumType") == "FULL_OBJECT" else None
        parts = etag.strip('"').rpartition("-")[2]
        part_size = 0
        if parts.isdigit() and int(parts) > 1:
            first = await self.head_object(bucket, key, etag=etag, part_number=1)
            if int(first.get("PartsCount") or 0) == int(parts):  # a server that honours it
                part_size = int(first["ContentLength"])
        return ObjectLayout(part_size=part_size, crc32=crc32)

    async def head_object(
        self, bucket: str, key: str, *, etag: str | None = None, part_number: int | None = None
    ) -> dict[str, Any]:
        """HeadObject, with the checksum S3 keeps; of the object with this ETag (If-Match),
        or of one of its parts."""
        kwargs: dict[str, Any] = {"ChecksumMode": "ENABLED"}
        if etag is not None:
            kwargs["IfMatch"] = etag
        if part_number is not None:
            kwargs["PartNumber"] = part_number
        async with self._request("head_object", bucket, key):
            client = await self.client()
            return dict(await client.head_object(Bucket=bucket, Key=key, **kwargs))


class _LeanPut:
    """Single PUTs without botocore's per-request machinery: signed by sigv4.py, sent with
    aiohttp on a pool of its own (made on the first PUT); GETs and HEADs in worker threads
    (rawhttp.py). Used only where addressing is certain (a given endpoint, or an AWS bucket
    whose region head_bucket reported); everything else goes through botocore."""

    def __init__(
        self,
        stack: AsyncExitStack,
        *,
        endpoint_url: str | None,
        region: Callable[[], str],
        credentials: Callable[[], Awaitable[sigv4.Credentials | None]],
        stall_timeout: float = 60.0,
        verify_ssl: bool = True,
        pool_size: int = 32,
    ) -> None:
        self._stack = stack
        self._http: aiohttp.ClientSession | None = None
        self.stall_timeout = stall_timeout
        self.verify_ssl = verify_ssl
        self.pool_size = pool_size
        self._raw_pools: dict[str, rawhttp.HttpPool] = {}  # by origin: GETs in worker threads
        self.endpoint_url = endpoint_url.rstrip("/") if endpoint_url else None
        self._region = region
        self.credentials = credentials
        self._regions: dict[str, str] = {}

    @property
    def region(self) -> str:
        """The signing region of the given endpoint (resolved on first use)."""
        return self._region()

    def http(self) -> aiohttp.ClientSession:
        """The aiohttp session of PUTs, made (and aiohttp imported) on the first one."""
        if self._http is None:
            import aiohttp

            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.pool_size, ssl=self.verify_ssl),
                timeout=aiohttp.ClientTimeout(sock_connect=10, sock_read=self.stall_timeout),
                skip_auto_headers=("Content-Type",),
            )
            self._stack.push_async_callback(self._http.close)
        return self._http

    def learn_region(self, bucket: str, region: str | None) -> None:
        if region:
            self._regions[bucket] = region

    def can_put(self, bucket: str) -> bool:
        # Virtual-hosted AWS URLs need a known region, and dotted names break TLS host checks.
        return self.endpoint_url is not None or (bucket in self._regions and "." not in bucket)

    def _url(self, bucket: str, key: str, query: dict[str, str]) -> tuple[str, str]:
        suffix = sigv4.quote_key(key) + sigv4.canonical_query(query)
        if self.endpoint_url is not None:
            return f"{self.endpoint_url}/{bucket}/{suffix}", self.region
        region = self._regions[bucket]
        return f"https://{bucket}.s3.{region}.amazonaws.com/{suffix}", region

    async def put(
        self,
        bucket: str,
        key: str,
        body: bytes,
        *,
        crc32: str,
        query: dict[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> str:
        """PutObject, or UploadPart when query holds partNumber and uploadId; headers (lower
        case) are sent and signed too."""
        credentials = await self.credentials()
        if credentials is None:
            raise bx.NoCredentialsError()
        url, region = self._url(bucket, key, query or {})
        signed = sigv4.sign(
            "PUT",
            url,
            {**(headers or {}), "x-amz-checksum-crc32": crc32, "content-length": str(len(body))},
            credentials=credentials,
            region=region,
            now=datetime.datetime.now(datetime.UTC),
        )
        if len(body) <= 1024 * 1024:
            return await self._send(url, body, signed)
        # Large bodies as a (non-copying) file object: aiohttp then writes them in chunks,
        # and a body the far end stops taking is cut after stall_timeout, like a response.
        with anyio.CancelScope(deadline=anyio.current_time() + self.stall_timeout) as scope:
            return await self._send(url, _WatchedBody(body, scope, self.stall_timeout), signed)
        raise TransientError(
            f"no progress sending {len(body):,} bytes for {self.stall_timeout:g} s"
        )

    async def _send(self, url: str, data: bytes | io.BytesIO, signed: dict[str, str]) -> str:
        import yarl  # loaded with aiohttp

        async with self.http().put(
            yarl.URL(url, encoded=True), data=data, headers=signed
        ) as response:
            if response.status == 200:
                await response.read()
                return response.headers.get("ETag", "")
            text = await response.text(errors="replace")
        raise _client_error(response.status, text, "PutObject")

    def _raw_pool(self, url: str) -> rawhttp.HttpPool:
        scheme, _, rest = url.partition("://")
        origin = f"{scheme}://{rest.split('/', 1)[0]}"
        pool = self._raw_pools.get(origin)
        if pool is None:
            pool = rawhttp.HttpPool(
                origin, verify_ssl=self.verify_ssl, timeout=self.stall_timeout, size=self.pool_size
            )
            self._raw_pools[origin] = pool
        return pool

    def close(self) -> None:
        for pool in self._raw_pools.values():
            pool.close()
        self._raw_pools.clear()

    async def head_bucket(self, bucket: str, *, headers: Mapping[str, str]) -> None:
        """HeadBucket in a worker thread (rawhttp.py): returns, or raises what S3 answered."""
        credentials = await self.credentials()
        if credentials is None:
            raise bx.NoCredentialsError()
        assert self.endpoint_url is not None  # AWS buckets are checked by botocore
        url = f"{self.endpoint_url}/{bucket}"
        signed = sigv4.sign(
            "HEAD",
            url,
            dict(headers),
            credentials=credentials,
            region=self.region,
            now=datetime.datetime.now(datetime.UTC),
        )
        pool = self._raw_pool(url)
        target = f"/{bucket}"
        token = rawhttp.CancelToken()
        response = await _cancellable_in_thread(
            lambda: pool.get(
                target,
                signed,
                on_head=lambda *_: None,
                sink=lambda _: None,
                cancel=token,
                method="HEAD",
            ),
            token,
        )
        if not 200 <= response.status < 300:
            raise _client_error(response.status, "", "HeadBucket")

    async def get_to(
        self,
        bucket: str,
        key: str,
        *,
        byte_range: str | None,
        if_match: str | None,
        on_head: BodyCheck,
        sink: rawhttp.Sink,
        headers: Mapping[str, str] | None = None,
    ) -> int:
        """GetObject (of one range, or whole) in a worker thread (rawhttp.py): the body
        length."""
        credentials = await self.credentials()
        if credentials is None:
            raise bx.NoCredentialsError()
        url, region = self._url(bucket, key, {})
        wanted = dict(headers or {})
        if byte_range:
            wanted["range"] = byte_range
        if if_match:
            wanted["if-match"] = if_match
        signed = sigv4.sign(
            "GET",
            url,
            wanted,
            credentials=credentials,
            region=region,
            now=datetime.datetime.now(datetime.UTC),
        )
        pool = self._raw_pool(url)
        target = "/" + url.split("://", 1)[1].split("/", 1)[1]
        token = rawhttp.CancelToken()

        def check(status: int, answered: Mapping[str, str]) -> None:
            on_head(status, answered.get("content-range"), int(answered.get("content-length", -1)))

        response = await _cancellable_in_thread(
            lambda: pool.get(target, signed, on_head=check, sink=sink, cancel=token), token
        )
        if 200 <= response.status < 300:
            return response.length
        raise _client_error(response.status, response.error_text, "GetObject")


async def _cancellable_in_thread(
    call: Callable[[], rawhttp.Response], token: rawhttp.CancelToken
) -> rawhttp.Response:
    """Run a blocking GET in a worker thread. When the caller is cancelled, the GET's socket is
    shut down and a GET already started is waited for (it ends at once): it must not outlive
    the file it writes to. One not started yet never starts: anyio drops it, and were it
    picked up anyway, the cancelled token stops it before it sends anything."""
    started = threading.Event()
    finished = threading.Event()

    def run() -> rawhttp.Response:
        started.set()
        try:
            return call()
        finally:
            finished.set()

    try:
        return await anyio.to_thread.run_sync(run, abandon_on_cancel=True)
    except anyio.get_cancelled_exc_class():
        token.cancel()
        if started.is_set():
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(finished.wait)
        raise


def _client_error(status: int, text: str, operation: str) -> bx.ClientError:
    """An S3 XML error body as botocore's ClientError, so one mapping serves both paths."""
    code = re.search(r"<Code>([^<]*)</Code>", text)
    message = re.search(r"<Message>([^<]*)</Message>", text)
    error: Any = {
        "Error": {
            "Code": code.group(1) if code else str(status),
            "Message": message.group(1) if message else text[:200],
        },
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return bx.ClientError(error, operation)


class _Botocore:
    """aiobotocore's session and S3 client, made on first use: importing them and loading
    S3's service model cost about 0.3 s, which a run served by the lean paths skips."""

    def __init__(self, connection: Connection, stack: AsyncExitStack, *, pool: int) -> None:
        self.connection = connection
        self.stack = stack
        self.pool = pool
        self.on_client: list[Callable[[S3Client], None]] = []  # run once on the new client
        self._session: AioSession | None = None
        self._client: S3Client | None = None
        self._region: str | None = None
        self._lock = anyio.Lock()

    def session(self) -> AioSession:
        if self._session is None:
            from aiobotocore.session import AioSession

            self._session = AioSession(profile=self.connection.profile)
        return self._session

    async def client(self) -> S3Client:
        if self._client is not None:
            return self._client
        async with self._lock:
            if self._client is None:
                self._client = await self._create()
        return self._client

    async def _create(self) -> S3Client:
        from aiobotocore.config import AioConfig

        connection = self.connection
        config = AioConfig(
            max_pool_connections=self.pool,
            retries={"total_max_attempts": 1},  # retry.py owns retries
            parameter_validation=False,
            connect_timeout=10,
            read_timeout=connection.stall_timeout,
            # We send our own CRC32 values; no second pass over the bytes by botocore.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path"} if connection.endpoint_url else None,
        )
        try:
            client: S3Client = await self.stack.enter_async_context(
                self.session().create_client(
                    "s3",
                    endpoint_url=connection.endpoint_url,
                    region_name=connection.region,
                    verify=connection.verify_ssl,
                    aws_access_key_id=connection.access_key,
                    aws_secret_access_key=connection.secret_key,
                    config=config,
                )
            )
        except bx.ProfileNotFound as exc:
            raise UsageError(f"no such AWS profile: {connection.profile}") from exc
        except ValueError as exc:
            raise UsageError(f"bad endpoint URL {connection.endpoint_url!r}: {exc}") from exc
        for hook in self.on_client:
            hook(client)
        return client

    def region(self) -> str:
        """The region to sign for, as botocore would resolve it: given, else the environment,
        else the profile's configuration, else us-east-1 (resolved once)."""
        if self._region is None:
            self._region = (
                self.connection.region
                or os.environ.get("AWS_DEFAULT_REGION")
                or self.session().get_config_variable("region")
                or "us-east-1"
            )
        return self._region

    async def credentials(self) -> sigv4.Credentials | None:
        """The credentials of the lean paths: given, else the environment's (as botocore's
        chain, which reads them first unless a profile is named), else botocore's chain."""
        connection = self.connection
        if connection.access_key and connection.secret_key:
            return sigv4.Credentials(connection.access_key, connection.secret_key)
        access_key = os.environ.get("AWS_ACCESS_KEY_ID")
        secret_key = os.environ.get("AWS_SECRET_ACCESS_KEY")
        if connection.profile is None and access_key and secret_key:
            return sigv4.Credentials(access_key, secret_key, os.environ.get("AWS_SESSION_TOKEN"))
        try:
            source = await self.session().get_credentials()
        except bx.ProfileNotFound as exc:
            raise UsageError(f"no such AWS profile: {connection.profile}") from exc
        if source is None:
            return None
        frozen = await source.get_frozen_credentials()  # refreshed when near expiry
        if not frozen.access_key or not frozen.secret_key:
            return None
        return sigv4.Credentials(frozen.access_key, frozen.secret_key, frozen.token)


@asynccontextmanager
async def open_s3(
    connection: Connection, *, max_pool_connections: int = 32, adaptive: bool = True
) -> AsyncIterator[S3]:
    """One client for the whole run, its pool sized to the requests allowed in flight.

    `adaptive`: requests in flight follow an AIMD window (throttle.py), lowered when S3
    answers SlowDown; off for measurements that must hold a concurrency (bench)."""
    endpoint = connection.endpoint_url
    with map_errors("-"):
        async with AsyncExitStack() as stack:
            botocore = _Botocore(connection, stack, pool=max_pool_connections)
            lean = _LeanPut(
                stack,
                endpoint_url=endpoint,
                region=botocore.region,
                credentials=botocore.credentials,
                stall_timeout=connection.stall_timeout,
                verify_ssl=connection.verify_ssl,
                pool_size=max_pool_connections,
            )
            stack.callback(lean.close)
            yield S3(
                botocore,
                endpoint_label=endpoint or "AWS S3",
                lean=lean,
                sse=connection.sse,
                sse_kms_key_id=connection.sse_kms_key_id,
                expected_bucket_owner=connection.expected_bucket_owner,
                gate=AdaptiveGate(max_pool_connections) if adaptive else None,
            )
