"""The upload journal: progress written down as it happens, so that an upload killed at any
moment (kill -9, a reclaimed spot instance) resumes instead of starting over.

One append-only file per (source, destination) pair, under the state directory
(`$S3XFER_STATE_DIR`, else `$XDG_STATE_HOME/s3xfer`, else `~/.local/state/s3xfer`), in
`journals/<hash>.jsonl`. Each line is `<crc32 as 8 hex> <json>`, written with one `write`
call, so a line is either whole or detectably torn; reading stops at the first bad line and the
file is cut back to the good part before anything is appended. Only what the journal says is
done is skipped on resume, so losing lines only means redoing work, never losing data.

Lines (field `e`):
  run    the header: format version, source, destination
  mpu    a multipart upload was created: key, upload id, and what it uploads (with the file's
         identity, `ident`: device, inode, size, mtime, ctime, mode; journals written before
         it existed lack it, and their uploads resume with each part checked by its bytes)
  part   a part was acknowledged: upload id, number, ETag, CRC32, length
  closed a multipart upload was completed or aborted
  file   a file is stored as its own object: its manifest record
  shard  a shard and its index are stored: the shard record and its members' records

The journal holds no credentials: keys, upload ids and checksums only. It is removed once
the manifest of a finished run has been written.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checksums import crc32
from ..dataset.manifest import ManifestRecord, ShardRecord
from ..errors import UsageError
from ..localfs import FileIdentity

JOURNAL_FORMAT = "s3xfer-journal"
JOURNAL_VERSION = 1
STATE_DIR_ENV = "S3XFER_STATE_DIR"
SHARD_ROWS_AT_ONCE = 10_000  # members of a finished shard encoded at once (shard_done)
FSYNC_INTERVAL = 1.0  # seconds between syncs by the engine: what a machine crash may lose


def default_state_dir() -> Path:
    explicit = os.environ.get(STATE_DIR_ENV)
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "s3xfer"


def journal_path(source: Path, dest: str, *, state_dir: Path | None = None) -> Path:
    """Where the journal of uploading `source` to `dest` lives (one per pair)."""
    identity = f"{source.resolve()}\0{dest}".encode()
    base = state_dir if state_dir is not None else default_state_dir()
    return base / "journals" / f"{hashlib.sha256(identity).hexdigest()[:24]}.jsonl"


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def encode_line(event: dict[str, Any]) -> bytes:
    text = _dumps(event).encode("utf-8")
    return b"%08x %s\n" % (crc32(text), text)


def decode_line(line: bytes) -> dict[str, Any] | None:
    """The event of one whole line (newline included), or None when it is torn or damaged."""
    if len(line) < 10 or not line.endswith(b"\n") or line[8:9] != b" ":
        return None
    text = line[9:-1]
    try:
        if int(line[:8], 16) != crc32(text):
            return None
        event = json.loads(text)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


@dataclass
class OpenUpload:
    """A multipart upload the journal saw created and not yet closed."""

    key: str
    upload_id: str
    path: str | None  # the file it uploads; None for a shard
    size: int
    mtime_ns: int
    part_size: int
    parts: dict[int, tuple[str, int, int]] = field(default_factory=dict)  # n → etag, crc, len
    identity: FileIdentity | None = None  # of the file when the upload was created


@dataclass
class JournalState:
    """What a journal says was done: the pure result of replaying its lines."""

    records: dict[str, ManifestRecord] = field(default_factory=dict)
    shards: dict[str, ShardRecord] = field(default_factory=dict)
    uploads: dict[str, OpenUpload] = field(default_factory=dict)  # by upload id

    def apply(self, event: dict[str, Any]) -> None:
        kind = event.get("e")
        if kind == "file":
            record = ManifestRecord.from_json(event["r"])
            self.records[record.path] = record
        elif kind == "shard":
            shard = ShardRecord.from_json(event["s"])
            self.shards[shard.key] = shard
            for row in event["r"]:
                record = ManifestRecord.from_json(row)
                self.records[record.path] = record
        elif kind == "mpu":
            self.uploads[event["id"]] = OpenUpload(
                key=str(event["key"]),
                upload_id=str(event["id"]),
                path=event.get("path"),
                size=int(event["size"]),
                mtime_ns=int(event["mtime_ns"]),
                part_size=int(event["part_size"]),
                identity=FileIdentity.from_json(event["ident"]) if "ident" in event else None,
            )
        elif kind == "part":
            upload = self.uploads.get(event["id"])
            if upload is not None:
                upload.parts[int(event["n"])] = (
                    str(event["etag"]),
                    int(event["crc"]),
                    int(event["len"]),
                )
        elif kind == "closed":
            self.uploads.pop(event["id"], None)

    def open_upload_for(
        self, path: str, *, key: str, size: int, mtime_ns: int, part_size: int
    ) -> OpenUpload | None:
        """The newest open upload of this very file version, in this very shape."""
        found = None
        for upload in self.uploads.values():
            if (upload.path, upload.key, upload.size, upload.mtime_ns, upload.part_size) == (
                path,
                key,
                size,
                mtime_ns,
                part_size,
            ):
                found = upload
        return found


@dataclass(frozen=True)
class Replay:
    state: JournalState
    good_bytes: int  # length of the valid prefix of the file
    damaged_at: int | None  # line number (from 1) of the first bad line, if any but a torn tail
    header: dict[str, Any] | None


def replay(raw: bytes) -> Replay:
    """Replay a journal's bytes; stop at the first line that is torn or damaged."""
    state = JournalState()
    header: dict[str, Any] | None = None
    position = 0
    number = 0
    damaged_at = None
    while position < len(raw):
        end = raw.find(b"\n", position)
        line = raw[position : end + 1] if end >= 0 else raw[position:]
        number += 1
        event = decode_line(line)
        if event is None or (number == 1) != (event.get("e") == "run"):
            # A tail without its newline is the normal trace of a crash mid-write; a whole line
            # that does not check out is damage.
            if end >= 0:
                damaged_at = number
            break
        try:
            if number == 1:
                header = event
            else:
                state.apply(event)
        except (KeyError, TypeError, ValueError):
            damaged_at = number
            break
        position = end + 1
    return Replay(state, position, damaged_at, header)


