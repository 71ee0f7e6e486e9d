"""Named profiles: the settings a bench run recommends, kept under $S3XFER_HOME for
`--bench-profile NAME`, and what they set for each command.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .settings import OP_RANGE
from .stats import OP_GET, OP_MULTIPART, OP_PUT, Recommendation

PROFILE_DIR_ENV = "S3XFER_HOME"
_PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def profiles_dir() -> Path:
    """Where named profiles live: $S3XFER_HOME/profiles, else $XDG_CONFIG_HOME/s3xfer/profiles,
    else ~/.config/s3xfer/profiles."""
    home = os.environ.get(PROFILE_DIR_ENV)
    if home:
        return Path(home) / "profiles"
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "s3xfer" / "profiles"


def profile_path(name: str) -> Path:
    """The file of profile `name`; the name must be a plain file name (no path separators)."""
    if not _PROFILE_NAME.fullmatch(name):
        raise UsageError(
            f"bad profile name {name!r}: use letters, digits, '.', '_' and '-' "
            "(at most 100, not starting with '.' or '-')"
        )
    return profiles_dir() / f"{name}.json"


def save_profile(
    name: str, recommendation: Recommendation, *, source: dict[str, Any] | None = None
) -> Path:
    """Store `recommendation` as profile `name` (replacing it atomically); returns the path.

    `source` describes what was measured (endpoint, emulated path, sweep) for the reader;
    it must hold no credentials.
    """
    path = profile_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        **recommendation.to_json(),
        "name": name,
        "saved_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": source or {},
    }
    # Written beside the target and renamed, so a reader never sees half a profile.
    fd, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=2)
            handle.write("\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load_profile(name: str) -> Recommendation:
    path = profile_path(name)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(
            f"no bench profile named {name!r} (looked for {path}); "
            f"create it with: s3xfer bench s3://bucket/prefix --save {name}"
        ) from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read bench profile {path}: {exc}") from exc
    try:
        return Recommendation.from_json(data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UsageError(f"bench profile {path} is not valid: {exc}") from exc


PROFILE_COMMANDS = ("upload", "plan", "get", "download")


def settings_for(recommendation: Recommendation, *, command: str) -> dict[str, int]:
    """The options of `command` a profile sets, keyed by option name; only measured ones.

    upload / plan: "concurrency" (the larger of the put and multipart knees: one upload
    carries both kinds, and too few requests in flight cost more than a few too many) and
    "part_size". get: "concurrency" from ranged GETs (how `get` reads members), else whole
    GETs, and "range_size"; download prefers whole GETs. Options the user gives explicitly
    should win over these.
    """
    if command not in PROFILE_COMMANDS:
        raise UsageError(f"bench profiles apply to {', '.join(PROFILE_COMMANDS)}, not {command}")
    known = recommendation.concurrency
    settings: dict[str, int] = {}
    if command in ("upload", "plan"):
        upload = [known[op] for op in (OP_PUT, OP_MULTIPART) if op in known]
        if upload:
            settings["concurrency"] = max(upload)
        if recommendation.part_size is not None:
            settings["part_size"] = recommendation.part_size
        return settings
    order = (OP_RANGE, OP_GET) if command == "get" else (OP_GET, OP_RANGE)
    read = next((known[op] for op in order if op in known), None)
    if read is not None:
        settings["concurrency"] = read
    if recommendation.range_size is not None:
        settings["range_size"] = recommendation.range_size
    return settings


def profile_settings(name: str, *, command: str = "upload") -> dict[str, int]:
    """What `--bench-profile NAME` sets for `command` (see settings_for)."""
    return settings_for(load_profile(name), command=command)
