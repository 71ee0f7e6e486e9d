"""Keeps the process's memory close to the byte budget on glibc.

glibc raises its mmap threshold each time a large block is freed, after which multi-MiB part
buffers come from (per-thread) heap arenas and are not returned to the system when freed: RSS
then grows to about twice the buffered bytes. A fixed threshold keeps every buffer of 1 MiB or
more in its own mapping, unmapped as soon as it is freed. A no-op on other C libraries.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
_THRESHOLD = 1024 * 1024


@functools.cache
def return_large_buffers_promptly() -> bool:
    """Ask glibc to map (and unmap) buffers of 1 MiB or more directly. True if it applied."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD))