class Journal:
    """The open journal of one upload: replayed state, and an append-only file, locked so that
    two uploads of the same source to the same destination cannot interleave."""

    def __init__(self, path: Path, fd: int, state: JournalState, warnings: list[str]) -> None:
        self.path = path
        self._fd = fd
        self.state = state
        self.warnings = warnings  # one line each, for the user
        self._dirty = False
        self.resumed = False  # set when an earlier, interrupted run left this journal

    def __repr__(self) -> str:
        s = self.state
        return (
            f"<Journal {self.path.name} files={len(s.records)} shards={len(s.shards)} "
            f"open_uploads={len(s.uploads)}>"
        )

    @classmethod
    def open(cls, path: Path, *, source: Path, dest: str) -> Journal:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise UsageError(f"cannot open the upload journal {path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(
                f"another s3xfer upload of {source} to {dest} is running (journal {path} is locked)"
            ) from None
        try:
            journal = cls._load(path, fd, source=source, dest=dest)
        except BaseException:
            os.close(fd)
            raise
        return journal

    @classmethod
    def _load(cls, path: Path, fd: int, *, source: Path, dest: str) -> Journal:
        raw = _read_all(fd)
        result = replay(raw)
        warnings: list[str] = []
        header = result.header
        state = result.state
        good = result.good_bytes
        expected = {"format": JOURNAL_FORMAT, "version": JOURNAL_VERSION, "dest": dest}
        if header is not None and any(header.get(k) != v for k, v in expected.items()):
            warnings.append(f"journal {path} is not for this upload; starting it afresh")
            state, good = JournalState(), 0
        elif result.damaged_at is not None:
            warnings.append(
                f"journal {path} is damaged at line {result.damaged_at}; "
                "what it recorded after that will be redone"
            )
        if good < len(raw):
            os.ftruncate(fd, good)  # appending after a torn line would glue two lines together
        journal = cls(path, fd, state, warnings)
        journal.resumed = good > 0
        if good == 0:
            journal.write({"e": "run", **expected, "source": str(source)})
        return journal

    def write(self, event: dict[str, Any]) -> None:
        """Append one event with one write call: whole or torn, never interleaved. It is in the
        page cache at once (a killed process loses nothing); `sync` makes it survive a machine
        crash, and may block, so callers on an event loop run it in a worker thread."""
        os.write(self._fd, encode_line(event))
        self._dirty = True

    def sync(self) -> None:
        """fsync what was written. Safe beside writes from another thread: the flag is cleared
        first, so a line written meanwhile marks the journal dirty again."""
        if self._dirty:
            self._dirty = False
            os.fsync(self._fd)

    # The events, named.
    def multipart_created(
        self,
        *,
        key: str,
        upload_id: str,
        path: str | None,
        size: int,
        mtime_ns: int,
        part_size: int,
        identity: FileIdentity | None = None,
    ) -> None:
        event: dict[str, Any] = {
            "e": "mpu",
            "key": key,
            "id": upload_id,
            "path": path,
            "size": size,
            "mtime_ns": mtime_ns,
            "part_size": part_size,
        }
        if identity is not None:
            event["ident"] = identity.to_json()
        self.write(event)

    def part_done(self, *, upload_id: str, number: int, etag: str, crc: int, length: int) -> None:
        self.write(
            {"e": "part", "id": upload_id, "n": number, "etag": etag, "crc": crc, "len": length}
        )

    def multipart_closed(self, upload_id: str) -> None:
        self.write({"e": "closed", "id": upload_id})

    def file_done(self, record: ManifestRecord) -> None:
        self.write({"e": "file", "r": record.to_json()})

    def shard_done(self, shard: ShardRecord, members: Sequence[ManifestRecord]) -> None:
        """The line of {"e": "shard", "s": shard, "r": members} (byte for byte what write()
        gives it), made and written SHARD_ROWS_AT_ONCE members at a time: the line of a
        shard of 100,000 members, its rows and its copies were about 60 MB at once, while
        the next shard's parts filled the byte budget."""
        head = '{"e":"shard","s":' + _dumps(shard.to_json()) + ',"r":['

        def pieces() -> Iterator[bytes]:
            yield head.encode("utf-8")
            for start in range(0, len(members), SHARD_ROWS_AT_ONCE):
                rows = _dumps([m.to_json() for m in members[start : start + SHARD_ROWS_AT_ONCE]])
                yield ("," if start else "").encode() + rows[1:-1].encode("utf-8")
            yield b"]}"

        self._write_pieces(pieces)

    def _write_pieces(self, pieces: Callable[[], Iterable[bytes]]) -> None:
        """One line of the concatenation of pieces(), called twice (its CRC leads the line):
        several write calls, so a crash between them leaves a torn last line, which reading
        drops as it drops a line torn in one write (decode_line)."""
        check = 0
        for piece in pieces():
            check = crc32(piece, check)
        os.write(self._fd, b"%08x " % check)
        for piece in pieces():
            os.write(self._fd, piece)
        os.write(self._fd, b"\n")
        self._dirty = True

    def close(self, *, remove: bool = False) -> None:
        """Close (and delete, once a finished run's manifest is written)."""
        if self._fd < 0:
            return
        try:
            if remove:
                self.path.unlink(missing_ok=True)
            else:
                self.sync()
        finally:
            os.close(self._fd)  # releases the lock
            self._fd = -1


def _read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)
