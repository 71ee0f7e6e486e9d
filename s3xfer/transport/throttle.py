"""Requests in flight: a fixed number lowered on throttling (AIMD, as TCP does), or one the
transfer finds for itself (`ConcurrencyTuner`), and the gate that holds requests to it.

When S3 answers 503 SlowDown, sending the same number of requests again only makes more of
them fail. Both rules halve the number of requests allowed in flight on throttling (at most
once per `cooldown`, since one burst of 503s is one signal, not thirty). The fixed rule grows
it back by one per window of successful requests, up to the configured concurrency; the tuner
also grows it from a start towards a ceiling while throughput grows, and settles where it
stops growing (the knee of the path: more requests in flight only queue).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import anyio

from ..config import AUTO_CONCURRENCY_CEILING, AUTO_CONCURRENCY_START


@dataclass
class AimdWindow:
    """The fixed rule: how many requests may be in flight, given successes and throttles."""

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

    def on_admit(self, in_flight: int, now: float) -> None:
        pass

    def on_success(self, now: float = 0.0, latency: float = 0.0) -> None:
        # +1/limit per success is +1 per window of `limit` successes.
        self.limit = min(float(self.maximum), self.limit + 1.0 / max(self.limit, 1.0))

    def on_throttle(self, now: float) -> None:
        if now - self._last_decrease < self.cooldown or self.limit <= self.minimum:
            return
        self._last_decrease = now
        self.limit = max(float(self.minimum), self.limit / 2.0)
        self.decreases += 1
        self.lowest = min(self.lowest, self.allowed)

    def on_timeout(self, now: float) -> None:
        pass  # a fixed concurrency is lowered by S3's word only, as before

    def summary(self) -> dict[str, Any]:
        return {
            "mode": "fixed",
            "final": self.allowed,
            "peak": self.maximum,
            "lowest": self.lowest,
            "backoffs": self.decreases,
            "reason": "--concurrency (or a bench profile) fixes it",
        }


@dataclass(frozen=True, slots=True)
class TunerSettings:
    """How the tuner probes. A step up counts when the throughput of a round (at least
    `round_seconds` and one window of completions) grew by `gain` over the best before it."""

    start: int = AUTO_CONCURRENCY_START
    ceiling: int = AUTO_CONCURRENCY_CEILING
    # Large requests (parts, large objects and ranges) start lower: a few already fill a
    # link, each holds its bytes in the memory budget, and the tuner grows them if they gain.
    large_start: int = 8
    minimum: int = 1
    round_seconds: float = 0.25
    gain: float = 0.10
    latency_rise: float = 2.0  # round latency over the lowest seen: queueing, not the path
    probe_every: int = 8  # rounds held before trying a step up again
    cooldown: float = 1.0  # seconds between two backoffs: one burst is one signal

    def __post_init__(self) -> None:
        if not 1 <= self.minimum <= self.start <= self.ceiling:
            raise ValueError(f"tuner needs 1 <= minimum <= start <= ceiling: {self}")


@dataclass
class ConcurrencyTuner:
    """The pure rule that finds the knee, fed each request's latency and each congestion
    signal (with the time, so tests script them without sleeping).

    Slow start: double the limit after every round whose throughput grew by `gain` over the
    round before (the first full round at each new limit settles and is not measured). The
    first round that does not grow (or whose latency rose `latency_rise` times over the
    lowest seen without more throughput) is the knee: back to the best limit and hold. While
    holding, every `probe_every` rounds try a quarter more, kept only if throughput grows; a
    latency `latency_rise` times the lowest seen takes a quarter off (not below the start).
    SlowDown or a timed-out request halves the limit (once per cooldown), and from then on
    steps up are additive (a quarter), never doublings. A round whose requests never filled
    the limit says nothing about it (the work, the memory budget or the client held them
    back): it is not judged."""

    settings: TunerSettings = field(default_factory=TunerSettings)
    limit: int = 0
    peak: int = 0
    lowest: int = 0
    backoffs: int = 0
    reason: str = "start"
    _probing: bool = True
    _doubling: bool = True
    _best_rate: float = 0.0
    _best_limit: int = 0
    _held_rate: float = 0.0
    _held_rounds: int = 0
    _settling: bool = True  # the next full round follows a change: not measured
    _base_latency: float = float("inf")
    _round_start: float | None = None
    _done: int = 0
    _latency_total: float = 0.0
    _filled: bool = False
    _last_backoff: float = float("-inf")

    def __post_init__(self) -> None:
        self.limit = self.peak = self.lowest = self._best_limit = self.settings.start

    @property
    def allowed(self) -> int:
        return self.limit

    def on_admit(self, in_flight: int, now: float) -> None:
        """A request was admitted, `in_flight` now in flight (itself included)."""
        if self._round_start is None:
            self._round_start = now
        if in_flight >= self.limit:
            self._filled = True

    def on_success(self, now: float = 0.0, latency: float = 0.0) -> None:
        self._done += 1
        self._latency_total += latency
        if self._round_start is None:
            self._round_start = now - latency
        elapsed = now - self._round_start
        if self._done >= self.limit and elapsed >= self.settings.round_seconds:
            self._end_round(now, self._done / elapsed, self._latency_total / self._done)

    def on_throttle(self, now: float) -> None:
        self._back_off(now, "S3 answered SlowDown")

    def on_timeout(self, now: float) -> None:
        self._back_off(now, "a request timed out")

    def summary(self) -> dict[str, Any]:
        return {
            "mode": "auto",
            "start": self.settings.start,
            "ceiling": self.settings.ceiling,
            "final": self.limit,
            "peak": self.peak,
            "lowest": self.lowest,
            "backoffs": self.backoffs,
            "reason": self.reason,
        }

    def _back_off(self, now: float, why: str) -> None:
        if now - self._last_backoff < self.settings.cooldown:
            return
        self._last_backoff = now
        self.backoffs += 1
        self._probing = self._doubling = False
        self._held_rounds = 0
        self._set(max(self.settings.minimum, self.limit // 2), f"{why}: halved")
        self._new_round(now)

    def _end_round(self, now: float, rate: float, latency: float) -> None:
        filled = self._filled
        self._new_round(now)
        self._base_latency = min(self._base_latency, latency)
        if not filled:
            return
        if self._settling:
            # The first full round at a new limit holds the change: the answers of requests
            # sent before it, and a round trip before the new ones answer (at the start,
            # connections opened too). Its throughput says little about the new limit.
            self._settling = False
            return
        s = self.settings
        queueing = latency > s.latency_rise * self._base_latency
        if self._probing:
            if rate >= self._best_rate * (1 + s.gain):
                grew = "" if not self._best_rate else f" {rate / self._best_rate - 1:+.0%}"
                self._best_rate, self._best_limit = rate, self.limit
                if self.limit >= s.ceiling:
                    self._hold(rate, f"throughput{grew} at the ceiling {s.ceiling}")
                else:
                    step = self.limit if self._doubling else max(1, self.limit // 4)
                    self._set(
                        min(s.ceiling, self.limit + step),
                        f"throughput{grew} at {self.limit} in flight: raised",
                    )
                return
            why = "latency rose" if queueing else "throughput stopped growing"
            at = self.limit
            self._doubling = False
            self._set(self._best_limit, f"{why} at {at} in flight: back to {self._best_limit}")
            self._hold(self._best_rate, self.reason)
            return
        self._held_rounds += 1
        if queueing and self.limit > s.start:
            # Requests queue somewhere (the server, a link shared with others): fewer in
            # flight move as much, until the latency is back near the path's own. Never below
            # the start on latency alone: a busy server's latency rises whoever sends, and
            # fewer requests would only get a smaller share (SlowDown and timeouts may).
            self.backoffs += 1
            self._held_rounds = 0
            self._set(
                max(s.start, self.limit * 3 // 4),
                f"latency rose {latency / self._base_latency:.1f}x over the path's lowest",
            )
            self._held_rate = rate
            return
        self._held_rate = rate if not self._held_rate else (self._held_rate + rate) / 2
        if self._held_rounds >= s.probe_every and self.limit < s.ceiling:
            self._probing = True
            self._best_rate, self._best_limit = self._held_rate, self.limit
            self._set(min(s.ceiling, self.limit + max(1, self.limit // 4)), "probing")

    def _hold(self, rate: float, reason: str) -> None:
        self._probing = False
        self._held_rounds = 0
        self._held_rate = rate
        self.reason = reason

    def _set(self, limit: int, reason: str) -> None:
        self._settling = self._settling or limit != self.limit
        self.limit = limit
        self.peak = max(self.peak, limit)
        self.lowest = min(self.lowest, limit)
        self.reason = reason

    def _new_round(self, now: float) -> None:
        self._round_start = now
        self._done = 0
        self._latency_total = 0.0
        self._filled = False


class Window(Protocol):
    """What the gate asks of a rule (AimdWindow or ConcurrencyTuner)."""

    @property
    def allowed(self) -> int: ...

    lowest: int

    def on_admit(self, in_flight: int, now: float) -> None: ...
    def on_success(self, now: float = 0.0, latency: float = 0.0) -> None: ...
    def on_throttle(self, now: float) -> None: ...
    def on_timeout(self, now: float) -> None: ...
    def summary(self) -> dict[str, Any]: ...


class _Lane:
    """Requests held to one window: their count in flight and who waits for a slot."""

    __slots__ = ("changed", "in_flight", "used", "waiting", "window")

    def __init__(self, window: Window) -> None:
        self.window = window
        self.used = False  # has any request passed
        self.in_flight = 0
        self.waiting = 0  # requests waiting for a slot: only they need waking
        self.changed = anyio.Event()

    def wake(self) -> None:
        if self.waiting:  # a new event per request, when nobody waits, cost 5% of its CPU
            self.changed.set()
            self.changed = anyio.Event()


class AdaptiveGate:
    """Admits requests while fewer than their window are in flight; readable statistics.

    Fixed (`tuner=None`): one AIMD window of `maximum` for every request. Tuned: one
    ConcurrencyTuner for small requests and one for large ones (parts, large ranges and
    objects), since their knees differ; the memory budget still bounds the large ones."""

    def __init__(
        self,
        maximum: int,
        *,
        cooldown: float = 1.0,
        tuner: TunerSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self.tuned = tuner is not None
        if tuner is None:
            self._small = self._large = _Lane(AimdWindow(maximum, cooldown=cooldown))
        else:
            self._small = _Lane(ConcurrencyTuner(tuner))
            large_start = max(tuner.minimum, min(tuner.large_start, tuner.start))
            self._large = _Lane(ConcurrencyTuner(replace(tuner, start=large_start)))

    @property
    def window(self) -> Window:
        """The window of small requests (of every request when fixed)."""
        return self._small.window

    @property
    def in_flight(self) -> int:
        return self._small.in_flight + (self._large.in_flight if self.tuned else 0)

    def __repr__(self) -> str:
        w = self._small.window
        return (
            f"<AdaptiveGate in_flight={self.in_flight} allowed={w.allowed} "
            f"lowest={w.lowest} tuned={self.tuned}>"
        )

    def summary(self) -> dict[str, Any]:
        """What was chosen and why: the small requests' window, with the large ones' as
        `large` when tuned and any was sent."""
        data = self._small.window.summary()
        if self.tuned and self._large.used:
            data["large"] = self._large.window.summary()
        return data

    @asynccontextmanager
    async def slot(self, *, large: bool = False) -> AsyncIterator[float]:
        """A slot, held for the block: the time it was admitted (for `succeeded`)."""
        started = await self.acquire(large=large)
        try:
            yield started
        finally:
            self.release(large=large)

    async def acquire(self, *, large: bool = False) -> float:
        """Wait for a slot (`slot` without a context manager, for the per-request path): the
        time it was admitted, to give back to `succeeded`."""
        lane = self._large if large else self._small
        while lane.in_flight >= lane.window.allowed:
            lane.waiting += 1
            try:
                await lane.changed.wait()
            finally:
                lane.waiting -= 1
        lane.in_flight += 1
        lane.used = True
        now = self._clock()
        lane.window.on_admit(lane.in_flight, now)
        return now

    def release(self, *, large: bool = False) -> None:
        lane = self._large if large else self._small
        lane.in_flight -= 1
        lane.wake()

    def succeeded(self, started: float = 0.0, *, large: bool = False) -> None:
        lane = self._large if large else self._small
        before = lane.window.allowed
        now = self._clock()
        lane.window.on_success(now, now - started)
        if lane.window.allowed > before:
            lane.wake()

    def throttled(self, *, large: bool = False) -> None:
        lane = self._large if large else self._small
        lane.window.on_throttle(self._clock())

    def timed_out(self, *, large: bool = False) -> None:
        lane = self._large if large else self._small
        lane.window.on_timeout(self._clock())
