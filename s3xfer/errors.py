"""Every exception class of s3xfer: one root, a few meanings, each with its CLI exit code.

Other modules raise these and never define their own (tests/unit/test_layers.py checks), so
that the CLI's one mapping from exception to exit code and one line sees them all. The tree,
with exit codes, is drawn in docs/architecture.md. Besides the S3XferError tree: the raw HTTP
client's connection errors (ConnectionError subclasses the transport retries and translates),
BadValue (a metadata value the parsers turn into CorruptMetadataError) and UnitFailed (a
Celery task's outcome, never shown to a user).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class S3XferError(Exception):
    """Root of every error s3xfer raises on purpose. The message is one readable line."""

    exit_code = 1


class UsageError(S3XferError):
    """The command line or the arguments of a call are wrong (bad URL, bad size, missing path)."""

    exit_code = 2


class EncryptionKeyError(UsageError):
    """The dataset is encrypted and no key, or not its key, was given; or a key file is not
    32 bytes. The message never holds a key."""


class SourceError(S3XferError):
    """The local source cannot be read as asked (missing, empty, not a directory)."""

    exit_code = 2


class FileChangedError(SourceError):
    """The file is not the one that was planned, or not the one first read: it changed size,
    mtime, inode or ctime, or vanished."""


class MemberChangedError(FileChangedError):
    """A shard member changed while its shard was being read: that member, by its index."""

    def __init__(self, message: str, *, member: int) -> None:
        super().__init__(message)
        self.member = member


class DestinationError(S3XferError):
    """The destination cannot be written (no space, no permission, not a directory)."""

    exit_code = 1


class DiskFullError(DestinationError):
    """The destination's file system is full: every other write would fail the same way."""


class QuantityError(UsageError, ValueError):
    """A duration or rate on the command line could not be understood."""


class JobBusyError(UsageError):
    """Another producer is already waiting for the same job."""


class MissingSlicesError(S3XferError):
    """finalize found no result for some slices: they have not run, or not to the end."""

    exit_code = 1


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


class BrokerError(RemoteError):
    """The broker (Redis) cannot be reached, or refused a command."""


class TransientError(S3XferError):
    """A request failed in a way that retrying may fix (throttling, 5xx, timeout, reset).
    `timed_out`: no byte of the response came within the read timeout."""

    exit_code = 3

    def __init__(self, message: str, *, throttled: bool = False, timed_out: bool = False) -> None:
        super().__init__(message)
        self.throttled = throttled
        self.timed_out = timed_out


class UnreachableError(TransientError):
    """The connection could not even be opened (refused, no route, DNS, proxy, timeout)."""


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


# --------------------------------------------------------------------------- outside the tree
# Raised and caught inside s3xfer; they never reach the CLI as they are.


class ProtocolError(ConnectionError):
    """The server's answer is not HTTP/1.1 as expected (a retry on a new connection may do).
    Raised by transport/rawhttp.py; the transport turns it into a TransientError."""


class ConnectError(ConnectionError):
    """No connection could be opened (refused, no route, name unknown, TLS refused).
    Raised by transport/rawhttp.py; the transport turns it into an UnreachableError."""


class Cancelled(ConnectionError):
    """The request was cancelled from another thread (transport/rawhttp.py)."""


class BadValue(ValueError):
    """One value read from metadata is malformed or out of range; the message says which.
    The parsers turn it into one CorruptMetadataError naming the object it came from."""


class UnitFailed(Exception):
    """A unit of a distributed upload that did not complete, as its Celery task's outcome:
    stored as FAILURE, not SUCCESS, so that another delivery of the unit that does complete
    replaces it (Celery never replaces a stored success). Carries the unit's result as JSON."""

    def __init__(self, result: dict[str, Any]) -> None:
        super().__init__(result)
        self.result = result

    def __repr__(self) -> str:  # what Celery logs: a summary, not every record
        r = self.result
        reason = r.get("error") or f"{r.get('files_failed')} files failed"
        return f"UnitFailed(unit {r.get('index')} of job {r.get('job')}: {reason})"

    __str__ = __repr__


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
