"""The exception tree of s3xfer: one root, a few meanings, each with its CLI exit code."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager


class S3XferError(Exception):
    """Root of every error s3xfer raises on purpose. The message is one readable line."""

    exit_code = 1


class UsageError(S3XferError):
    """The command line or the arguments of a call are wrong (bad URL, bad size, missing path)."""

    exit_code = 2


class SourceError(S3XferError):
    """The local source cannot be read as asked (missing, empty, not a directory)."""

    exit_code = 2


class RemoteError(S3XferError):
    """S3 refused or failed a request that retrying will not fix."""

    exit_code = 3


class NoSuchBucketError(RemoteError, FileNotFoundError):
    """The bucket does not exist."""


class NoSuchKeyError(RemoteError, FileNotFoundError):
    """The object does not exist."""


class NoSuchUploadError(RemoteError, FileNotFoundError):
    """The multipart upload does not exist: aborted, completed, or never created."""


class AccessDeniedError(RemoteError, PermissionError):
    """Credentials are wrong, missing, or not allowed to do this."""


class EndpointError(RemoteError, ConnectionError):
    """The endpoint cannot be reached."""


class DeadlineError(RemoteError, TimeoutError):
    """The command ran out of the time it was given (--deadline)."""


class IntegrityError(S3XferError):
    """Bytes did not match their recorded checksum, size or range: never returned to the caller."""

    exit_code = 4


class PartialReadError(IntegrityError):
    """Some files of a read_many did not verify: `failures` names each (and why), `results`
    holds the verified bytes of the others."""

    def __init__(self, results: dict[str, bytes], failures: dict[str, S3XferError]) -> None:
        first = min(failures)
        more = f" (and {len(failures) - 1} more files)" if len(failures) > 1 else ""
        super().__init__(f"{failures[first]}{more}")
        self.results = results
        self.failures = failures


class CorruptMetadataError(IntegrityError):
    """s3xfer's own metadata (manifest, catalog, shard index, slice result) holds a value
    that is malformed or out of range: nothing is read or written on its say-so. The message
    starts "corrupt dataset metadata:" and names the object and the value."""


class LeaseHeldError(S3XferError):
    """Another s3xfer holds the lease of the dataset prefix (it is writing the manifest and
    catalog there), or took it from this one: nothing was written. Try again when it is done
    (or, if it was killed, once its lease expired, or with --break-lease)."""

    exit_code = 6


class LocalS3Error(S3XferError):
    """The embedded local S3 server could not be started."""

    exit_code = 5


class NotInDatasetError(S3XferError, FileNotFoundError):
    """A path asked for is not in the dataset's catalog, or the prefix holds no dataset."""

    exit_code = 2


class NoDatasetError(NotInDatasetError):
    """The prefix holds no s3xfer dataset (no catalog, no manifest): it may hold plain objects."""


class NotFinalizedError(NotInDatasetError):
    """The prefix holds s3xfer's objects of an upload that has not finished (a sliced upload
    not finalized, or one killed before its manifest), not a dataset: not to be mistaken for
    a plain prefix. The message says how to finish it."""


_URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#@\s'\"]*@")
REDACTED_USERINFO = "***@"


def redact_credentials(text: str) -> str:
    """text with the user:password@ part of every URL in it replaced by ***@: for every URL
    s3xfer prints or logs (endpoints, proxies), whoever wrote the message."""
    return _URL_CREDENTIALS.sub(lambda m: m.group(1) + REDACTED_USERINFO, text)


def first_leaf(error: BaseException) -> BaseException:
    """The first non-group exception inside (nested) exception groups."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error


@contextmanager
def first_error() -> Iterator[None]:
    """Concurrent work fails like one call: with its first error, not an exception group."""
    try:
        yield
    except BaseExceptionGroup as group:
        raise first_leaf(group) from None
