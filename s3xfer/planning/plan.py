"""Pure planning: which files become single PUTs or multipart uploads, their keys and part
sizes, and what the upload will cost. A plan is plain data (`Plan.to_json` / `from_json`):
saved and read back by `planfile.py`, executed later. No I/O here."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, overload

from ..config import (
    MAX_PART_SIZE,
    MAX_PARTS,
    MAX_PUT_SIZE,
    MAX_SHARD_MEMBERS,
    MIN_PART_SIZE,
    MiB,
    TransferConfig,
)
from ..config import format_size as _fmt
from ..dataset import validate
from ..dataset.coding import FRAME_SIZE, IDENTITY, Coding, stored_size
from ..dataset.keys import (
    META_DIR,
    RESERVED_REASON,
    S3Url,
    is_reserved_path,
    object_key,
    shard_index_key,
)
from ..dataset.tarpack import ShardLayout, ShardMember, member_footprint
from ..errors import BadValue, SourceError, UsageError
from .globs import NO_FILTER, PathFilter
from .survey import FileEntry, Problem, Survey

PLAN_FORMAT = "s3xfer-plan"
# Version 2: the plan of a filtered tree (--include/--exclude), written only then. An s3xfer
# that read it as version 1 would not know the filter, and delete the excluded files from the
# dataset when it made the dataset equal the tree.
PLAN_VERSION = 2
PLAN_VERSIONS = (1, 2)


class Kind(StrEnum):
    PUT = "put"
    MULTIPART = "multipart"
    PACK = "pack"  # packed into a tar shard (see ShardUnit)


@dataclass(frozen=True, slots=True)
class FileUnit:
    """One local file uploaded as one object."""

    kind: Kind
    path: str  # relative to the plan's source root, '/'-separated
    key: str
    size: int
    mtime_ns: int
    mode: int
    part_size: int  # 0 for a single PUT
    # How the file is stored: chosen when the upload runs (--encryption-key, --compress), not
    # planned; and its stored size when that depends on its content (compressed), else -1.
    coding: Coding = IDENTITY
    stored_size: int = -1

    @property
    def part_count(self) -> int:
        return math.ceil(self.size / self.part_size) if self.kind is Kind.MULTIPART else 1

    @property
    def request_count(self) -> int:
        # create + parts + complete for multipart uploads.
        return self.part_count + 2 if self.kind is Kind.MULTIPART else 1

    def to_json(self) -> list[Any]:
        return [
            self.kind.value,
            self.path,
            self.key,
            self.size,
            self.mtime_ns,
            self.mode,
            self.part_size,
        ]

    @classmethod
    def from_json(cls, row: Any) -> FileUnit:
        """A unit checked value by value (see validate.py); BadValue names what is wrong."""
        kind, path, key, size, mtime_ns, mode, part_size = validate.array(row, "unit", length=7)
        path = validate.relative_path(path, "unit path")
        what = f"unit {path!r}:"
        if kind not in (Kind.PUT, Kind.MULTIPART):
            raise BadValue(f"{what} kind {kind!r:.40} is not put or multipart")
        size = validate.size(size, f"{what} size")
        if is_reserved_path(path):
            raise BadValue(f"{what} path is {RESERVED_REASON}")
        return cls(
            Kind(kind),
            path,
            validate.object_key(key, f"{what} key"),
            size,
            validate.mtime_ns(mtime_ns, f"{what} mtime_ns"),
            validate.mode(mode, f"{what} mode"),
            validate.part_size(part_size, size, f"{what} part_size"),
        )


@dataclass(frozen=True, slots=True)
class Part:
    number: int  # 1-based, as S3 numbers them
    offset: int
    length: int


def parts_of(size: int, part_size: int) -> Iterator[Part]:
    """Consecutive parts covering [0, size) exactly; an empty file has one empty part."""
    if size == 0:
        yield Part(1, 0, 0)
        return
    for index, offset in enumerate(range(0, size, part_size)):
        yield Part(index + 1, offset, min(part_size, size - offset))


def fit_part_size(size: int, *, preferred: int, max_memory: int) -> int:
    """The part size for a file: the preferred one unless S3 limits force it larger.

    Like s3transfer's ChunksizeAdjuster: at least 5 MiB, at most 5 GiB, few enough parts
    (≤ 10,000); rounded up to whole MiB. One part must fit the memory budget.
    """
    part = max(preferred, MIN_PART_SIZE, math.ceil(size / MAX_PARTS))
    part = min(math.ceil(part / MiB) * MiB, MAX_PART_SIZE)
    if math.ceil(size / part) > MAX_PARTS:
        raise UsageError(f"a file of {_fmt(size)} is larger than S3 allows (5 TiB)")
    if part > max_memory:
        raise UsageError(
            f"a file of {_fmt(size)} needs parts of {_fmt(part)}, more than the memory "
            f"budget of {_fmt(max_memory)}: raise --max-memory"
        )
    return part


def classify(size: int, config: TransferConfig) -> Kind:
    if size >= config.multipart_threshold or size > MAX_PUT_SIZE:
        return Kind.MULTIPART
    if config.pack and size < config.pack_threshold:
        return Kind.PACK
    return Kind.PUT


class _ShardMembers(Sequence[ShardMember]):
    """A shard's FileEntry list seen as the ShardMembers its layout needs, each made when
    asked (the tar header's mtime is whole seconds)."""

    def __init__(
        self,
        entries: Sequence[FileEntry],
        coding: Coding = IDENTITY,
        compressed: Mapping[str, tuple[Coding, int]] | None = None,
    ) -> None:
        self._entries = entries
        self._coding = coding
        self._compressed = compressed or {}

    def __len__(self) -> int:
        return len(self._entries)

    @overload
    def __getitem__(self, index: int) -> ShardMember: ...
    @overload
    def __getitem__(self, index: slice) -> list[ShardMember]: ...
    def __getitem__(self, index: int | slice) -> ShardMember | list[ShardMember]:
        if isinstance(index, slice):
            return [self._member(m) for m in self._entries[index]]
        return self._member(self._entries[index])

    def __iter__(self) -> Iterator[ShardMember]:
        return map(self._member, self._entries)

    def _member(self, entry: FileEntry) -> ShardMember:
        # A coded member's tar entry holds its stored bytes (coding.py): its size follows
        # from the original's when the coding does not compress.
        measured = self._compressed.get(entry.path)
        coding = self._coding if measured is None else measured[0]
        if measured is not None:  # compressed when the upload began: its size as measured
            size: int | None = measured[1]
        else:
            size = entry.size if coding.identity else stored_size(entry.size, coding)
        if size is None:
            raise UsageError(f"{entry.path}: a compressed member needs its measured size")
        mtime = entry.mtime_ns // 1_000_000_000
        if coding.identity:
            return ShardMember(entry.path, size, mtime, entry.mode)
        return ShardMember(entry.path, size, mtime, entry.mode, coding.to_json(), entry.size)


@dataclass(frozen=True)  # no slots: the size is cached on the instance
class ShardUnit:
    """Small files streamed into one tar shard, uploaded as one multipart object."""

    key: str
    part_size: int
    members: list[FileEntry]
    # How members are stored: chosen when the upload runs (--encryption-key), not planned;
    # the members compressed (--compress), by path: their coding and measured stored size.
    coding: Coding = IDENTITY
    compressed: Mapping[str, tuple[Coding, int]] = field(default_factory=dict)

    def coding_of(self, path: str) -> Coding:
        measured = self.compressed.get(path)
        return self.coding if measured is None else measured[0]

    @property
    def coded(self) -> bool:
        return not self.coding.identity or bool(self.compressed)

    def layout(self) -> ShardLayout:
        """The shard's byte layout: a header size and offset per member, so it is not kept
        on the unit (a plan of a million files would hold one per file for the whole run):
        who needs it (the engine, while the shard is uploaded) holds it. Its members are a
        view of this unit's, not a ShardMember object each (14 MB a shard of 100,000)."""
        return ShardLayout(
            _ShardMembers(self.members, self.coding, self.compressed), shard_key=self.key
        )

    @property
    def size(self) -> int:
        """The shard's size in bytes, its layout's, computed once: planning, change detection
        and progress ask for it."""
        cached: int | None = self.__dict__.get("_size")
        if cached is None:
            cached = self.layout().size
            object.__setattr__(self, "_size", cached)  # frozen: set once, never changed
        return cached

    @property
    def index_key(self) -> str:
        """The shard's index, also stored beside it so a reader need not touch the shard."""
        return shard_index_key(self.key)

    def relaid(self, members: list[FileEntry], *, max_memory: int) -> ShardUnit:
        """This shard laid out again from its members as they are at upload time (some left
        out, some changed since planning): the same shard when nothing differs. Its key is
        the planned one with a digest of those members (named after its content, as planned
        keys are, so a unit run twice over files that changed in between never writes two
        layouts under one key), and stays derivable from the planned key (UploadKeys).
        Raises UsageError when the parts no longer fit S3's limits."""
        if members == self.members:
            return self
        key = f"{self.key.removesuffix('.tar')}-{_content_digest(members)}.tar"
        # A compressed member that changed since it was measured is stored uncompressed.
        planned = set(self.members) if self.compressed else set()
        compressed = {
            m.path: self.compressed[m.path]
            for m in members
            if m in planned and m.path in self.compressed
        }
        size = ShardUnit("", 0, members, self.coding, compressed).layout().size
        part_size = fit_part_size(size, preferred=self.part_size, max_memory=max_memory)
        return ShardUnit(key, part_size, members, self.coding, compressed)

    def with_coding(
        self, coding: Coding, compressed: Mapping[str, tuple[Coding, int]] | None = None
    ) -> ShardUnit:
        """This shard with its members stored under `coding` (or as `compressed` says, for
        the members it names), named apart from the shard of the same members stored
        otherwise (the planned key with a digest of the members and their codings, the way
        `relaid` names): one never writes over the other."""
        table = compressed or {}
        mine = {m.path: table[m.path] for m in self.members if m.path in table}
        if coding == self.coding and mine == self.compressed:
            return self
        digest = _content_digest(self.members, coding, mine)
        key = f"{self.key.removesuffix('.tar')}-{digest}.tar"
        return ShardUnit(key, self.part_size, self.members, coding, mine)

    def to_json(self) -> list[Any]:
        return [self.key, self.part_size, [m.to_json() for m in self.members]]

    @classmethod
    def from_json(cls, row: Any) -> ShardUnit:
        key, part_size, members = validate.array(row, "shard", length=3)
        key = validate.object_key(key, "shard key")
        entries = [FileEntry.from_json(m) for m in validate.array(members, f"members of {key!r}")]
        for entry in entries:
            validate.mtime_ns(entry.mtime_ns, f"member {entry.path!r}: mtime_ns")
            validate.size(entry.size, f"member {entry.path!r}: size")
        if not 0 < len(entries) <= MAX_SHARD_MEMBERS:
            raise BadValue(f"shard {key!r} has {len(entries)} members")
        shard = cls(
            key,
            validate.integer(
                part_size, f"shard {key!r}: part_size", low=MIN_PART_SIZE, high=MAX_PART_SIZE
            ),
            entries,
        )
        validate.part_size(shard.part_size, shard.size, f"shard {key!r}: part_size")
        return shard


def shard_key(dest: S3Url, members: Iterable[FileEntry]) -> str:
    """Named after its content (every member's path, size, mtime and mode): deterministic, so
    a re-run finds an unchanged shard, and a changed shard gets a new key instead of being
    written over the old one, which stays valid for the manifest that refers to it until a
    new manifest is written (and is deleted then, once nothing refers to it). A hashed
    prefix spreads the load over S3's partitions."""
    name = _content_digest(members)
    return dest.key(f"{META_DIR}/shards/{name[:4]}/{name}.tar")


def _content_digest(
    members: Iterable[FileEntry],
    coding: Coding = IDENTITY,
    compressed: Mapping[str, tuple[Coding, int]] | None = None,
) -> str:
    digest = hashlib.blake2b(digest_size=8)
    if not coding.identity:
        digest.update(f"coding {coding.to_json()}\n".encode("ascii"))
    for path, (member_coding, size) in sorted((compressed or {}).items()):
        line = json.dumps([path, member_coding.to_json(), size], ensure_ascii=False)
        digest.update(f"compressed {line}\n".encode())
    for member in members:
        path = member.path
        if path.isascii() and path.isprintable() and '"' not in path and "\\" not in path:
            # What json.dumps writes for it (the keys of every stored shard depend on it),
            # written out directly: a tenth of the time, for every file of a plan.
            line = f'["{path}", {member.size:d}, {member.mtime_ns:d}, {member.mode:d}]\n'
            digest.update(line.encode("ascii"))
        else:
            digest.update(json.dumps(member.to_json(), ensure_ascii=False).encode("utf-8") + b"\n")
    return digest.hexdigest()


_RELAID_SUFFIX = re.compile(r"-[0-9a-f]{16}\.tar$")


@dataclass(frozen=True)
class UploadKeys:
    """The keys a run writes with multipart uploads, for finding the uploads it left behind:
    the planned ones, and any re-laid variant of a planned shard key (ShardUnit.relaid)."""

    keys: frozenset[str]

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        return key in self.keys or _RELAID_SUFFIX.sub(".tar", key) in self.keys


def _soft_cut(path: str) -> bool:
    # One path in 16, by hash: shard boundaries fall on the same paths run after run, so adding
    # or removing a file re-uploads its own shard, not every shard after it.
    return hashlib.blake2b(path.encode("utf-8"), digest_size=2).digest()[0] % 16 == 0


def shard_groups(
    entries: Iterable[FileEntry], config: TransferConfig
) -> Iterator[tuple[list[FileEntry], list[int]]]:
    """Consecutive (sorted, so neighbouring) small files cut into shards of about
    shard_size: each shard's members and their footprints (header, data, padding), one shard
    at a time."""
    members: list[FileEntry] = []
    footprints: list[int] = []
    filled = 0
    for entry in entries:
        footprint = member_footprint(entry.path, entry.size)
        full = filled + footprint > config.shard_size or len(members) >= MAX_SHARD_MEMBERS
        soft = filled >= config.shard_size * 3 // 4 and _soft_cut(entry.path)
        if members and (full or soft):
            yield members, footprints
            members, footprints = [], []
            filled = 0
        members.append(entry)
        footprints.append(footprint)
        filled += footprint
    if members:
        yield members, footprints


def group_into_shards(
    entries: Iterable[FileEntry], dest: S3Url, config: TransferConfig
) -> Iterator[ShardUnit]:
    """Consecutive (sorted, so neighbouring) small files into shards of about shard_size."""
    for members, _footprints in shard_groups(entries, config):
        size = ShardUnit("", 0, members).layout().size
        part = fit_part_size(size, preferred=config.part_size, max_memory=config.max_memory)
        yield ShardUnit(shard_key(dest, members), part, members)


def plan_file(entry: FileEntry, dest: S3Url, config: TransferConfig) -> FileUnit:
    kind = classify(entry.size, config)
    part_size = (
        fit_part_size(entry.size, preferred=config.part_size, max_memory=config.max_memory)
        if kind is Kind.MULTIPART
        else 0
    )
    return FileUnit(
        kind=kind,
        path=entry.path,
        key=object_key(dest, entry.path, style=config.key_prefix),
        size=entry.size,
        mtime_ns=entry.mtime_ns,
        mode=entry.mode,
        part_size=part_size,
    )


@dataclass(frozen=True, slots=True)
class Estimate:
    objects: int  # objects written (a shard counts once)
    files: int
    packed_files: int
    shards: int
    single_puts: int
    multipart_uploads: int
    parts: int
    requests: int
    bytes: int
    request_cost_usd: float
    storage_cost_usd_month: float

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def estimate(
    units: Iterable[FileUnit], shards: Iterable[ShardUnit], config: TransferConfig
) -> Estimate:
    objects = puts = multipart = parts = requests = total = packed = shard_count = 0
    stored = 0
    for shard in shards:
        size = shard.size
        shard_parts = math.ceil(size / shard.part_size)
        shard_count += 1
        packed += len(shard.members)
        total += sum(m.size for m in shard.members)
        stored += size
        parts += shard_parts
        requests += shard_parts + 3  # create, parts, complete, the index beside it
    loose_bytes = 0
    for unit in units:
        objects += 1
        total += unit.size
        loose_bytes += unit.size
        requests += unit.request_count
        if unit.kind is Kind.MULTIPART:
            multipart += 1
            parts += unit.part_count
        else:
            puts += 1
    requests += 2  # read the previous manifest, write the new one
    prices = config.prices
    return Estimate(
        objects=objects + shard_count,
        files=objects + packed,
        packed_files=packed,
        shards=shard_count,
        single_puts=puts,
        multipart_uploads=multipart,
        parts=parts,
        requests=requests,
        bytes=total,
        # Every upload request (PUT, POST, UploadPart) is billed at the PUT rate.
        request_cost_usd=requests * prices.put_per_1000 / 1000,
        storage_cost_usd_month=(stored + loose_bytes) / 1e9 * prices.storage_gb_month,
    )


@dataclass(frozen=True)
class Plan:
    source: Path
    dest: S3Url
    config: TransferConfig
    units: list[FileUnit]
    shards: list[ShardUnit] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    # The --include/--exclude the tree was surveyed with: the upload makes the dataset equal
    # the selected files, and leaves the dataset's files outside the selection alone.
    selection: PathFilter = NO_FILTER

    @property
    def estimate(self) -> Estimate:
        return estimate(self.units, self.shards, self.config)

    def coded(
        self, coding: Coding, compressed: Mapping[str, tuple[Coding, int]] | None = None
    ) -> Plan:
        """The plan with every file stored under `coding`, but for those `compressed` names,
        stored as it says (their coding and measured stored size; docs/format.md, "Coded
        files")."""
        compressed = compressed or {}
        if coding.identity and not compressed:
            return self
        units = [
            replace(unit, coding=compressed[unit.path][0], stored_size=compressed[unit.path][1])
            if unit.path in compressed
            else replace(unit, coding=coding)
            for unit in self.units
        ]
        for unit in units:
            if unit.kind is Kind.MULTIPART and unit.part_size % FRAME_SIZE:
                raise UsageError(
                    f"{unit.path}: parts of {unit.part_size:,} bytes are not whole frames of "
                    f"{FRAME_SIZE:,}: plan again"
                )
        shards = [s.with_coding(coding, compressed) for s in self.shards]
        return replace(self, units=units, shards=shards)

    def to_json(self) -> dict[str, Any]:
        data = {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION if self.selection else 1,
            "source": str(self.source),
            "dest": str(self.dest),
            "config": self.config.to_json(),
            "estimate": self.estimate.to_json(),
            "problems": [[p.path, p.reason] for p in self.problems],
            "units": [unit.to_json() for unit in self.units],
            "shards": [shard.to_json() for shard in self.shards],
        }
        if self.selection:
            data["selection"] = self.selection.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], *, where: str = "plan") -> Plan:
        """Raises UsageError saying what is wrong: another format, version or a bad field."""
        if data.get("format") != PLAN_FORMAT:
            raise UsageError(f"{where} is not an s3xfer plan (format {data.get('format')!r})")
        version = data.get("version")
        if version not in PLAN_VERSIONS:
            newer = isinstance(version, int) and version > PLAN_VERSION
            raise UsageError(
                f"{where} has format version {version!r}, this s3xfer reads versions "
                f"{' and '.join(map(str, PLAN_VERSIONS))}"
                + (" (written by a newer s3xfer: upgrade it)" if newer else "")
            )
        try:
            return cls(
                source=Path(data["source"]),
                dest=S3Url.parse(data["dest"]),
                config=TransferConfig.from_json(data["config"]),
                units=[FileUnit.from_json(row) for row in data["units"]],
                shards=[ShardUnit.from_json(row) for row in data.get("shards", [])],
                problems=[Problem(path, reason) for path, reason in data.get("problems", [])],
                selection=PathFilter.from_json(data.get("selection"))
                if version == PLAN_VERSION
                else NO_FILTER,
            )
        except KeyError as exc:
            raise UsageError(f"corrupt {where}: no {exc.args[0]!r} field") from exc
        except (TypeError, ValueError) as exc:
            raise UsageError(f"corrupt {where}: {exc}") from exc


