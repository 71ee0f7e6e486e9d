"""RunLimits: how a transfer runs, with one set of defaults and checks, and a budget that is
raised only with a notice that says so."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from s3xfer.config import DEFAULT_CONCURRENCY, DEFAULT_MAX_MEMORY, MiB
from s3xfer.errors import UsageError
from s3xfer.limits import DEFAULT_LIMITS, RunLimits


def test_the_defaults_are_the_configured_ones() -> None:
    limits = RunLimits()
    assert (limits.concurrency, limits.max_memory, limits.max_attempts) == (
        DEFAULT_CONCURRENCY,
        DEFAULT_MAX_MEMORY,
        10,
    )
    assert limits == DEFAULT_LIMITS
    assert limits.to_json() == {
        "concurrency": DEFAULT_CONCURRENCY,
        "auto_concurrency": False,
        "max_memory": DEFAULT_MAX_MEMORY,
        "max_attempts": 10,
    }
    assert RunLimits.from_json(limits.to_json()) == limits
    assert limits.most_in_flight == DEFAULT_CONCURRENCY
    assert RunLimits(auto_concurrency=True).most_in_flight == 512


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"concurrency": 0}, "concurrency must be between 1 and 1024, got 0"),
        ({"concurrency": 1025}, "concurrency must be between 1 and 1024, got 1025"),
        ({"max_memory": 5 * MiB - 1}, "max memory must be at least 5 MiB"),
        ({"max_attempts": 0}, "max attempts must be between 1 and 100, got 0"),
    ],
)
def test_values_out_of_range_are_refused(values: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        RunLimits(**values)


def test_limits_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunLimits().concurrency = 4  # type: ignore[misc]


def test_a_budget_that_holds_the_item_is_kept_without_a_notice() -> None:
    budget = RunLimits(max_memory=8 * MiB).memory_for(8 * MiB, what="one range")
    assert (budget.capacity, budget.raised) == (8 * MiB, None)


def test_a_budget_below_one_item_is_raised_to_it_and_says_so() -> None:
    budget = RunLimits(max_memory=5 * MiB).memory_for(16 * MiB, what="one range")
    assert budget.capacity == 16 * MiB
    assert budget.raised == "--max-memory 5 MiB raised to 16 MiB: one range is held whole"
