"""The engine's coding of what it sends (docs/format.md, "Coded files"): a whole file of a
single PUT, a part of a multipart upload, the members of a shard. Off the event loop."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import anyio

from ..dataset.coding import FileCoder, FrameKey
from ..errors import FileChangedError
from ..planning.plan import FileUnit, Part
from .inflight import ShardBuild


async def encode_file(unit: FileUnit, body: bytes, *, key: FrameKey | None, source: Path) -> bytes:
    """A single PUT's stored bytes; a compressed file that does not compress to the size it
    was measured at changed meanwhile (FileChangedError)."""
    stored = await anyio.to_thread.run_sync(FileCoder(unit.coding, key).encode, unit.path, body)
    if 0 <= unit.stored_size != len(stored):
        raise FileChangedError(
            f"{source / unit.path}: changed since it was measured (compresses to "
            f"{len(stored):,} bytes, not {unit.stored_size:,})"
        )
    return stored


async def encode_part(
    unit: FileUnit, part: Part, body: bytes | bytearray, *, key: FrameKey | None
) -> bytes:
    """The stored bytes of a part of a multipart upload: whole frames."""
    coder = FileCoder(unit.coding, key)
    encode = functools.partial(
        coder.encode_part, unit.path, body, offset=part.offset, size=unit.size
    )
    return await anyio.to_thread.run_sync(encode)


def member_coders(
    build: ShardBuild, key: FrameKey | None
) -> Callable[[int], tuple[FileCoder, int] | None]:
    """Member n's coder and stored size (its tar entry's), None when stored as it is."""
    members, layout = build.unit.members, build.layout

    def coder_of(n: int) -> tuple[FileCoder, int] | None:
        coding = build.unit.coding_of(members[n].path)
        if coding.identity:
            return None
        return FileCoder(coding, key), layout.members[n].size

    return coder_of
