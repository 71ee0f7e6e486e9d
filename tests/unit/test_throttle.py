"""AIMD: halve on throttling (once per cooldown), grow back by one per window of successes,
and the gate never admits more requests than the window allows. The tuner: requests in flight
grow to the knee of a scripted path, and no further; back off on SlowDown, timeouts and a
latency rise."""

from __future__ import annotations

import itertools

import anyio
import anyio.lowlevel
import pytest

from s3xfer.transport.throttle import AdaptiveGate, AimdWindow, ConcurrencyTuner, TunerSettings

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_throttling_halves_the_window_once_per_cooldown() -> None:
    window = AimdWindow(32, cooldown=1.0)
    window.on_throttle(now=10.0)
    assert window.allowed == 16
    window.on_throttle(now=10.5)  # the same burst: one signal
    assert window.allowed == 16
    window.on_throttle(now=11.0)
    window.on_throttle(now=12.0)
    window.on_throttle(now=13.0)
    window.on_throttle(now=14.0)
    window.on_throttle(now=15.0)
    window.on_throttle(now=16.0)
    assert window.allowed == 1 and window.lowest == 1  # never below the minimum
    assert window.decreases == 5  # 32→16→8→4→2→1, then the minimum holds


def test_successes_grow_the_window_by_one_per_window_up_to_the_maximum() -> None:
    window = AimdWindow(32)
    window.on_throttle(now=0.0)
    assert window.allowed == 16
    for _ in range(16):
        window.on_success()
    assert window.allowed == 16 or window.allowed == 17
    for _ in range(17):
        window.on_success()
    assert window.allowed >= 17
    for _ in range(10_000):
        window.on_success()
    assert window.allowed == 32 and window.lowest == 16


async def test_the_gate_admits_at_most_the_window() -> None:
    now = [0.0]
    gate = AdaptiveGate(8, clock=lambda: now[0])
    peak = 0

    async def request(throttle: bool) -> None:
        nonlocal peak
        async with gate.slot():
            peak = max(peak, gate.in_flight)
            assert gate.in_flight <= gate.window.allowed or throttle
            await anyio.sleep(0.001)
            if throttle:
                gate.throttled()
            else:
                gate.succeeded()

    async with anyio.create_task_group() as group:
        for n in range(40):
            group.start_soon(request, n == 0)
    assert peak <= 8
    assert gate.window.lowest == 4
    assert gate.in_flight == 0
    assert "lowest=4" in repr(gate)


# The tuner, driven by a scripted path: `base` seconds of round trip, at most `capacity`
# requests a second (the server's CPU, a link). With n in flight a request completes at
# min(n / base, capacity) a second and waits n / rate: the latency rises past the knee
# (capacity × base in flight) and the throughput stops growing. No sleeping: the clock is
# the script's.


class ScriptedPath:
    def __init__(self, *, base: float, capacity: float, demand: int | None = None) -> None:
        self.base, self.capacity, self.demand = base, capacity, demand
        self.now = 0.0

    def rate(self, in_flight: int) -> float:
        return min(in_flight / self.base, self.capacity)

    def run(self, tuner: ConcurrencyTuner, seconds: float) -> list[int]:
        """Complete requests for `seconds` of scripted time; the limits seen, in order."""
        limits = [tuner.limit]
        end = self.now + seconds
        while self.now < end:
            in_flight = min(tuner.limit, self.demand or tuner.limit)
            rate = self.rate(in_flight)
            tuner.on_admit(in_flight, self.now)
            self.now += 1.0 / rate
            tuner.on_success(self.now, in_flight / rate)
            if tuner.limit != limits[-1]:
                limits.append(tuner.limit)
        return limits


def test_a_long_path_grows_requests_in_flight_to_its_knee_and_no_further() -> None:
    # 30 ms, 5,000 requests/s: the knee is 150 in flight.
    path = ScriptedPath(base=0.030, capacity=5000.0)
    tuner = ConcurrencyTuner(TunerSettings(start=64, ceiling=512))
    limits = path.run(tuner, seconds=10.0)
    assert limits[:4] == [64, 128, 256, 512]  # doubled while throughput grew
    assert limits[4] == 256 and tuner.peak == 512  # 512 was no faster: back to 256
    # Held there, probing a quarter more now and then, which gains nothing either.
    assert set(limits[4:]) == {256, 320} and tuner.limit in (256, 320)
    assert path.rate(tuner.limit) >= 0.9 * path.capacity
    assert tuner.backoffs == 0
    summary = tuner.summary()
    assert summary["mode"] == "auto" and summary["peak"] == 512


def test_a_server_bound_path_keeps_the_start() -> None:
    # Loopback: 2 ms, 1,000 requests/s, so 2 in flight already saturate it.
    path = ScriptedPath(base=0.002, capacity=1000.0)
    tuner = ConcurrencyTuner(TunerSettings(start=64, ceiling=512))
    path.run(tuner, seconds=10.0)
    assert tuner.peak <= 128  # one step up tried, and each probe a quarter more
    assert tuner.limit == 64


