"""CRC32 combination and retry decisions: pure, no clock, no network."""

from __future__ import annotations

import zlib

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from s3xfer.checksums import (
    combine_parts,
    crc32_combine,
    crc32_from_base64,
    crc32_to_base64,
)
from s3xfer.errors import AccessDeniedError, TransientError
from s3xfer.transport.retry import RetryPolicy, call_with_retries


@given(st.binary(max_size=5000), st.binary(max_size=5000))
def test_combined_crc_equals_crc_of_concatenation(a: bytes, b: bytes) -> None:
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


@given(st.lists(st.binary(max_size=2000), max_size=8))
def test_parts_combine_to_the_whole(chunks: list[bytes]) -> None:
    parts = [(zlib.crc32(c), len(c)) for c in chunks]
    assert combine_parts(parts) == zlib.crc32(b"".join(chunks))


def test_base64_is_big_endian_like_s3() -> None:
    # S3's documented example: CRC32 of "hello world" is 0x0d4a1185 → "DUoRhQ==".
    assert crc32_to_base64(zlib.crc32(b"hello world")) == "DUoRhQ=="
    assert crc32_from_base64("DUoRhQ==") == zlib.crc32(b"hello world")


@given(attempt=st.integers(min_value=1, max_value=40), r=st.floats(min_value=0, max_value=0.999))
def test_backoff_is_full_jitter_under_the_cap(attempt: int, r: float) -> None:
    policy = RetryPolicy(base_delay=0.1, max_delay=20.0)
    delay = policy.delay(attempt, rand=lambda: r)
    assert 0 <= delay < min(20.0, 0.1 * 2**attempt)


def test_transient_errors_are_retried_until_success() -> None:
    attempts: list[int] = []
    sleeps: list[float] = []

    async def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise TransientError("503", throttled=True)
        return "ok"

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    async def main() -> str:
        retried: list[TransientError] = []
        result = await call_with_retries(
            flaky, policy=RetryPolicy(max_attempts=5), on_retry=retried.append, sleep=fake_sleep
        )
        assert len(retried) == 2 and all(e.throttled for e in retried)
        return result

    assert anyio.run(main) == "ok"
    assert len(attempts) == 3 and len(sleeps) == 2


def test_attempts_are_bounded() -> None:
    calls = 0

    async def always_failing() -> None:
        nonlocal calls
        calls += 1
        raise TransientError("reset")

    async def no_sleep(_seconds: float) -> None:
        return None

    async def main() -> None:
        await call_with_retries(always_failing, policy=RetryPolicy(max_attempts=4), sleep=no_sleep)

    with pytest.raises(TransientError):
        anyio.run(main)
    assert calls == 4


def test_permanent_errors_are_not_retried() -> None:
    calls = 0

    async def denied() -> None:
        nonlocal calls
        calls += 1
        raise AccessDeniedError("no")

    async def main() -> None:
        await call_with_retries(denied, policy=RetryPolicy(max_attempts=4))

    with pytest.raises(AccessDeniedError):
        anyio.run(main)
    assert calls == 1


def test_read_timeouts_have_a_bound_of_their_own() -> None:
    # A timeout, SlowDown, a timeout: the second timeout ends it (max_timeouts=2), though
    # attempts are left; other transient errors still get every attempt.
    errors = [
        TransientError("no response", timed_out=True),
        TransientError("SlowDown", throttled=True),
        TransientError("no response", timed_out=True),
        TransientError("never reached"),
    ]
    calls = 0

    async def failing() -> None:
        nonlocal calls
        calls += 1
        raise errors[calls - 1]

    async def no_sleep(_seconds: float) -> None:
        return None

    async def main(policy: RetryPolicy) -> None:
        await call_with_retries(failing, policy=policy, sleep=no_sleep)

    with pytest.raises(TransientError, match="no response"):
        anyio.run(main, RetryPolicy(max_attempts=10, max_timeouts=2))
    assert calls == 3
    calls = 0
    with pytest.raises(TransientError, match="never reached"):
        anyio.run(main, RetryPolicy(max_attempts=4))  # no bound of their own: attempts only
    assert calls == 4
