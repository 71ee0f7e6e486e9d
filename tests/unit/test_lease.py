"""The lease's pure parts (s3xfer/write/lease.py) and how the catalog tells it is current
(catalog.CatalogState): who may take a lease, how its age is read, when a catalog is
rewritten whole."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from s3xfer.dataset import catalog
from s3xfer.dataset.keys import S3Url
from s3xfer.dataset.manifest import Manifest, ManifestRecord
from s3xfer.errors import BadValue
from s3xfer.write.lease import LEASE_SECONDS, MAX_LEASE_SECONDS, Found, LeaseInfo, server_age

INFO = LeaseInfo(token="ab" * 16, host="h", pid=7, command="upload", started=1.5e9)


def test_lease_info_round_trips_and_refuses_what_it_did_not_write() -> None:
    assert LeaseInfo.from_bytes(INFO.to_bytes()) == INFO
    data = json.loads(INFO.to_bytes())
    for change in ({"seconds": -1}, {"seconds": MAX_LEASE_SECONDS + 1}, {"released": "no"}):
        with pytest.raises(BadValue):
            LeaseInfo.from_bytes(json.dumps({**data, **change}).encode())
    with pytest.raises(BadValue):
        LeaseInfo.from_bytes(b"\x00garbage")


@given(age=st.floats(-10, 10 * LEASE_SECONDS), seconds=st.integers(0, 3 * LEASE_SECONDS))
def test_a_lease_is_free_once_released_or_not_renewed_in_its_lifetime(
    age: float, seconds: int
) -> None:
    held = Found('"e"', LeaseInfo("t", "h", 1, "upload", 0.0, seconds=seconds), age)
    assert held.free == (age >= seconds)
    released = Found('"e"', LeaseInfo("t", "h", 1, "upload", 0.0, seconds, True), age)
    assert released.free
    unreadable = Found('"e"', None, age)  # still expires, after the default lifetime
    assert unreadable.free == (age >= LEASE_SECONDS)


def test_age_is_read_with_the_servers_clock_on_both_sides() -> None:
    head: dict[str, Any] = {
        "LastModified": "Thu, 01 Jan 2026 12:00:00 GMT",
        "Date": "Thu, 01 Jan 2026 12:04:10 GMT",
    }
    assert server_age(head) == 250.0
    assert server_age({**head, "LastModified": datetime(2026, 1, 1, 12, 4, tzinfo=UTC)}) == 10
    assert server_age({}) == 0.0  # nothing to go by: not expired on this machine's word


DEST = S3Url("b", "p")


def record(path: str) -> ManifestRecord:
    return ManifestRecord(path, f"p/{path}", 1, 0, 0o644, "AAAAAA==", 0, -1, '"e"')


def test_piece_keys_and_buckets_are_inverse() -> None:
    for bucket in (0, 7, 255):
        assert catalog.piece_bucket(DEST, catalog.piece_key(DEST, bucket)) == bucket
    for key in (
        "p/.s3xfer/catalog.json",
        "p/.s3xfer/catalog/zz.json.gz",
        "q/.s3xfer/catalog/00.json.gz",
    ):
        assert catalog.piece_bucket(DEST, key) is None


def test_a_catalog_is_current_only_when_its_root_names_the_manifest_and_every_piece() -> None:
    root = catalog.CatalogRoot("s3://b/p", catalog.FANOUT, 1, 1, {}, "d1", {3: '"x"'})
    assert catalog.CatalogState(root, {3: '"x"'}).current("d1")
    assert not catalog.CatalogState(root, {3: '"x"'}).current("d2")  # another manifest
    assert not catalog.CatalogState(root, {3: '"y"'}).current("d1")  # a piece rewritten
    assert not catalog.CatalogState(root, {}).current("d1")  # a piece gone
    assert not catalog.CatalogState(root, {3: '"x"', 4: '"z"'}).current("d1")  # one more
    assert catalog.CatalogState(None, {}).current(None)  # nothing written yet
    assert not catalog.CatalogState(None, {}).current("d1")  # a manifest without a catalog
    assert not catalog.CatalogState(None, {3: '"x"'}).current(None)


def test_a_catalog_built_without_a_previous_manifest_is_whole_and_blanks_stale_pieces() -> None:
    manifest = Manifest("s3://b/p", {"a": record("a"), "b": record("b")})
    stale = next(b for b in range(catalog.FANOUT) if b not in {catalog.bucket_of(p) for p in "ab"})
    _, pieces = catalog.build(manifest, DEST, stale=[stale])
    buckets = {catalog.piece_bucket(DEST, key) for key in pieces}
    assert buckets == {catalog.bucket_of("a"), catalog.bucket_of("b"), stale}
    key = catalog.piece_key(DEST, stale)
    assert catalog.parse_piece(pieces[key], fanout=catalog.FANOUT, bucket=stale, where=key) == {}
    _, same = catalog.build(manifest, DEST, previous=manifest)
    assert same == {}  # current and unchanged: nothing to write


def test_the_root_keeps_what_it_was_written_from() -> None:
    root = catalog.CatalogRoot(
        "s3://b/p", catalog.FANOUT, 0, 0, {}, "ab" * 32, {0: '"e0"', 255: '"e1"'}
    )
    assert catalog.CatalogRoot.from_bytes(root.to_bytes(), where="r") == root
    data = json.loads(root.to_bytes())
    data["pieces"] = {"zz": '"e"'}
    with pytest.raises(Exception, match="not a bucket in hex"):
        catalog.CatalogRoot.from_bytes(json.dumps(data).encode(), where="r")


def test_a_holder_whose_process_is_gone_from_this_machine_is_known_to_be_gone() -> None:
    """So that running a killed upload again resumes it at once, without waiting for its lease
    to expire; only where the pid can be checked: this kernel boot and pid namespace."""
    me = LeaseInfo.for_this_process("upload")
    assert me.machine and me.pid_start and not me.gone
    child = subprocess.Popen(["true"])
    child.wait()  # reaped: no process has that pid now
    assert replace(me, pid=child.pid).gone
    assert replace(me, pid_start=me.pid_start + 1).gone  # the pid reused by another process
    assert not replace(me, pid=child.pid, machine="another-boot pid:[1]").gone
    assert not replace(me, pid=child.pid, machine="").gone  # cannot tell: not gone
    assert Found('"e"', replace(me, pid=child.pid), age=0.0).free


def test_quotes_around_etags_do_not_make_a_catalog_stale() -> None:
    root = catalog.CatalogRoot("s3://b/p", catalog.FANOUT, 1, 1, {}, "d", {3: "x"})
    assert catalog.CatalogState(root, {3: '"x"'}).current("d")
