"""The S3 facade: every request s3xfer sends, counted, admitted by the adaptive gate, retried
by its callers, and its errors translated to s3xfer's own, with the options every request
carries (expected bucket owner, server-side encryption).

The data path (PUT, UploadPart, GET, ranged GET, HEAD) goes through the transport package
(awscrt); control requests (List, Create/Complete/Abort multipart) through aiobotocore. Both
take endpoint, credentials, CA bundle and proxies from botocore's view of the environment and
config, so they always agree. aiobotocore and aiohttp are imported, and the client made, only
when a request needs them (about 0.3 s of start-up): `session.py`.

Every exception is mapped, by `translate.py`, to s3xfer's own: permanent failures to
RemoteError subclasses with a readable message, and retryable ones to TransientError.
botocore's own retries are off so that retries are counted and bounded in one place
(retry.py).
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus

from ..checksums import crc32, crc32_to_base64
from ..errors import (
    EndpointError,
    IntegrityError,
    RemoteError,
    TransientError,
    UnreachableError,
    redact_credentials,
)
from .endpoints import Endpoints
from .http import Body, BodyCheck, Response, Sink, Transport
from .network import NetworkSettings
from .rawhttp import PIECE_SIZE
from .retry import RetryPolicy, call_with_retries
from .session import BotocoreSession, Connection, parse_timestamp
from .throttle import AdaptiveGate, TunerSettings
from .translate import client_error, location, map_errors

_LISTING_RETRIES = RetryPolicy()  # list_objects' attempts when its caller names none

if TYPE_CHECKING:
    from botocore.model import OperationModel
    from types_aiobotocore_s3 import S3Client

__all__ = (
    "S3",
    "BodyCheck",
    "Connection",
    "ObjectAttributes",
    "ObjectLayout",
    "Sink",
    "UnreachableError",
    "open_s3",
)


MAX_DELETE_KEYS = 1000  # S3's limit per DeleteObjects request
# From this size on a request's transfer, not its round trip, decides its time: the gate tunes
# such requests (parts, large ranges and objects) apart from small ones.
LARGE_REQUEST = 1024 * 1024
_RANGE = re.compile(r"bytes=(\d+)-(\d+)")


def _is_large_range(byte_range: str | None) -> bool:
    """A GET of `bytes=A-B` asks for B - A + 1 bytes; a whole object (None) counts small: the
    large ones are always read in ranges."""
    match = _RANGE.fullmatch(byte_range) if byte_range else None
    return match is not None and int(match[2]) - int(match[1]) + 1 >= LARGE_REQUEST


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


@dataclass(frozen=True, slots=True)
class ObjectLayout:
    part_size: int  # of its multipart upload (part 1's length); 0 when not known
    crc32: str | None  # base64 whole-object CRC32 (ChecksumType FULL_OBJECT), when S3 keeps one


@dataclass(frozen=True, slots=True)
class ObjectAttributes:
    """What an object holding file data carries besides its bytes: set where the object is
    created, PutObject or CreateMultipartUpload (its parts inherit them, and UploadPart takes
    none). Defined here once, as headers for the transport and as botocore's parameters."""

    content_type: str = ""  # "": none sent, S3 stores its default (binary/octet-stream)
    storage_class: str | None = None
    metadata: tuple[tuple[str, str], ...] = ()  # x-amz-meta-<key>, keys lower-case

    def headers(self) -> dict[str, str]:
        headers = {f"x-amz-meta-{key}": value for key, value in self.metadata}
        if self.content_type:
            headers["content-type"] = self.content_type
        if self.storage_class:
            headers["x-amz-storage-class"] = self.storage_class
        return headers

    def parameters(self) -> dict[str, Any]:
        parameters: dict[str, Any] = {}
        if self.metadata:
            parameters["Metadata"] = dict(self.metadata)
        if self.content_type:
            parameters["ContentType"] = self.content_type
        if self.storage_class:
            parameters["StorageClass"] = self.storage_class
        return parameters


NO_ATTRIBUTES = ObjectAttributes()


