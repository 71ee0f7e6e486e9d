"""Where and how to connect (`Connection`), and botocore's side of it: aiobotocore's session and
S3 client, made on first use (importing them and loading S3's service model cost about 0.3 s,
which a run that needs no control request skips), and the region, credentials and CA bundle
the transport signs and connects with, so that both paths always agree.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import botocore.exceptions as bx

from ..errors import UsageError
from .endpoints import check_endpoint_url
from .http import Credentials

if TYPE_CHECKING:
    from aiobotocore.session import AioSession
    from types_aiobotocore_s3 import S3Client


SSE_ALGORITHMS = ("AES256", "aws:kms")
_ACCOUNT_ID = re.compile(r"[0-9]{12}")


@dataclass(frozen=True, slots=True)
class Connection:
    """Where and how to connect. Unset, everything comes from where awscli takes it (AWS_*
    variables, ~/.aws/config and credentials, the profile). Credentials given here are kept
    out of repr, and so out of logs and reports."""

    # Takes precedence over AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL and the profile's settings.
    endpoint_url: str | None = None
    profile: str | None = None
    region: str | None = None
    verify_ssl: bool = True
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    # Send requests unsigned (public buckets), as awscli's --no-sign-request.
    unsigned: bool = False
    # Server-side encryption of the objects written (PutObject, CreateMultipartUpload).
    sse: str | None = None
    sse_kms_key_id: str | None = None
    # Every request then fails (403) unless the bucket belongs to this account: a bucket name
    # deleted and re-created by someone else does not silently receive the data.
    expected_bucket_owner: str | None = None
    # A request that makes no progress (sending or receiving) for this long is cut and retried.
    stall_timeout: float = 60.0
    # A response that has not started, or stopped arriving, for this long is cut and retried;
    # None: stall_timeout. cat and get use 10 s (transport.NetworkSettings.read_timeout).
    read_timeout: float | None = None

    def __post_init__(self) -> None:
        if self.endpoint_url is not None:
            check_endpoint_url(self.endpoint_url)
        for name in ("stall_timeout", "read_timeout"):
            value = getattr(self, name)
            if value is not None and not 0 < value < float("inf"):
                raise UsageError(f"{name.replace('_', ' ')} must be a positive number of seconds")
        if self.sse is not None and self.sse not in SSE_ALGORITHMS:
            raise UsageError(
                f"unknown server-side encryption {self.sse!r} (use {' or '.join(SSE_ALGORITHMS)})"
            )
        if self.sse_kms_key_id and self.sse != "aws:kms":
            raise UsageError("a KMS key id needs server-side encryption aws:kms (--sse aws:kms)")
        owner = self.expected_bucket_owner
        if owner is not None and not _ACCOUNT_ID.fullmatch(owner):
            raise UsageError(f"expected bucket owner must be a 12-digit AWS account id: {owner!r}")
        if bool(self.access_key) != bool(self.secret_key):
            raise UsageError("an access key needs its secret key, and the other way round")


def parse_timestamp(value: Any) -> datetime.datetime:
    """A timestamp of a botocore response, as botocore's own parser returns it (timezone
    aware), by the fast standard-library parser whenever it is ISO 8601."""
    if isinstance(value, str):
        try:
            parsed = datetime.datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            if parsed.tzinfo is not None:
                return parsed
    from botocore.utils import parse_timestamp as botocore_parse

    result: datetime.datetime = botocore_parse(value)
    return result


class BotocoreSession:
    """aiobotocore's session and S3 client, made on first use: importing them and loading
    S3's service model cost about 0.3 s, which a run that needs no control request skips.
    Also where the transport takes the region, credentials and CA bundle from, so both paths
    always agree."""

    def __init__(self, connection: Connection, stack: AsyncExitStack, *, pool: int) -> None:
        self.connection = connection
        self.stack = stack
        self.pool = pool
        self.on_client: list[Callable[[S3Client], None]] = []  # run once on the new client
        self._session: AioSession | None = None
        self._client: S3Client | None = None
        self._region: str | None = None
        self._static: Credentials | bool | None = None  # False: none given nor in the env
        self._lock = anyio.Lock()

    def session(self) -> AioSession:
        if self._session is None:
            from aiobotocore.session import AioSession

            # botocore logs a failed credential refresh (an SSO session not logged in...) with
            # its traceback before raising it; s3xfer reports the error itself, in one line.
            # (A handler configured by the application still receives the record.)
            for name in ("botocore", "aiobotocore"):
                logging.getLogger(name).addHandler(logging.NullHandler())

            try:
                self._session = AioSession(profile=self.connection.profile)
            except bx.ProfileNotFound as exc:
                raise UsageError(f"no such AWS profile: {self.connection.profile}") from exc
            # S3's timestamps are ISO 8601, which the standard library parses in 2 µs; botocore's
            # general parser (dateutil) took 0.6 ms each: 6 CPU-s for a 10,000-object listing.
            self._session.get_component("response_parser_factory").set_parser_defaults(
                timestamp_parser=parse_timestamp
            )
        return self._session

    async def client(self) -> S3Client:
        if self._client is not None:
            return self._client
        async with self._lock:
            if self._client is None:
                self._client = await self._create()
        return self._client

    async def _create(self) -> S3Client:
        import botocore
        from aiobotocore.config import AioConfig

        connection = self.connection
        config = AioConfig(
            max_pool_connections=self.pool,
            retries={"total_max_attempts": 1},  # retry.py owns retries
            parameter_validation=False,
            connect_timeout=10,
            read_timeout=connection.read_timeout or connection.stall_timeout,
            # We send our own CRC32 values; no second pass over the bytes by botocore.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            signature_version=botocore.UNSIGNED if connection.unsigned else None,
        )
        try:
            client: S3Client = await self.stack.enter_async_context(
                self.session().create_client(
                    "s3",
                    endpoint_url=connection.endpoint_url,
                    region_name=connection.region,
                    # None: botocore's own choice, AWS_CA_BUNDLE or the profile's ca_bundle
                    verify=None if connection.verify_ssl else False,
                    aws_access_key_id=connection.access_key,
                    aws_secret_access_key=connection.secret_key,
                    aws_session_token=connection.session_token,
                    config=config,
                )
            )
        except bx.ProfileNotFound as exc:
            raise UsageError(f"no such AWS profile: {connection.profile}") from exc
        except ValueError as exc:
            raise UsageError(f"bad endpoint URL: {exc}") from exc
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

    def ca_bundle(self) -> str | None:
        """The CAs botocore would trust: AWS_CA_BUNDLE, else the profile's ca_bundle."""
        return os.environ.get("AWS_CA_BUNDLE") or self.session().get_config_variable("ca_bundle")

    async def credentials(self) -> Credentials | None:
        """The credentials to sign the next request with: given, else the environment's (as
        botocore's chain, which reads them first unless a profile is named), else botocore's
        chain, whose refreshable credentials renew themselves as they near expiry."""
        connection = self.connection
        if connection.unsigned:
            return None
        if self._static is None:
            # Given or in the environment: fixed for the run (botocore, too, reads the
            # environment's once), so made once and not for every request.
            access_key = os.environ.get("AWS_ACCESS_KEY_ID")
            secret_key = os.environ.get("AWS_SECRET_ACCESS_KEY")
            if connection.access_key and connection.secret_key:
                self._static = Credentials(
                    connection.access_key, connection.secret_key, connection.session_token
                )
            elif connection.profile is None and access_key and secret_key:
                token = os.environ.get("AWS_SESSION_TOKEN")
                self._static = Credentials(access_key, secret_key, token)
            else:
                self._static = False
        if isinstance(self._static, Credentials):
            return self._static
        source = await self.session().get_credentials()  # one object, kept by the session
        if source is None:
            return None
        frozen = await source.get_frozen_credentials()  # refreshed when near expiry
        if not frozen.access_key or not frozen.secret_key:
            return None
        return Credentials(frozen.access_key, frozen.secret_key, frozen.token)
