"""RunLimits: how a transfer runs (requests in flight, bytes held in memory, attempts per
request), apart from what it sends (a Plan). One object, the same defaults, for upload,
download, `cat` and `get`; a saved plan replays under the limits of the day.

The timeouts of one request (--stall-timeout, --read-timeout) belong to the Connection (the
transport enforces them on every request it sends); the time of a whole command (--deadline)
to the command."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .config import (
    AUTO_CONCURRENCY_CEILING,
    DEFAULT_CONCURRENCY,
    DEFAULT_MAX_MEMORY,
    MIN_PART_SIZE,
    format_size,
)
from .errors import UsageError

MAX_CONCURRENCY = 1024
# As s5cmd and rclone: throttling can last a while.
DEFAULT_MAX_ATTEMPTS = 10
# The smallest budget: one part of a multipart upload (5 MiB) must fit it.
MIN_MAX_MEMORY = MIN_PART_SIZE


@dataclass(frozen=True, slots=True)
class RunLimits:
    """How a transfer runs. Validated on construction.

    - concurrency: requests in flight at once (also the size of the connection pool). Large
      parts and ranges are held to what max_memory holds whole.
    - auto_concurrency: an upload finds its requests in flight during the transfer instead
      (transport/throttle.py, from AUTO_CONCURRENCY_START up to the ceiling): the CLI's
      upload or download without --concurrency.
    - max_memory: file bytes held in memory at once (parts, ranges, small files read ahead).
    - max_attempts: tries of one request before it fails (throttling, 5xx, timeouts)."""

    concurrency: int = DEFAULT_CONCURRENCY
    auto_concurrency: bool = False
    max_memory: int = DEFAULT_MAX_MEMORY
    max_attempts: int = DEFAULT_MAX_ATTEMPTS

    def __post_init__(self) -> None:
        if not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise UsageError(
                f"concurrency must be between 1 and {MAX_CONCURRENCY}, got {self.concurrency}"
            )
        if self.max_memory < MIN_MAX_MEMORY:
            raise UsageError(
                f"max memory must be at least {format_size(MIN_MAX_MEMORY)}, "
                f"got {format_size(self.max_memory)}"
            )
        if not 1 <= self.max_attempts <= 100:
            raise UsageError(f"max attempts must be between 1 and 100, got {self.max_attempts}")

    @property
    def most_in_flight(self) -> int:
        """The most requests ever in flight: workers and connection pools are sized to it."""
        return AUTO_CONCURRENCY_CEILING if self.auto_concurrency else self.concurrency

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunLimits:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def memory_for(self, whole: int, *, what: str) -> Budget:
        """The byte budget of a run in which one item of `whole` bytes must be held whole
        (a range, a part, a file checked before it is written): max_memory, or `whole` when
        it is larger, and then a notice that says so (never raised silently)."""
        if whole <= self.max_memory:
            return Budget(self.max_memory, None)
        return Budget(
            whole,
            f"--max-memory {format_size(self.max_memory)} raised to {format_size(whole)}: "
            f"{what} is held whole",
        )


@dataclass(frozen=True, slots=True)
class Budget:
    """The bytes a run may hold, and the notice when that is more than --max-memory."""

    capacity: int
    raised: str | None


DEFAULT_LIMITS = RunLimits()  # frozen: safe as a default argument