def _expect_bucket_owner(owner: str) -> Callable[..., None]:
    """A botocore hook giving ExpectedBucketOwner to every operation that accepts it: added
    to the client once, it cannot be forgotten by a call (or by a module using the client)."""

    def add(params: dict[str, Any], model: OperationModel, **_: Any) -> None:
        shape = model.input_shape
        if shape is not None and "ExpectedBucketOwner" in shape.members:
            params.setdefault("ExpectedBucketOwner", owner)

    return add


class S3:
    """Thin async helpers over the transport (data path) and one botocore client (control
    requests); every call raises only s3xfer errors.

    With expected_bucket_owner, every request carries it (botocore through a client hook, the
    transport as a signed header). With sse, every object written is encrypted: PutObject and
    CreateMultipartUpload carry it, UploadPart must not (S3 refuses SSE-S3/KMS headers there:
    the parts inherit the upload's encryption)."""

    # Bytes a GET to a sink (get_range_to) holds at a time: the receive piece of the streamed
    # GETs. Callers budget it per GET in flight.
    stream_piece_size = PIECE_SIZE

    def __init__(
        self,
        botocore: BotocoreSession,
        *,
        transport: Transport,
        endpoint_label: str,
        sse: str | None = None,
        sse_kms_key_id: str | None = None,
        expected_bucket_owner: str | None = None,
        gate: AdaptiveGate | None = None,
    ) -> None:
        self._botocore = botocore
        self.transport = transport
        self.gate = gate
        self._answered = False  # has the endpoint ever answered (a response, even an error)?
        self.endpoint_label = endpoint_label
        self.calls: Counter[str] = Counter()  # requests sent per operation, retries included
        # botocore parameters of the writes that create objects
        self._encryption: dict[str, Any] = {}
        # the same as headers, for the transport: every request, and PutObject's own
        self._headers: dict[str, str] = {}
        self._put_headers: dict[str, str] = {}
        if sse:
            self._encryption["ServerSideEncryption"] = sse
            self._put_headers["x-amz-server-side-encryption"] = sse
        if sse_kms_key_id:
            self._encryption["SSEKMSKeyId"] = sse_kms_key_id
            self._put_headers["x-amz-server-side-encryption-aws-kms-key-id"] = sse_kms_key_id
        if expected_bucket_owner:
            hook = _expect_bucket_owner(expected_bucket_owner)
            botocore.on_client.append(
                lambda client: client.meta.events.register("before-parameter-build.s3", hook)
            )
            self._headers["x-amz-expected-bucket-owner"] = expected_bucket_owner
        self._put_headers.update(self._headers)

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
        self,
        operation: str,
        bucket: str,
        key: str | None = None,
        byte_range: str | None = None,
        *,
        large: bool = False,
    ) -> AsyncIterator[None]:
        """One request: counted, admitted by the adaptive gate (when there is one), its errors
        translated, and its outcome (success, throttling, a timeout) fed back to the gate.
        `large`: a part, or an object or range of at least LARGE_REQUEST bytes, tuned apart
        from small requests (gate.summary)."""
        self.calls[operation] += 1
        gate = self.gate  # taken and given back directly: a context manager less per request
        started = 0.0
        if gate is not None:
            started = await gate.acquire(large=large)
        try:
            try:
                with map_errors(bucket, key, byte_range, profile=self._botocore.connection.profile):
                    yield
            except UnreachableError as error:
                # Never answered at all: a wrong endpoint, not a passing failure worth retrying.
                if not self._answered:
                    raise EndpointError(
                        f"cannot reach S3 endpoint {self.endpoint_label}: {error}"
                    ) from error
                raise
            except TransientError as error:
                if gate is not None:
                    if error.throttled:
                        gate.throttled(large=large)
                    elif error.timed_out:
                        gate.timed_out(large=large)
                raise
            except RemoteError:
                self._answered = True
                raise
            self._answered = True
            if gate is not None:
                gate.succeeded(started, large=large)
        finally:
            if gate is not None:
                gate.release(large=large)

    async def _send(
        self,
        operation: str,
        method: str,
        bucket: str,
        key: str | None,
        *,
        query: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        body: Body | None = None,
        on_head: BodyCheck | None = None,
        sink: Sink | None = None,
        collect: bool = False,
    ) -> Response:
        """One request on the transport: its answer when 2xx, else S3's error raised (as
        botocore's ClientError, so that one mapping serves both paths)."""
        response = await self.transport.request(
            method,
            bucket,
            key,
            query=query,
            headers={**self._headers, **(headers or {})},
            body=body,
            on_head=on_head,
            sink=sink,
            collect=collect,
        )
        if 200 <= response.status < 300:
            return response
        raise client_error(response.status, response.error_text, operation)

    async def prepare_reads(self, bucket: str) -> None:
        """Before the first GETs of bucket: nothing to send. The first GET fails as a bucket
        check would (no such bucket, access denied, no endpoint), one round trip sooner, and
        a bucket in another region is followed there by the transport."""

    async def check_bucket(self, bucket: str) -> None:
        """Fail early, with one clear line, on a missing bucket, bad credentials or no endpoint."""
        async with self._request("check_bucket", bucket):
            await self._send("HeadBucket", "HEAD", bucket, None)

    async def put_object(
        self,
        bucket: str,
        key: str,
        body: Body,
        *,
        crc32: str,
        attributes: ObjectAttributes = NO_ATTRIBUTES,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> str:
        """One object; `attributes` for one holding file data (Content-Type, storage class,
        user metadata), none for s3xfer's own objects; if_none_match / if_match make it
        conditional (a 412 is IntegrityError)."""
        conditions = {"if-none-match": "*"} if if_none_match else {}
        if if_match is not None:
            conditions["if-match"] = if_match
        async with self._request("put_object", bucket, key, large=len(body) >= LARGE_REQUEST):
            response = await self._send(
                "PutObject",
                "PUT",
                bucket,
                key,
                headers={
                    **self._put_headers,
                    **attributes.headers(),
                    "x-amz-checksum-crc32": crc32,
                    **conditions,
                },
                body=body,
            )
        return response.headers.get("etag", "")

    async def create_multipart_upload(
        self, bucket: str, key: str, *, attributes: ObjectAttributes = NO_ATTRIBUTES
    ) -> str:
        """A multipart upload, carrying the object's `attributes` (see put_object)."""
        async with self._request("create_multipart_upload", bucket, key):
            client = await self.client()
            response = await client.create_multipart_upload(
                Bucket=bucket,
                Key=key,
                ChecksumAlgorithm="CRC32",
                ChecksumType="FULL_OBJECT",
                **self._encryption,
                **attributes.parameters(),
            )
        return response["UploadId"]

    async def upload_part(
        self, bucket: str, key: str, *, upload_id: str, number: int, body: Body, crc32: str
    ) -> str:
        async with self._request("upload_part", bucket, key, f"part {number}", large=True):
            response = await self._send(
                "UploadPart",
                "PUT",
                bucket,
                key,
                query={"partNumber": str(number), "uploadId": upload_id},
                headers={"x-amz-checksum-crc32": crc32},
                body=body,
            )
        return response.headers.get("etag", "")

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
                    f"the listing of incomplete uploads in {location(bucket, prefix, None)} "
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
                    f"the listing of parts of {location(bucket, key, f'upload id {upload_id}')} "
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
        """One GET (of one range, or the whole object): body, HTTP status, Content-Range.

        With if_match, an object replaced since its ETag was recorded is refused by S3 (412)
        instead of returning other bytes. With verify_checksum (whole objects only), the body
        is checked against the checksum S3 stored with it, when there is one (what botocore's
        response checksum validation does)."""
        headers: dict[str, str] = {}
        if byte_range:
            headers["range"] = byte_range
        elif verify_checksum:
            headers["x-amz-checksum-mode"] = "ENABLED"
        if if_match:
            headers["if-match"] = if_match
        async with self._request(
            "get_object", bucket, key, byte_range, large=_is_large_range(byte_range)
        ):
            response = await self._send(
                "GetObject", "GET", bucket, key, headers=headers, collect=True
            )
        if verify_checksum and not byte_range:
            _check_stored_checksum(response, where=location(bucket, key, None))
        return response.body, response.status, response.headers.get("content-range")

    async def get_range_to(
        self,
        bucket: str,
        key: str,
        *,
        byte_range: str | None,
        if_match: str | None = None,
        on_head: BodyCheck,
        sink: Sink,
    ) -> int:
        """One GET (ranged, or whole when byte_range is None) whose body goes to the sink (a
        callable given each piece, on a transport thread or a worker thread, or a buffer
        filled from its start) once
        on_head(status, Content-Range, Content-Length) has accepted the answer: the body
        length. A retry must start its own sink state afresh."""
        headers = {"range": byte_range} if byte_range else {}
        if if_match:
            headers["if-match"] = if_match
        async with self._request(
            "get_object", bucket, key, byte_range, large=_is_large_range(byte_range)
        ):
            response = await self._send(
                "GetObject", "GET", bucket, key, headers=headers, on_head=on_head, sink=sink
            )
        return response.length

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

    async def list_objects(
        self,
        bucket: str,
        prefix: str,
        *,
        policy: RetryPolicy = _LISTING_RETRIES,
        on_retry: Callable[[TransientError], None] | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Every object under a prefix, page by page (1,000 keys per request), as dicts with
        botocore's names (Key, Size, LastModified, ETag, StorageClass). A page that fails
        transiently is asked for again (same continuation token): one reset connection must
        not fail an upload, a download or an `ls` of a million keys.

        ListObjectsV2 goes through the transport, its XML read by ElementTree (botocore's own
        XML parser underneath): botocore's shape-driven parsing of a page took 0.17 ms per
        key, 1.7 CPU-s before the first GET of a 10,000-object prefix; this takes 0.02 ms."""
        token: str | None = None
        while True:
            # encoding-type=url, as botocore asks: keys XML cannot carry arrive intact.
            query = {"list-type": "2", "prefix": prefix, "encoding-type": "url"}
            if token:
                query["continuation-token"] = token

            async def page_of(query: dict[str, str] = query) -> Response:
                async with self._request("list_objects", bucket, prefix or None):
                    return await self._send(
                        "ListObjectsV2", "GET", bucket, None, query=query, collect=True
                    )

            response = await call_with_retries(page_of, policy=policy, on_retry=on_retry)
            page = _list_page(response.body, where=location(bucket, prefix or None, None))
            for item in page.contents:
                yield item
            token = page.next_token
            if not page.truncated or not token:
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
        or of one of its parts. The answer under botocore's names (those s3xfer reads)."""
        headers = {"x-amz-checksum-mode": "ENABLED"}
        if etag is not None:
            headers["if-match"] = etag
        query = {"partNumber": str(part_number)} if part_number is not None else None
        async with self._request("head_object", bucket, key):
            response = await self._send(
                "HeadObject", "HEAD", bucket, key, query=query, headers=headers
            )
        answer: dict[str, Any] = {}
        for header, name in _HEAD_FIELDS.items():
            value = response.headers.get(header)
            if value is not None:
                answer[name] = int(value) if name in ("ContentLength", "PartsCount") else value
        return answer


# HeadObject's answer: header -> botocore's name
_HEAD_FIELDS = {
    "content-length": "ContentLength",
    "etag": "ETag",
    "x-amz-mp-parts-count": "PartsCount",
    "x-amz-checksum-type": "ChecksumType",
    "x-amz-checksum-crc32": "ChecksumCRC32",
    "x-amz-checksum-crc32c": "ChecksumCRC32C",
    "x-amz-checksum-crc64nvme": "ChecksumCRC64NVME",
    "x-amz-checksum-sha1": "ChecksumSHA1",
    "x-amz-checksum-sha256": "ChecksumSHA256",
    # As sent (RFC 7231 dates): lease.py ages its object by the server's clock alone.
    "last-modified": "LastModified",
    "date": "Date",
}


@dataclass(frozen=True, slots=True)
class _ListPage:
    contents: list[dict[str, Any]]
    truncated: bool
    next_token: str | None


def _list_page(body: bytes, *, where: str) -> _ListPage:
    """One ListObjectsV2 answer (keys URL-encoded, with + for a space: encoding-type=url,
    decoded as botocore decodes them)."""
    from xml.etree import ElementTree

    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError as exc:
        raise TransientError(f"unreadable listing of {where}: {exc}") from exc
    namespace = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    encoded = (root.findtext(f"{namespace}EncodingType") or "").lower() == "url"
    contents: list[dict[str, Any]] = []
    for entry in root.iterfind(f"{namespace}Contents"):
        item: dict[str, Any] = {}
        for field_element in entry:
            name = field_element.tag[len(namespace) :]
            text = field_element.text or ""
            if name == "Key":
                item["Key"] = unquote_plus(text) if encoded else text
            elif name == "Size":
                item["Size"] = int(text)
            elif name == "LastModified":
                item["LastModified"] = parse_timestamp(text)
            elif name in ("ETag", "StorageClass"):
                item[name] = text
        if "Key" not in item or "Size" not in item:
            raise RemoteError(f"a listing of {where} names an object without key or size")
        contents.append(item)
    truncated = (root.findtext(f"{namespace}IsTruncated") or "").strip().lower() == "true"
    return _ListPage(contents, truncated, root.findtext(f"{namespace}NextContinuationToken"))


def _stored_checksum(algorithm: str, body: bytes) -> str:
    """The base64 value S3 would report for body under algorithm."""
    if algorithm == "crc32":
        return crc32_to_base64(crc32(body))
    if algorithm in ("crc32c", "crc64nvme"):
        from awscrt import checksums

        if algorithm == "crc32c":
            return base64.b64encode(checksums.crc32c(body).to_bytes(4, "big")).decode()
        return base64.b64encode(checksums.crc64nvme(body).to_bytes(8, "big")).decode()
    return base64.b64encode(hashlib.new(algorithm, body).digest()).decode()


def _check_stored_checksum(response: Response, *, where: str) -> None:
    """The whole body against the checksum S3 stored with the object, if any. A composite
    checksum (of the parts of a multipart upload, `value-N`) says nothing of the whole body,
    so it is not checked (nor does botocore check it)."""
    for algorithm in ("crc32", "crc32c", "crc64nvme", "sha1", "sha256"):
        stored = response.headers.get(f"x-amz-checksum-{algorithm}")
        if not stored:
            continue
        if "-" in stored or response.headers.get("x-amz-checksum-type") == "COMPOSITE":
            return
        if _stored_checksum(algorithm, response.body) != stored:
            raise IntegrityError(
                f"{where}: the body does not match the {algorithm.upper()} S3 stored with it"
            )
        return


@asynccontextmanager
async def open_s3(
    connection: Connection,
    *,
    max_pool_connections: int = 32,
    adaptive: bool = True,
    tuner: TunerSettings | None = None,
) -> AsyncIterator[S3]:
    """One transport and one client for the whole run, their pools sized to the requests
    allowed in flight.

    `adaptive`: requests in flight follow an AIMD window (throttle.py), lowered when S3
    answers SlowDown; off for measurements that must hold a concurrency (bench). With
    `tuner`, they follow a ConcurrencyTuner instead, up to its ceiling (the pools' size)."""
    if tuner is not None:
        max_pool_connections = tuner.ceiling
    with map_errors("-", profile=connection.profile):
        async with AsyncExitStack() as stack:
            botocore = BotocoreSession(connection, stack, pool=max_pool_connections)
            endpoints = Endpoints(
                explicit=connection.endpoint_url, region=botocore.region, client=botocore.client
            )
            transport = Transport(
                endpoints,
                NetworkSettings(
                    verify=connection.verify_ssl,
                    stall_timeout=connection.stall_timeout,
                    read_timeout=connection.read_timeout,
                    pool_size=max_pool_connections,
                ),
                credentials=botocore.credentials,
                ca_bundle=botocore.ca_bundle,
                unsigned=connection.unsigned,
            )
            stack.callback(transport.close)
            yield S3(
                botocore,
                transport=transport,
                endpoint_label=redact_credentials(connection.endpoint_url or endpoints.label),
                sse=connection.sse,
                sse_kms_key_id=connection.sse_kms_key_id,
                expected_bucket_owner=connection.expected_bucket_owner,
                gate=AdaptiveGate(max_pool_connections, tuner=tuner) if adaptive else None,
            )
