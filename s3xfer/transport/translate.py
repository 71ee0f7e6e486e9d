"""S3's and botocore's errors as s3xfer's, in one place (as httpcore's map_exceptions): an
error code, an HTTP status or a network failure becomes the exception that says what to do
(retry, fix the credentials, the region, the CA bundle), naming the bucket, key and range.
Both paths use it: botocore's ClientError, and the transport's answers made into one.
"""

from __future__ import annotations

import os
import re
import ssl
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import botocore.exceptions as bx

from ..errors import (
    AccessDeniedError,
    EndpointError,
    IntegrityError,
    NoSuchBucketError,
    NoSuchKeyError,
    NoSuchUploadError,
    RemoteError,
    S3XferError,
    TransientError,
    UnreachableError,
    UsageError,
)

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


def location(bucket: str, key: str | None, byte_range: str | None) -> str:
    where = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    return f"{where} ({byte_range})" if byte_range else where


def _sso_profile(profile: str | None) -> str:
    return profile or os.environ.get("AWS_PROFILE") or "default"


def _translate(
    exc: BaseException,
    *,
    bucket: str,
    key: str | None,
    byte_range: str | None,
    profile: str | None = None,
) -> Exception | None:
    where = location(bucket, key, byte_range)
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
        if status in (301, 307) or code in ("PermanentRedirect", "AuthorizationHeaderMalformed"):
            return RemoteError(
                f"s3://{bucket} is not in the region requests are sent to ({code or status}), "
                "and S3 did not say which it is in: pass its region with --region"
            )
        return RemoteError(f"{code or status} on {where}: {message}")
    if isinstance(exc, bx.FlexibleChecksumError):
        return IntegrityError(f"{where}: the body does not match the checksum S3 stored: {exc}")
    if isinstance(
        exc, bx.SSOTokenLoadError | bx.UnauthorizedSSOTokenError | bx.TokenRetrievalError
    ):
        name = _sso_profile(profile)
        return AccessDeniedError(
            f"the AWS SSO session of profile {name} is not logged in or has expired: "
            f"run aws sso login --profile {name}"
        )
    if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
        return AccessDeniedError(
            "no AWS credentials found: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
            "use --profile, or configure ~/.aws/credentials"
        )
    if isinstance(exc, bx.ProfileNotFound):
        return UsageError(f"no such AWS profile: {exc.kwargs.get('profile')}")
    if isinstance(exc, bx.EndpointConnectionError | bx.ConnectTimeoutError):
        return UnreachableError(f"cannot reach the endpoint for {where}: {exc}")
    if isinstance(exc, bx.SSLError) and "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return EndpointError(
            f"TLS certificate verification failed for {where}: set AWS_CA_BUNDLE (or ca_bundle "
            "in the profile) to the CA that signed it, or --no-verify-ssl for an endpoint you trust"
        )
    loaded = sys.modules.get("aiohttp")  # no aiohttp error can happen before it is imported
    if loaded is not None and isinstance(exc, loaded.ClientConnectorError):
        return UnreachableError(f"cannot reach the endpoint for {where}: {exc}")
    if isinstance(exc, bx.ReadTimeoutError | TimeoutError):  # botocore's; rawhttp's, aiohttp's
        return TransientError(
            f"connection failed on {where}: {type(exc).__name__}: {exc}", timed_out=True
        )
    if isinstance(exc, bx.ConnectionClosedError | bx.ResponseStreamingError):
        return TransientError(f"connection failed on {where}: {exc}")
    if isinstance(exc, bx.HTTPClientError) or (
        loaded is not None and isinstance(exc, loaded.ClientError)
    ):
        return TransientError(f"connection failed on {where}: {type(exc).__name__}: {exc}")
    if isinstance(exc, ConnectionError | ssl.SSLError):
        return TransientError(f"connection failed on {where}: {type(exc).__name__}: {exc}")
    if isinstance(exc, bx.InvalidConfigError | bx.ConfigParseError):
        return UsageError(f"bad AWS configuration: {exc}")
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
    bucket: str,
    key: str | None = None,
    byte_range: str | None = None,
    *,
    profile: str | None = None,
) -> Iterator[None]:
    try:
        yield
    except S3XferError:
        raise  # ours already (EndpointError is a ConnectionError too)
    except _network_errors() as exc:
        mapped = _translate(exc, bucket=bucket, key=key, byte_range=byte_range, profile=profile)
        if mapped is None:
            where = location(bucket, key, byte_range)
            raise RemoteError(f"{type(exc).__name__} on {where}: {exc}") from exc
        raise mapped from exc


def client_error(status: int, text: str, operation: str) -> bx.ClientError:
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
