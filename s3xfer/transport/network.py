"""How connections are made: certificate checks (AWS_CA_BUNDLE / a profile's ca_bundle, or
none with --no-verify-ssl), the proxy of each origin (HTTPS_PROXY, HTTP_PROXY, NO_PROXY and
their lower-case forms, read by the same standard-library functions botocore reads them
with), and the timeouts. Pure data, decided once per run; http.py turns it into awscrt
options."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from ..errors import UsageError

CONNECT_TIMEOUT = 10.0  # seconds, as botocore's default


@dataclass(frozen=True, slots=True)
class Proxy:
    """A forward proxy: HTTPS origins go through a CONNECT tunnel, plain HTTP ones are
    forwarded (the request line carries the whole URL)."""

    scheme: str  # of the proxy itself: http, or https for TLS to the proxy
    host: str
    port: int
    username: str | None = None
    password: str | None = None

    def __repr__(self) -> str:  # no password in logs
        return f"Proxy({self.scheme}://{self.host}:{self.port})"


def parse_proxy(url: str) -> Proxy:
    """A proxy URL as botocore accepts it (`host:port` means http://host:port)."""
    if "://" not in url:
        url = "http://" + url.removeprefix("//")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"bad proxy URL {url.split('@')[-1]!r} (expected http(s)://host[:port])")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise UsageError(f"bad proxy URL {url.split('@')[-1]!r}: {exc}") from exc
    return Proxy(
        parts.scheme,
        parts.hostname,
        port,
        unquote(parts.username) if parts.username else None,
        unquote(parts.password) if parts.password else None,
    )


def environment_proxy(origin: str) -> Proxy | None:
    """The proxy the environment names for an origin (scheme://host[:port]), or None when
    there is none or NO_PROXY exempts the host: botocore's rule (get_environ_proxies)."""
    netloc = urlsplit(origin).netloc
    try:
        bypass = bool(urllib.request.proxy_bypass(netloc))
    except (TypeError, OSError):  # botocore treats a failing check as no bypass
        bypass = False
    if bypass:
        return None
    url = urllib.request.getproxies().get(urlsplit(origin).scheme)
    return parse_proxy(url) if url else None


@dataclass(frozen=True, slots=True)
class NetworkSettings:
    """verify: check the server's certificate (against the CA bundle the Transport is given,
    else the system's CAs). stall_timeout: a request that makes no progress this long is cut.
    read_timeout: a response that has not started, or stopped arriving, this long is cut
    (None: stall_timeout); cat and get set it short."""

    verify: bool = True
    stall_timeout: float = 60.0
    read_timeout: float | None = None
    connect_timeout: float = CONNECT_TIMEOUT
    pool_size: int = 32

    @property
    def response_timeout(self) -> float:
        """How long a response may keep silent: read_timeout, else stall_timeout."""
        return self.read_timeout if self.read_timeout is not None else self.stall_timeout
