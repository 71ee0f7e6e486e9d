"""Where a bucket's requests go: botocore's endpoint rules for the same environment and config
(AWS_ENDPOINT_URL_S3, a profile's endpoint_url and services section, FIPS, dual-stack,
partitions, addressing_style, accelerate), resolved once per bucket and reused; a region
learned from a redirect replaces the configured one for that bucket.

One case needs no botocore at all, so that `cat` against a local server starts in a tenth of a
second: an endpoint given (or in AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL) whose host is an IP
address over plain HTTP. botocore's rules then always address `{endpoint}/{bucket}` (an IP
cannot carry a bucket as a subdomain, and there is no TLS to configure), signed for the
configured region; tests/unit/test_endpoints.py checks that against botocore itself.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from ..errors import UsageError, redact_credentials

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client


@dataclass(frozen=True, slots=True)
class BucketAddress:
    """base: the URL of the bucket without a trailing slash (`http://host:port/bucket`, or
    `https://bucket.s3.eu-west-1.amazonaws.com`); region and service: what to sign for."""

    base: str
    region: str
    service: str = "s3"

    @property
    def origin(self) -> str:
        parts = urlsplit(self.base)
        return f"{parts.scheme}://{parts.netloc}"

    def target(self, key: str | None, query: Mapping[str, str] | None = None) -> str:
        """The request target (path and query, percent-encoded as S3 and SigV4 want)."""
        path = urlsplit(self.base).path
        if key is not None:
            path = f"{path}/{quote(key, safe='/~')}"
        path = path or "/"
        if query:
            path += "?" + "&".join(
                f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(query.items())
            )
        return path


def check_endpoint_url(url: str) -> None:
    """Refuse (UsageError, the URL shown without credentials) an endpoint URL that is not
    http(s)://host[:port]..., or that holds a user:password@ part: S3 requests are signed with
    AWS credentials, so those would only end up in messages and logs."""
    shown = redact_credentials(repr(url))
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError on a port that is not a number)
    except ValueError as exc:
        raise UsageError(f"bad endpoint URL {shown}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"bad endpoint URL {shown} (expected http(s)://host[:port])")
    if parts.username is not None or parts.password is not None:
        raise UsageError(
            f"endpoint URL {shown} holds credentials: give them as "
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or --profile, not in the URL"
        )


def configured_endpoint(explicit: str | None, environ: Mapping[str, str]) -> str | None:
    """The endpoint URL botocore takes before its config files: given, else
    AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL (none when AWS_IGNORE_CONFIGURED_ENDPOINT_URLS
    is true)."""
    if explicit:
        return explicit
    if environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true":
        return None
    return environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL") or None


def direct_base(endpoint: str | None, bucket: str) -> str | None:
    """`{endpoint}/{bucket}` when botocore's rules give exactly that whatever the config says:
    a plain-HTTP endpoint whose host is an IP address. None otherwise."""
    if not endpoint:
        return None
    parts = urlsplit(endpoint)
    try:
        ipaddress.ip_address(parts.hostname or "")
        _ = parts.port  # raises on a malformed port: botocore then reports it
    except ValueError:
        return None
    if parts.scheme != "http" or parts.query or parts.fragment:
        return None
    return f"{endpoint.rstrip('/')}/{quote(bucket, safe='')}"


class Endpoints:
    """The address of each bucket, resolved on first use and kept for the run."""

    def __init__(
        self,
        *,
        explicit: str | None,
        region: Callable[[], str],
        client: Callable[[], Awaitable[S3Client]],
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._endpoint = configured_endpoint(explicit, os.environ if environ is None else environ)
        if self._endpoint is not None:
            check_endpoint_url(self._endpoint)  # one from the environment, too
        self._region = region
        self._client = client
        self._known: dict[str, BucketAddress] = {}
        self._learned: dict[str, str] = {}  # bucket -> region S3 redirected to
        self._hooked = False

    @property
    def label(self) -> str:
        """What the endpoint is, for messages."""
        return self._endpoint or "AWS S3"

    @property
    def needs_botocore(self) -> bool:
        """Whether addressing a bucket asks botocore (its client is then made)."""
        return direct_base(self._endpoint, "bucket") is None

    async def address(self, bucket: str) -> BucketAddress:
        known = self._known.get(bucket)
        if known is None:
            known = self._known[bucket] = await self._resolve(bucket)
        return known

    def learn_region(self, bucket: str, region: str) -> bool:
        """S3 said the bucket lives in `region`: the next address of it is resolved for it.
        False when that is the region already used (nothing to follow)."""
        known = self._known.get(bucket)
        if known is not None and known.region == region:
            return False
        self._learned[bucket] = region
        self._known.pop(bucket, None)
        return True

    async def _resolve(self, bucket: str) -> BucketAddress:
        direct = direct_base(self._endpoint, bucket)
        if direct is not None:
            return BucketAddress(direct, self._learned.get(bucket) or self._region())
        client = await self._client()
        if not self._hooked:
            # As botocore's own redirector does: the region S3 named replaces the configured
            # one in the endpoint rules, for that bucket only.
            client.meta.events.register("before-endpoint-resolution.s3", self._redirected_region)
            self._hooked = True
        context: dict[str, Any] = {}
        operation = client.meta.service_model.operation_model("GetObject")
        # botocore's resolver for one operation's parameters (the public way, a presigned
        # URL, would sign too); every data-path operation resolves alike for a bucket.
        url, _headers, _properties = await client._resolve_endpoint_ruleset(  # type: ignore[attr-defined]
            operation, {"Bucket": bucket, "Key": "k"}, context
        )
        signing = context.get("signing", {})
        return BucketAddress(
            str(url).rstrip("/"),
            str(signing.get("region") or self._learned.get(bucket) or self._region()),
            str(signing.get("signing_name") or "s3"),
        )

    def _redirected_region(
        self, builtins: dict[str, Any], params: Mapping[str, Any], **_: Any
    ) -> None:
        region = self._learned.get(str(params.get("Bucket", "")))
        if region:
            builtins["AWS::Region"] = region
