"""The `distributed` extra's imports, and the connection to Redis (the broker).

celery, kombu and redis are imported here, and only here: without the extra, importing
`worker.py` or `jobs.py` is one clear line (a UsageError), not an ImportError.
"""

from __future__ import annotations

from typing import Any

from ..errors import BrokerError, UsageError

try:
    import redis
    from celery import Celery, signals  # type: ignore[import-untyped]
    from celery.worker.request import Request  # type: ignore[import-untyped]
    from kombu.utils.url import maybe_sanitize_url
except ImportError as exc:  # the base tool runs without the extra
    raise UsageError(
        "the distributed mode needs the extra: pip install 's3xfer[distributed]'"
    ) from exc

__all__ = (
    "Celery",
    "Request",
    "as_text",
    "check_broker_url",
    "connect",
    "maybe_sanitize_url",
    "redis",
    "signals",
)


def as_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def check_broker_url(url: str) -> None:
    if not url.startswith(("redis://", "rediss://")):
        raise UsageError(f"not a Redis URL: {url!r} (expected redis://HOST[:PORT][/DB])")


def connect(url: str) -> redis.Redis:
    """A Redis client on the broker, checked with a PING."""
    check_broker_url(url)
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=10, socket_timeout=60)
        client.ping()
    except (redis.RedisError, ValueError) as exc:
        raise BrokerError(f"cannot reach the broker {maybe_sanitize_url(url)}: {exc}") from exc
    return client
