"""The pure rules of a re-upload that makes the dataset equal the tree: which records stay,
which keys nothing refers to any more, which of those may be deleted, and shard naming."""

from __future__ import annotations

from pathlib import Path

from s3xfer.config import TransferConfig
from s3xfer.dataset.catalog import FANOUT, bucket_of, build, parse_piece, piece_key
from s3xfer.dataset.keys import S3Url, sync_deletable
from s3xfer.dataset.manifest import Manifest, ManifestRecord, ShardRecord
from s3xfer.planning.plan import Plan, group_into_shards
from s3xfer.planning.survey import FileEntry, Problem
from s3xfer.write.upload import kept_paths

DEST = S3Url("b", "p")


def loose(path: str) -> ManifestRecord:
    return ManifestRecord(path, f"p/{path}", 5, 1, 0o644, "x", 0, -1, '"e"')


def packed(path: str, shard: str, offset: int, etag: str = '"s"') -> ManifestRecord:
    return ManifestRecord(path, shard, 5, 1, 0o644, "x", 0, offset, etag)


def test_files_no_longer_in_the_tree_leave_unless_kept_and_unused_shards_go() -> None:
    manifest = Manifest(
        str(DEST),
        {
            "a": packed("a", "p/.s3xfer/shards/1/one.tar", 512),
            "b": packed("b", "p/.s3xfer/shards/2/two.tar", 512),
            "c": loose("c"),
            "d": loose("d"),
        },
        {
            "p/.s3xfer/shards/1/one.tar": ShardRecord("p/.s3xfer/shards/1/one.tar", 9, '"s"', 1),
            "p/.s3xfer/shards/2/two.tar": ShardRecord("p/.s3xfer/shards/2/two.tar", 9, '"s"', 1),
        },
    )
    synced = manifest.synced({"a", "c"}, keep=lambda _path: False)
    assert sorted(synced.records) == ["a", "c"]
    assert list(synced.shards) == ["p/.s3xfer/shards/1/one.tar"]
    assert manifest.object_keys() - synced.object_keys() == {
        "p/.s3xfer/shards/2/two.tar",
        "p/.s3xfer/shards/2/two.tar.index.json",
        "p/d",
    }
    kept = manifest.synced({"a", "c"}, keep=lambda path: path == "b")
    assert sorted(kept.records) == ["a", "b", "c"] and len(kept.shards) == 2


def test_a_stale_record_is_left_out_even_when_kept() -> None:
    shard = "p/.s3xfer/shards/1/one.tar"
    manifest = Manifest(
        str(DEST),
        {"a": packed("a", shard, 512, '"new"'), "gone": packed("gone", shard, 1536, '"old"')},
        {shard: ShardRecord(shard, 9, '"new"', 1)},
    )
    assert sorted(manifest.synced({"a"}, keep=lambda _path: True).records) == ["a"]


def test_only_files_and_shards_under_the_prefix_may_be_deleted() -> None:
    assert sync_deletable(DEST, "p/a.txt")
    assert sync_deletable(DEST, "p/.s3xfer/shards/ab12/ab12cd.tar")
    assert sync_deletable(DEST, "p/.s3xfer/shards/ab12/ab12cd.tar.index.json")
    for key in (
        "p/.s3xfer/manifest.json.gz",
        "p/.s3xfer/catalog.json",
        "p/.s3xfer/catalog/0a.json.gz",
        "p/.s3xfer/slices/123/00001-of-00002.json.gz",
        "other/a.txt",
        "pa.txt",
        "p/",
        "",
    ):
        assert not sync_deletable(DEST, key), key
    assert sync_deletable(S3Url("b", ""), "a.txt")
    assert not sync_deletable(S3Url("b", ""), ".s3xfer/manifest.json.gz")


def test_a_catalog_piece_whose_files_all_left_is_written_empty() -> None:
    before = Manifest(str(DEST), {"a": loose("a"), "b": loose("b")})
    after = Manifest(str(DEST), {"a": loose("a")})
    _, pieces = build(after, DEST, previous=before)
    key = piece_key(DEST, bucket_of("b"))
    assert key in pieces
    assert parse_piece(pieces[key], fanout=FANOUT, bucket=bucket_of("b"), where=key) == (
        {"a": loose("a")} if bucket_of("a") == bucket_of("b") else {}
    )


def test_files_under_an_unreadable_path_are_kept_and_others_not() -> None:
    plan = Plan(
        source=Path("/src"),
        dest=DEST,
        config=TransferConfig(),
        units=[],
        problems=[
            Problem("locked", "permission denied"),
            Problem("link", "broken symlink"),
        ],
    )
    keep = kept_paths(plan, keep_deleted=False)
    assert keep("locked") and keep("locked/deep/file.txt")
    assert not keep("lockedness.txt") and not keep("link") and not keep("other.txt")
    assert kept_paths(plan, keep_deleted=True)("other.txt")


def test_a_shard_is_named_after_its_content() -> None:
    config = TransferConfig()
    members = [FileEntry(f"f{n}.txt", 10, 1_000, 0o644) for n in range(3)]
    [shard] = group_into_shards(members, DEST, config)
    [same] = group_into_shards(list(members), DEST, config)
    touched = [*members[:2], FileEntry("f2.txt", 10, 2_000, 0o644)]
    [changed] = group_into_shards(touched, DEST, config)
    [fewer] = group_into_shards(members[:2], DEST, config)
    assert shard.key == same.key
    assert len({shard.key, changed.key, fewer.key}) == 3
    assert shard.key.startswith("p/.s3xfer/shards/") and shard.key.endswith(".tar")
