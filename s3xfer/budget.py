"""ByteBudget: the hard limit on bytes held in memory, shared by uploads and downloads."""

from __future__ import annotations

from collections import deque

import anyio


class ByteBudget:
    """A hard limit on bytes held in memory, granted first come, first served.

    FIFO order matters: with a plain condition variable a stream of small PUTs could starve
    an 8 MiB part forever.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self.peak = 0
        self._waiters: deque[tuple[int, anyio.Event]] = deque()

    def __repr__(self) -> str:
        return (
            f"<ByteBudget used={self.used} peak={self.peak} capacity={self.capacity} "
            f"waiting={len(self._waiters)}>"
        )

    async def acquire(self, amount: int) -> None:
        if amount > self.capacity:
            raise ValueError(f"{amount} bytes can never fit a budget of {self.capacity}")
        if not self._waiters and self.used + amount <= self.capacity:
            self._take(amount)
            return
        event = anyio.Event()
        entry = (amount, event)
        self._waiters.append(entry)
        try:
            await event.wait()
        except BaseException:
            if entry in self._waiters:
                self._waiters.remove(entry)
            else:  # granted while being cancelled: give it back
                self.release(amount)
            raise

    def release(self, amount: int) -> None:
        self.used -= amount
        while self._waiters and self.used + self._waiters[0][0] <= self.capacity:
            granted, event = self._waiters.popleft()
            self._take(granted)
            event.set()

    def _take(self, amount: int) -> None:
        self.used += amount
        self.peak = max(self.peak, self.used)
