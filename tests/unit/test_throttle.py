"""AIMD: halve on throttling (once per cooldown), grow back by one per window of successes,
and the gate never admits more requests than the window allows."""

from __future__ import annotations

import anyio
import pytest

from s3xfer.transport.throttle import AdaptiveGate, AimdWindow

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
