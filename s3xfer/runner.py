"""Running a coroutine function from synchronous code (the CLI, a Celery task): the one place
that chooses the event loop. asyncio, with uvloop when it is installed: a faster loop, about
10% more small requests per second."""

from __future__ import annotations

import importlib.util
from collections.abc import Awaitable, Callable
from typing import TypeVar, TypeVarTuple, Unpack

import anyio

T = TypeVar("T")
Args = TypeVarTuple("Args")


def run(function: Callable[[Unpack[Args]], Awaitable[T]], *args: *Args) -> T:
    """`function(*args)` to completion. Typed by its arguments, so a call that no longer
    matches the function's signature is a type error, not a failure at run time."""
    uvloop = importlib.util.find_spec("uvloop") is not None
    return anyio.run(function, *args, backend="asyncio", backend_options={"use_uvloop": uvloop})