def test_the_ceiling_holds_however_much_throughput_grows() -> None:
    path = ScriptedPath(base=0.100, capacity=1e9)
    tuner = ConcurrencyTuner(TunerSettings(start=16, ceiling=100))
    path.run(tuner, seconds=20.0)
    assert tuner.limit == 100 and tuner.peak == 100
    assert "ceiling" in tuner.reason


def test_rounds_that_never_fill_the_limit_are_not_judged() -> None:
    # Only 10 requests ever wait (the work, or the memory budget, holds them back).
    path = ScriptedPath(base=0.030, capacity=1e6, demand=10)
    tuner = ConcurrencyTuner(TunerSettings(start=32, ceiling=512))
    path.run(tuner, seconds=10.0)
    assert tuner.limit == 32 and tuner.peak == 32


def test_slowdown_halves_once_per_cooldown_then_steps_up_by_quarters() -> None:
    path = ScriptedPath(base=0.030, capacity=1e9)
    tuner = ConcurrencyTuner(TunerSettings(start=256, ceiling=512, cooldown=1.0))
    tuner.on_throttle(now=0.0)
    tuner.on_throttle(now=0.5)  # the same burst: one signal
    assert tuner.limit == 128 and tuner.backoffs == 1 and "SlowDown" in tuner.reason
    path.now = 0.5
    limits = path.run(tuner, seconds=10.0)
    assert limits[1] == 160  # +25%: additive after a backoff, never doubled again
    assert all(b - a <= a // 4 for a, b in itertools.pairwise(limits) if b > a)
    tuner.on_throttle(now=path.now)
    assert tuner.backoffs == 2 and tuner.lowest == 128


def test_a_timed_out_request_halves_it_too() -> None:
    tuner = ConcurrencyTuner(TunerSettings(start=64, ceiling=512))
    tuner.on_timeout(now=3.0)
    assert tuner.limit == 32 and tuner.backoffs == 1 and "timed out" in tuner.reason
    for n in range(10):
        tuner.on_throttle(now=10.0 + 2 * n)
    assert tuner.limit == 1  # never below the minimum


def test_when_the_path_gets_slower_the_held_limit_comes_down_to_the_start_at_most() -> None:
    path = ScriptedPath(base=0.030, capacity=5000.0)
    tuner = ConcurrencyTuner(TunerSettings(start=16, ceiling=512))
    path.run(tuner, seconds=5.0)
    held = tuner.limit
    # Another tenant takes most of the server: latency rises, throughput falls.
    path.capacity = 1000.0
    path.run(tuner, seconds=5.0)
    assert tuner.limit < held and tuner.backoffs >= 1
    # Down to where the latency is near the path's own again (knee: 30 in flight).
    assert tuner.limit <= 2 * 30 and path.rate(tuner.limit) >= 0.9 * path.capacity
    # A server busy with others: latency rises whatever is sent; never below the start.
    path.capacity = 100.0
    path.run(tuner, seconds=20.0)
    assert tuner.limit >= 16 and tuner.lowest >= 16


def test_when_the_path_gets_faster_a_probe_finds_more() -> None:
    path = ScriptedPath(base=0.030, capacity=3000.0)  # knee 90
    tuner = ConcurrencyTuner(TunerSettings(start=64, ceiling=512))
    path.run(tuner, seconds=5.0)
    before = tuner.limit
    path.capacity = 12000.0  # knee 360
    path.run(tuner, seconds=30.0)
    assert tuner.limit > before
    assert path.rate(tuner.limit) >= 0.9 * path.capacity


async def test_a_tuned_gate_holds_small_and_large_requests_to_their_own_limits() -> None:
    now = [0.0]
    settings = TunerSettings(start=4, ceiling=8, large_start=2)
    gate = AdaptiveGate(512, tuner=settings, clock=lambda: now[0])
    assert gate.tuned
    peaks = {False: 0, True: 0}
    in_flight = {False: 0, True: 0}

    async def request(large: bool) -> None:
        async with gate.slot(large=large) as started:
            in_flight[large] += 1
            peaks[large] = max(peaks[large], in_flight[large])
            await anyio.lowlevel.checkpoint()
            in_flight[large] -= 1
        gate.succeeded(started, large=large)

    async with anyio.create_task_group() as group:
        for n in range(60):
            group.start_soon(request, n % 3 == 0)
    assert peaks == {False: 4, True: 2}  # each class its own window: 4, and 2 for large ones
    gate.throttled(large=True)
    summary = gate.summary()
    assert summary["mode"] == "auto" and summary["backoffs"] == 0
    assert summary["large"]["backoffs"] == 1 and summary["large"]["final"] == 1
    assert gate.in_flight == 0
