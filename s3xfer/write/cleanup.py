"""The `cleanup` command: the incomplete multipart uploads under a prefix older than an age,
whoever left them, aborted (or listed, in a dry run).

Selection (`select_stale`) and age parsing are pure; the listing and the aborts are
`incomplete.py`'s, which the engine and distributed jobs share.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..dataset.keys import S3Url
from ..errors import UsageError
from ..transport.retry import RetryPolicy
from ..transport.s3 import S3
from .incomplete import IncompleteUpload, abort_uploads, incomplete_uploads

_AGE = re.compile(r"^\s*(?P<number>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>[a-z]*)\s*$")
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> datetime.timedelta:
    """A duration from '90s', '30m', '2h', '7d', '1w' or '0'. A unit is required except for 0:
    a bare '30' could be minutes or days."""
    match = _AGE.match(text)
    if match is None:
        raise UsageError(f"cannot read duration {text!r}: expected a number and a unit, as 7d")
    number, unit = float(match["number"]), match["unit"]
    if not unit:
        if number == 0:
            return datetime.timedelta(0)
        raise UsageError(f"duration {text!r} needs a unit: s, m, h, d or w (as {text.strip()}d)")
    if unit not in _AGE_UNITS:
        raise UsageError(f"unknown unit {unit!r} in duration {text!r}; use s, m, h, d or w")
    return datetime.timedelta(seconds=number * _AGE_UNITS[unit])


def format_age(age: datetime.timedelta) -> str:
    """'45s', '12m', '3h 05m', '9d 04h': the two largest units, for a listing."""
    seconds = max(0, int(age.total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m"
    return f"{seconds}s"


def select_stale(
    uploads: Iterable[IncompleteUpload],
    now: datetime.datetime,
    older_than: datetime.timedelta,
) -> list[IncompleteUpload]:
    """The uploads initiated at least `older_than` before `now`, by key then age. A zero age
    selects every upload, even one a server clock ahead of ours dates from the future."""
    if older_than <= datetime.timedelta(0):
        selected = list(uploads)
    else:
        cutoff = now - older_than
        selected = [upload for upload in uploads if upload.initiated <= cutoff]
    return sorted(selected, key=lambda upload: (upload.key, upload.initiated, upload.upload_id))


@dataclass(frozen=True, slots=True)
class CleanupOutcome:
    upload: IncompleteUpload
    aborted: bool  # False in a dry run, or when the upload was already gone

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.upload.key,
            "upload_id": self.upload.upload_id,
            "initiated": self.upload.initiated.isoformat(),
            "aborted": self.aborted,
        }


@dataclass(frozen=True, slots=True)
class CleanupReport:
    url: S3Url
    checked_at: datetime.datetime
    older_than: datetime.timedelta
    dry_run: bool
    stale: tuple[CleanupOutcome, ...]  # the uploads old enough, in key order
    skipped_newer: int  # uploads under the prefix younger than older_than, left alone

    @property
    def aborted(self) -> int:
        return sum(outcome.aborted for outcome in self.stale)

    @property
    def already_gone(self) -> int:
        """Uploads completed or aborted by someone else between listing and aborting."""
        return 0 if self.dry_run else len(self.stale) - self.aborted

    def to_json(self) -> list[dict[str, Any]]:
        return [outcome.to_json() for outcome in self.stale]


async def cleanup(
    s3: S3,
    url: S3Url,
    *,
    older_than: datetime.timedelta,
    dry_run: bool,
    now: datetime.datetime | None = None,
    policy: RetryPolicy | None = None,
) -> CleanupReport:
    """List the incomplete multipart uploads under url and abort those at least older_than old
    (none with dry_run). Permanent errors (no such bucket, access denied) are raised."""
    policy = policy or RetryPolicy()
    await s3.check_bucket(url.bucket)
    uploads = await incomplete_uploads(s3, url, policy=policy)
    checked_at = now or datetime.datetime.now(datetime.UTC)
    stale = select_stale(uploads, checked_at, older_than)
    aborted = set() if dry_run else await abort_uploads(s3, url.bucket, stale, policy=policy)
    return CleanupReport(
        url=url,
        checked_at=checked_at,
        older_than=older_than,
        dry_run=dry_run,
        stale=tuple(CleanupOutcome(upload, upload.upload_id in aborted) for upload in stale),
        skipped_newer=len(uploads) - len(stale),
    )
