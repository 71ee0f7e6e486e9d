"""Adaptive request concurrency: additive increase, multiplicative decrease (AIMD), as TCP does.

When S3 answers 503 SlowDown, sending the same number of requests again only makes more of
them fail. The gate halves the number of requests allowed in flight on throttling (at most
once per `cooldown`, since one burst of 503s is one signal, not thirty) and grows it back by
one per window of successful requests, up to the configured concurrency.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio


@dataclass
class AimdWindow:
    """The pure rule: how many requests may be in flight, given successes and throttles."""

    maximum: int
    minimum: int = 1
    cooldown: float = 1.0  # seconds between two decreases
    limit: float = 0.0
    lowest: int = 0
    decreases: int = 0
    _last_decrease: float = float("-inf")

    def __post_init__(self) -> None:
        self.limit = float(self.maximum)
        self.lowest = self.maximum

    @property
    def allowed(self) -> int:
        return max(self.minimum, int(self.limit))

    def on_success(self) -> None:
        # +1/limit per success is +1 per window of `limit` successes.
        self.limit = min(float(self.maximum), self.limit + 1.0 / max(self.limit, 1.0))

    def on_throttle(self, now: float) -> None:
        if now - self._last_decrease < self.cooldown or self.limit <= self.minimum:
            return
        self._last_decrease = now
        self.limit = max(float(self.minimum), self.limit / 2.0)
        self.decreases += 1
        self.lowest = min(self.lowest, self.allowed)


class AdaptiveGate:
    """Admits requests while fewer than the AIMD window are in flight; readable statistics."""

    def __init__(
        self,
        maximum: int,
        *,
        cooldown: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = AimdWindow(maximum, cooldown=cooldown)
        self.in_flight = 0
        self._clock = clock
        self._changed = anyio.Event()
        self._waiting = 0  # requests waiting for a slot: only they need waking

    def __repr__(self) -> str:
        w = self.window
        return (
            f"<AdaptiveGate in_flight={self.in_flight} allowed={w.allowed}/{w.maximum} "
            f"lowest={w.lowest} decreases={w.decreases}>"
        )

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self.acquire()
        try:
            yield
        finally:
            self.release()

    async def acquire(self) -> None:
        """Wait for a slot (`slot` without a context manager, for the per-request path)."""
        while self.in_flight >= self.window.allowed:
            self._waiting += 1
            try:
                await self._changed.wait()
            finally:
                self._waiting -= 1
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1
        self._wake()

    def succeeded(self) -> None:
        before = self.window.allowed
        self.window.on_success()
        if self.window.allowed > before:
            self._wake()

    def throttled(self) -> None:
        self.window.on_throttle(self._clock())

    def _wake(self) -> None:
        if self._waiting:  # a new event per request, when nobody waits, cost 5% of its CPU
            self._changed.set()
            self._changed = anyio.Event()
