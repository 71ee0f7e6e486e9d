"""Retry decisions and backoff: pure functions with an injected random source and clock."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio

from ..errors import TransientError

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 10  # as s5cmd and rclone: throttling can last a while
    base_delay: float = 0.1
    max_delay: float = 20.0
    # Read timeouts one request may have before it is given up (None: max_attempts). A server
    # that throttles answers; one that has not answered within the timeout, twice, is not
    # likely to: without this, `cat` waited 10 x 60 s on an endpoint that never answers.
    max_timeouts: int | None = None

    def delay(self, attempt: int, *, rand: Callable[[], float] = random.random) -> float:
        """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)).

        Full jitter spreads the retries of many clients hit by the same throttle instead of
        having them return in lockstep (AWS Architecture Blog, "Exponential Backoff And Jitter").
        """
        return rand() * min(self.max_delay, self.base_delay * 2.0**attempt)

    def should_retry(self, error: BaseException, attempt: int, *, timeouts: int = 0) -> bool:
        """attempt counts from 1 for the attempt that just failed; timeouts, the read
        timeouts so far, that one included."""
        if self.max_timeouts is not None and timeouts >= self.max_timeouts:
            return False
        return isinstance(error, TransientError) and attempt < self.max_attempts


@dataclass
class RetryCount:
    """An `on_retry` callback that counts retries, and how many were throttling."""

    retries: int = 0
    throttled: int = 0

    def __call__(self, error: TransientError) -> None:
        self.retries += 1
        self.throttled += error.throttled


async def call_with_retries(
    operation: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy,
    on_retry: Callable[[TransientError], None] | None = None,
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
) -> T:
    """Run `operation` until it succeeds, fails permanently, or runs out of attempts."""
    attempt = 1
    timeouts = 0
    while True:
        try:
            return await operation()
        except TransientError as error:
            timeouts += error.timed_out
            if not policy.should_retry(error, attempt, timeouts=timeouts):
                raise
            if on_retry is not None:
                on_retry(error)
            await sleep(policy.delay(attempt))
            attempt += 1
