"""A plan as a file: written atomically (gzip-compressed when the name ends in .gz) and read
back with one clear line for a file that is missing, not a plan, or corrupt. The file I/O of
planning lives here so that `plan.py` stays pure."""

from __future__ import annotations

import json
from pathlib import Path

from ..dataset import validate
from ..errors import BadValue, UsageError
from .plan import Plan


def save_plan(plan: Plan, path: Path) -> None:
    """Write atomically; a name ending in .gz is gzip-compressed."""
    text = json.dumps(plan.to_json(), separators=(",", ":"), ensure_ascii=False)
    payload = text.encode("utf-8")
    if path.suffix == ".gz":
        payload = validate.compress_bounded(payload)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(payload)
    tmp.replace(path)


def load_plan(path: Path) -> Plan:
    """The plan in the file at path (gzip-compressed or not)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read plan {path}: {exc.strerror or exc}") from exc
    try:
        if raw[:2] == b"\x1f\x8b":
            raw = validate.gunzip(raw)
        data = validate.json_object(raw)
    except BadValue as exc:
        raise UsageError(f"corrupt plan file {path}: {exc}") from exc
    return Plan.from_json(data, where=f"plan file {path}")
