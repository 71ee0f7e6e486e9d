"""One writer per dataset prefix: the lease object `<prefix>/.s3xfer/lease.json`.

An upload that will write the manifest and catalog takes the lease first with a conditional
PUT (`If-None-Match: *` when there is none, `If-Match: <ETag>` to take over a released or
expired one), so that of two writers exactly one wins; the other stops with LeaseHeldError.
The holder renews it (`If-Match`) every third of its lifetime while it works, checks it once
more just before writing the manifest and catalog, and releases it at the end (a PUT marking
it released: every change of hands is a conditional PUT, none a blind delete).

A holder that crashed cannot release: its lease expires LEASE_SECONDS after its last renewal,
measured with the server's clock (its Last-Modified against the Date of the answer), so
clocks that disagree between machines do not matter. On the machine it ran on, a holder
known to be gone (its process no longer exists: same kernel boot and pid namespace, and no
process with its pid and start time) is taken over at once, so that running a killed upload
again resumes it without waiting. `--break-lease` takes it at once, whoever holds it.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import anyio

from ..checksums import crc32, crc32_to_base64
from ..dataset import validate
from ..dataset.keys import META_DIR, S3Url
from ..errors import (
    BadValue,
    IntegrityError,
    LeaseHeldError,
    NoSuchKeyError,
    S3XferError,
    first_error,
)
from ..transport.retry import RetryCount, RetryPolicy, call_with_retries
from ..transport.s3 import S3

LEASE_FORMAT = "s3xfer-lease"
LEASE_VERSION = 1
LEASE_SECONDS = 300  # how long a lease holds without renewal: a killed writer blocks this long
MAX_LEASE_SECONDS = 24 * 3600  # a lease object claiming longer is read as claiming this
_TAKE_ATTEMPTS = 5  # the lease changed hands between looking at it and taking it: look again


def lease_key(dest: S3Url) -> str:
    return dest.key(f"{META_DIR}/lease.json")


def _this_machine() -> str:
    """What makes a pid mean one process: the kernel's boot and the pid namespace (containers
    share a kernel, and may share a host name). Empty where /proc does not say."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot:
            return f"{boot.read().strip()} {os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def _process_start(pid: int) -> int | None:
    """When process pid started (clock ticks since boot), or None when there is no such
    process (or /proc does not say)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read()
    except OSError:
        return None
    # After the command name, which is in parentheses and may hold spaces and parentheses.
    return int(fields[fields.rindex(")") + 2 :].split()[19])


@dataclass(frozen=True)
class LeaseInfo:
    """What the lease object says: who holds it, and for how long after each renewal."""

    token: str  # random: tells this holder from any other, even on the same host and pid
    host: str
    pid: int
    command: str
    started: float  # the holder's clock, seconds since the epoch: for people, not for expiry
    seconds: int = LEASE_SECONDS
    released: bool = False
    machine: str = ""  # _this_machine() of the holder: whether its pid can be checked here
    pid_start: int = 0  # _process_start(pid) of the holder

    @classmethod
    def for_this_process(cls, command: str) -> LeaseInfo:
        pid = os.getpid()
        return cls(
            token=secrets.token_hex(16),
            host=socket.gethostname(),
            pid=pid,
            command=command,
            started=time.time(),
            machine=_this_machine(),
            pid_start=_process_start(pid) or 0,
        )

    @property
    def gone(self) -> bool:
        """Its holder ran on this machine and its process is no more (a pid reused since
        counts as gone: the start time tells). False whenever that cannot be known."""
        if not self.machine or self.machine != _this_machine() or not self.pid_start:
            return False
        return _process_start(self.pid) != self.pid_start

    def to_bytes(self) -> bytes:
        data = {"format": LEASE_FORMAT, "version": LEASE_VERSION, **self.__dict__}
        return json.dumps(data, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_bytes(cls, raw: bytes) -> LeaseInfo:
        """Raises BadValue on anything this version did not write."""
        data = validate.json_object(raw)
        validate.envelope(data, format=LEASE_FORMAT, version=LEASE_VERSION)
        started = validate.field(data, "started")
        if not isinstance(started, int | float) or isinstance(started, bool):
            raise BadValue(f"started is not a number: {started!r:.40}")
        released = validate.field(data, "released")
        if not isinstance(released, bool):
            raise BadValue(f"released is not true or false: {released!r:.40}")
        return cls(
            token=validate.text(validate.field(data, "token"), "token", max_bytes=64),
            host=validate.text(validate.field(data, "host"), "host", max_bytes=256),
            pid=validate.integer(validate.field(data, "pid"), "pid", low=0, high=2**32),
            command=validate.text(validate.field(data, "command"), "command", max_bytes=64),
            started=float(started),
            seconds=validate.integer(
                validate.field(data, "seconds"), "seconds", low=0, high=MAX_LEASE_SECONDS
            ),
            released=released,
            machine=validate.text(
                validate.field(data, "machine"), "machine", max_bytes=256, empty=True
            ),
            pid_start=validate.integer(
                validate.field(data, "pid_start"), "pid_start", low=0, high=2**63
            ),
        )

    def describe(self) -> str:
        since = datetime.fromtimestamp(self.started, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"`s3xfer {self.command}` on {self.host}, pid {self.pid}, since {since}"


@dataclass(frozen=True)
class Found:
    """The lease object as it is now."""

    etag: str
    info: LeaseInfo | None  # None: not a lease this version can read (it still expires)
    age: float  # seconds since it was last written, by the server's clock

    @property
    def lifetime(self) -> int:
        return self.info.seconds if self.info is not None else LEASE_SECONDS

    @property
    def free(self) -> bool:
        """Released by its holder, not renewed in time, or held by a process of this
        machine that is no more."""
        if self.info is not None and (self.info.released or self.info.gone):
            return True
        return self.age >= self.lifetime


def _http_date(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    try:
        return email.utils.parsedate_to_datetime(value) if isinstance(value, str) else None
    except (TypeError, ValueError):
        return None


def server_age(head: dict[str, Any]) -> float:
    """Seconds between the object's Last-Modified and the Date of the HEAD's answer: the
    server's clock on both sides (this machine's when the server sends no Date; 0 when it
    sends no Last-Modified, and the lease then lasts until released or broken)."""
    modified = _http_date(head.get("LastModified"))
    if modified is None:
        return 0.0
    now = _http_date(head.get("Date")) or datetime.now(UTC)
    return (now - modified).total_seconds()


class Lease:
    """A lease this process holds (see held)."""

    def __init__(
        self,
        s3: S3,
        dest: S3Url,
        info: LeaseInfo,
        etag: str,
        *,
        policy: RetryPolicy,
        on_retry: RetryCount | None = None,
    ) -> None:
        self.s3 = s3
        self.dest = dest
        self.key = lease_key(dest)
        self.info = info
        self.etag = etag
        self.policy = policy
        self.on_retry = on_retry
        self.renewals = 0

    def __repr__(self) -> str:
        return (
            f"<Lease s3://{self.dest.bucket}/{self.key} etag={self.etag} renewals={self.renewals}>"
        )

    async def renew(self) -> None:
        """Hold it for another `seconds` from now. LeaseHeldError when it is no longer ours
        (broken, or taken over after it expired)."""
        etag = await _put(
            self.s3,
            self.dest,
            self.info,
            if_match=self.etag,
            policy=self.policy,
            on_retry=self.on_retry,
        )
        if etag is None:
            found = await look(self.s3, self.dest, policy=self.policy, on_retry=self.on_retry)
            if found is None or found.info is None or found.info.token != self.info.token:
                holder = found.info.describe() if found and found.info else "nobody now"
                raise LeaseHeldError(
                    f"lost the lease of {self.dest} (s3://{self.dest.bucket}/{self.key}) to "
                    f"{holder}: nothing more written; run again once it is done"
                )
            etag = found.etag  # our own renewal, answered late and sent again
        self.etag = etag
        self.renewals += 1

    async def confirm(self) -> None:
        """Renew just before writing the manifest and catalog: still ours, for a full lease
        period. Also reads it back, for servers that ignore conditional PUTs."""
        await self.renew()
        found = await look(self.s3, self.dest, policy=self.policy, on_retry=self.on_retry)
        if found is None or found.info is None or found.info.token != self.info.token:
            raise LeaseHeldError(
                f"another s3xfer wrote the lease of {self.dest} meanwhile (this server may not "
                "honour conditional PUTs): nothing more written; run again once it is done"
            )

    async def keep_renewed(self) -> None:
        """Renew every third of the lifetime until cancelled. Raises LeaseHeldError when the
        lease was lost; another failure is left for the next renewal or for confirm."""
        while True:
            await anyio.sleep(self.info.seconds / 3)
            try:
                await self.renew()
            except LeaseHeldError:
                raise
            except S3XferError:
                continue

    async def release(self) -> None:
        """Mark it released, if it is still ours; any failure leaves it to expire."""
        released = replace(self.info, released=True)
        with contextlib.suppress(S3XferError):
            await _put(
                self.s3,
                self.dest,
                released,
                if_match=self.etag,
                policy=self.policy,
                on_retry=self.on_retry,
            )


async def _put(
    s3: S3,
    dest: S3Url,
    info: LeaseInfo,
    *,
    if_match: str | None,
    policy: RetryPolicy,
    on_retry: RetryCount | None = None,
) -> str | None:
    """Write the lease only if it is absent (if_match None) or still has the ETag if_match:
    its new ETag, or None when the condition did not hold."""
    body = info.to_bytes()
    try:
        return await call_with_retries(
            lambda: s3.put_object(
                dest.bucket,
                lease_key(dest),
                body,
                crc32=crc32_to_base64(crc32(body)),
                if_none_match=if_match is None,
                if_match=if_match,
            ),
            policy=policy,
            on_retry=on_retry,
        )
    except IntegrityError:  # s3.py's name for 412 Precondition Failed
        return None


async def look(
    s3: S3, dest: S3Url, *, policy: RetryPolicy, on_retry: RetryCount | None = None
) -> Found | None:
    """The lease object now, or None when there is none."""
    key = lease_key(dest)
    try:
        head = await call_with_retries(
            lambda: s3.head_object(dest.bucket, key), policy=policy, on_retry=on_retry
        )
        etag = str(head.get("ETag", ""))
        body, _status, _range = await call_with_retries(
            lambda: s3.get_range(dest.bucket, key, byte_range=None, if_match=etag or None),
            policy=policy,
            on_retry=on_retry,
        )
    except (NoSuchKeyError, IntegrityError):  # gone, or changed since the HEAD: look again
        return None
    try:
        info: LeaseInfo | None = LeaseInfo.from_bytes(body)
    except BadValue:
        info = None
    return Found(etag, info, server_age(head))


async def acquire(
    s3: S3,
    dest: S3Url,
    *,
    policy: RetryPolicy,
    command: str,
    break_lease: bool = False,
    on_retry: RetryCount | None = None,
) -> Lease:
    """Take the lease of dest: when there is none, when its holder released it or let it
    expire, or (break_lease) whoever holds it. LeaseHeldError when another holds it."""
    info = LeaseInfo.for_this_process(command)
    for _ in range(_TAKE_ATTEMPTS):
        found = await look(s3, dest, policy=policy, on_retry=on_retry)
        if found is not None and found.info is not None and found.info.token == info.token:
            # Our own take, answered late and sent again.
            return Lease(s3, dest, info, found.etag, policy=policy, on_retry=on_retry)
        if found is not None and not (found.free or break_lease):
            holder = found.info.describe() if found.info is not None else "an unreadable lease"
            left = max(0, round(found.lifetime - found.age))
            raise LeaseHeldError(
                f"another s3xfer is writing {dest} ({holder}): wait for it to finish; if it "
                f"was killed, its lease expires in {left} s, or run again with --break-lease"
            )
        etag = await _put(
            s3,
            dest,
            info,
            if_match=found.etag if found else None,
            policy=policy,
            on_retry=on_retry,
        )
        if etag is not None:
            return Lease(s3, dest, info, etag, policy=policy, on_retry=on_retry)
    raise LeaseHeldError(
        f"the lease of {dest} (s3://{dest.bucket}/{lease_key(dest)}) changed hands "
        f"{_TAKE_ATTEMPTS} times while this s3xfer tried to take it: run again later"
    )


@contextlib.asynccontextmanager
async def held(
    s3: S3,
    dest: S3Url,
    *,
    policy: RetryPolicy,
    command: str,
    break_lease: bool = False,
    on_retry: RetryCount | None = None,
) -> AsyncIterator[Lease]:
    """The lease of dest, renewed in the background while the block runs and released when
    it ends (however it ends). A lost lease cancels the block with LeaseHeldError. Retries
    of its requests are counted by on_retry."""
    lease = await acquire(
        s3, dest, policy=policy, command=command, break_lease=break_lease, on_retry=on_retry
    )
    try:
        with first_error():
            async with anyio.create_task_group() as group:
                group.start_soon(lease.keep_renewed)
                yield lease
                group.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await lease.release()