def make_plan(survey: Survey, dest: S3Url, config: TransferConfig | None = None) -> Plan:
    """The plan for uploading a surveyed tree to `dest`. Pure: no I/O."""
    config = config or TransferConfig()
    if not survey.files:
        if survey.selection:
            raise SourceError(
                f"nothing to upload: no readable file under {survey.root} matches "
                f"{survey.selection.describe()}"
            )
        raise SourceError(f"nothing to upload: no readable files under {survey.root}")
    small = [e for e in survey.files if classify(e.size, config) is Kind.PACK]
    units = [
        plan_file(e, dest, config)
        for e in survey.files
        if classify(e.size, config) is not Kind.PACK
    ]
    return Plan(
        source=survey.root,
        dest=dest,
        config=config,
        units=units,
        shards=list(group_into_shards(small, dest, config)),
        problems=list(survey.problems),
        selection=survey.selection,
    )


@dataclass(frozen=True)
class WorkUnit:
    """What one worker does at once when a plan is spread over machines: one shard, one
    multipart file, or a batch of single PUTs. Deterministic, so every machine agrees."""

    files: list[FileUnit]
    shards: list[ShardUnit]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files) + sum(s.size for s in self.shards)

    @property
    def file_count(self) -> int:
        return len(self.files) + sum(len(s.members) for s in self.shards)

    def to_json(self) -> dict[str, Any]:
        return {
            "files": [f.to_json() for f in self.files],
            "shards": [s.to_json() for s in self.shards],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkUnit:
        return cls(
            [FileUnit.from_json(row) for row in data["files"]],
            [ShardUnit.from_json(row) for row in data["shards"]],
        )


PUT_BATCH_BYTES = 64 * MiB
PUT_BATCH_FILES = 1000


def work_units(
    units: Iterable[FileUnit],
    shards: Iterable[ShardUnit],
    *,
    batch_bytes: int = PUT_BATCH_BYTES,
    batch_files: int = PUT_BATCH_FILES,
) -> list[WorkUnit]:
    """Shards one each, multipart files one each, single PUTs in batches (in plan order) of
    at most batch_files files or about batch_bytes: enough work per unit to keep a worker's
    connections busy, few enough units that a lost one costs little to redo."""
    out = [WorkUnit([], [shard]) for shard in shards]
    batch: list[FileUnit] = []
    filled = 0
    for unit in units:
        if unit.kind is Kind.MULTIPART:
            out.append(WorkUnit([unit], []))
            continue
        batch.append(unit)
        filled += unit.size
        if len(batch) >= batch_files or filled >= batch_bytes:
            out.append(WorkUnit(batch, []))
            batch, filled = [], 0
    if batch:
        out.append(WorkUnit(batch, []))
    return out


def parse_slice(text: str) -> tuple[int, int]:
    """'K/N' → (K, N), 1 ≤ K ≤ N. Raises UsageError."""
    k, sep, n = text.partition("/")
    if not sep or not k.strip().isdigit() or not n.strip().isdigit():
        raise UsageError(f"not a slice: {text!r} (expected K/N, e.g. 3/8)")
    index, count = int(k), int(n)
    if not 1 <= index <= count:
        raise UsageError(f"slice {text!r}: K must be between 1 and N")
    return index, count


def slice_of(work: list[WorkUnit], index: int, count: int) -> list[WorkUnit]:
    """Slice `index` of `count` (from 1): every count-th unit, so slices get a similar mix of
    shards, large files and batches."""
    return work[index - 1 :: count]
