"""Running a coroutine function from synchronous code (the CLI, a Celery task): the one place
that chooses the event loop. asyncio, with uvloop when it is installed: a faster loop, about
10% more small requests per second."""

from __future__ import annotations

import asyncio
import importlib.util
import signal
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar, TypeVarTuple, Unpack

import anyio

T = TypeVar("T")
Args = TypeVarTuple("Args")


def run(function: Callable[[Unpack[Args]], Awaitable[T]], *args: *Args) -> T:
    """`function(*args)` to completion. Typed by its arguments, so a call that no longer
    matches the function's signature is a type error, not a failure at run time.

    Ctrl-C cancels the main task (asyncio's runner does that), so cleanup runs and
    KeyboardInterrupt is raised once it is done; SIGTERM, when the CLI made it mean Ctrl-C,
    does the same."""
    uvloop = importlib.util.find_spec("uvloop") is not None
    return anyio.run(
        _sigterm_cancels,
        function,
        *args,
        backend="asyncio",
        backend_options={"use_uvloop": uvloop},
    )


async def _sigterm_cancels(function: Callable[[Unpack[Args]], Awaitable[T]], *args: *Args) -> T:
    """SIGTERM (where the CLI maps it to KeyboardInterrupt) cancels the main task from the
    loop. Raised as KeyboardInterrupt at whatever line runs when it arrives, it could land in
    a transport callback, where the loop swallows it ("fatal error on transport") and the
    upload goes on."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.default_int_handler
    ):
        return await function(*args)
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    terminated = False

    def on_sigterm() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        return await function(*args)
    except asyncio.CancelledError:
        if terminated:
            raise KeyboardInterrupt from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # as the CLI had it
