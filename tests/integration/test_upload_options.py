"""The upload options a user coming from `aws s3 cp` expects (issue 15): --include/--exclude,
through the real CLI against the local server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio

from s3xfer.locals3 import LocalS3Info
from s3xfer.read.reader import Dataset

from .helpers import connection, list_keys, run_cli, write_tree

SMALL_PACK = ["--part-size", "5MiB", "--pack-threshold", "1MiB"]
LOOSE = 1200 * 1024  # above the pack threshold: an object of its own


def upload(src: Path, url: str, *options: str) -> dict[str, Any]:
    result = run_cli("upload", str(src), url, "--json", *SMALL_PACK, *options)
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def listed(url: str) -> list[str]:
    result = run_cli("ls", url, "--json")
    assert result.returncode == 0, result.stderr
    return sorted(r["path"] for r in json.loads(result.stdout))


def restored(url: str, dest: Path) -> dict[str, bytes]:
    result = run_cli("download", url, str(dest))
    assert result.returncode == 0, result.stderr
    files = [p for p in sorted(dest.rglob("*")) if p.is_file()]
    return {p.relative_to(dest).as_posix(): p.read_bytes() for p in files}


def photo_tree(src: Path) -> dict[str, bytes]:
    return write_tree(
        src,
        {
            "a.jpg": 300,
            "b.jpg": 400,
            "notes.txt": 50,
            "deep/c.jpg": 500,
            "deep/d.tmp": 60,
            "cache/e.jpg": 70,
            "cache/big.bin": LOOSE,
            "big.tmp": LOOSE,
        },
        seed=3,
    )


def test_include_and_exclude_send_only_the_files_they_select(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str
) -> None:
    src, url = tmp_path / "src", f"s3://{bucket}/f"
    contents = photo_tree(src)
    # The same globs as download's: '*' crosses '/', an exclude wins over an include.
    report = upload(src, url, "--include", "*.jpg", "--exclude", "cache/*")

    assert report["files_uploaded"] == 3
    expected = ["a.jpg", "b.jpg", "deep/c.jpg"]
    assert listed(url) == expected
    assert restored(url, tmp_path / "out") == {p: contents[p] for p in expected}
    download = run_cli(
        "download", url, str(tmp_path / "same"), "--include", "*.jpg", "--exclude", "cache/*"
    )
    assert download.returncode == 0, download.stderr


def test_survey_and_plan_show_what_the_filters_select(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str
) -> None:
    src = tmp_path / "src"
    photo_tree(src)
    survey = run_cli("survey", str(src), "--exclude", "*.tmp", "--exclude", "cache/*", "--json")
    assert survey.returncode == 0, survey.stderr
    found = json.loads(survey.stdout)
    assert found["stats"]["count"] == 4  # a, b, notes, deep/c.jpg: cache/ and *.tmp left out
    assert found["selection"] == {"include": [], "exclude": ["*.tmp", "cache/*"]}

    plan = run_cli("plan", str(src), f"s3://{bucket}/f", "--exclude", "*.tmp", *SMALL_PACK)
    assert plan.returncode == 0, plan.stderr
    assert "--exclude *.tmp" in plan.stdout
    assert "files                        6" in plan.stdout
    nothing = run_cli("plan", str(src), f"s3://{bucket}/f", "--include", "*.png")
    assert nothing.returncode == 2  # SourceError, as for an empty tree
    assert "no readable file under" in nothing.stderr and "--include *.png" in nothing.stderr


def test_a_re_upload_with_filters_leaves_the_excluded_dataset_files_alone(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    src, url = tmp_path / "src", f"s3://{bucket}/s"
    contents = photo_tree(src)
    upload(src, url)  # everything
    everything = sorted(contents)
    assert listed(url) == everything

    # Excluded files, in the tree or gone from it, packed or loose, stay in the dataset,
    # with their objects (as `rclone sync --exclude` leaves excluded destination files).
    (src / "deep/d.tmp").unlink()
    (src / "big.tmp").unlink()
    report = upload(src, url, "--exclude", "*.tmp")
    assert (report["files_removed"], report["objects_deleted"]) == (0, 0)
    assert report["files_not_selected"] == 2
    # The small selected files are packed again without d.tmp (a new shard); the old shard
    # stays, d.tmp's record pointing into it.
    assert report["files_uploaded"] == 5
    assert listed(url) == everything
    assert "s/big.tmp" in list_keys(sync_s3_client, bucket, "s/")
    assert restored(url, tmp_path / "out1") == contents

    # A selected file that left the tree leaves the dataset; the excluded ones still stay.
    (src / "notes.txt").unlink()
    (src / "cache/big.bin").unlink()
    report = upload(src, url, "--exclude", "*.tmp")
    assert report["files_removed"] == 2
    assert "s/cache/big.bin" not in list_keys(sync_s3_client, bucket, "s/")
    assert "s/big.tmp" in list_keys(sync_s3_client, bucket, "s/")
    kept = {p: b for p, b in contents.items() if p not in ("notes.txt", "cache/big.bin")}
    assert listed(url) == sorted(kept)
    assert restored(url, tmp_path / "out2") == kept

    # Without the filter the dataset is made equal the tree again: the .tmp files go.
    report = upload(src, url)
    assert report["files_removed"] == 2
    assert listed(url) == sorted(p for p in kept if not p.endswith(".tmp"))
    assert "s/big.tmp" not in list_keys(sync_s3_client, bucket, "s/")


def test_a_saved_plan_keeps_its_filters(tmp_path: Path, s3_env: LocalS3Info, bucket: str) -> None:
    src, url = tmp_path / "src", f"s3://{bucket}/p"
    contents = photo_tree(src)
    upload(src, url)
    (src / "big.tmp").unlink()
    plan_file = tmp_path / "plan.json"
    made = run_cli(
        "plan", str(src), url, "--exclude", "*.tmp", "--output", str(plan_file), *SMALL_PACK
    )
    assert made.returncode == 0, made.stderr
    saved = json.loads(plan_file.read_text())
    assert saved["version"] == 2 and saved["selection"]["exclude"] == ["*.tmp"]

    result = run_cli("upload", "--plan", str(plan_file), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["files_removed"] == 0
    assert listed(url) == sorted(contents)  # big.tmp, excluded, stays
    again = run_cli("upload", "--plan", str(plan_file), "--exclude", "*.jpg")
    assert again.returncode == 2
    assert "--exclude: give them to `s3xfer plan`" in again.stderr


# --- what the objects carry: Content-Type, storage class, metadata -------------------------

TYPED = {
    "photo.jpg": 100,
    "data.json": 100,
    "page.html": 100,
    "blob.zzqx": 100,  # an extension nobody knows
    "README": 100,  # none at all
    "large.json": 6 * 1024 * 1024,  # a multipart upload: its type goes on CreateMultipartUpload
}
LOOSE_OPTIONS = ["--no-pack", "--multipart-threshold", "5MiB"]


def head(client: Any, bucket: str, key: str) -> dict[str, Any]:
    answer: dict[str, Any] = client.head_object(Bucket=bucket, Key=key)
    return answer


def untyped(client: Any, bucket: str, path: str, body: bytes) -> str:
    """What this server stores when a PUT names no Content-Type. S3 and moto store
    binary/octet-stream (tests/integration/test_moto_crosscheck.py checks s3xfer there);
    SeaweedFS guesses one itself, from the key's extension or by sniffing the bytes."""
    key = f"untyped-reference/{path}"
    client.put_object(Bucket=bucket, Key=key, Body=body)
    content_type: str = head(client, bucket, key)["ContentType"]
    return content_type


def test_content_types_are_guessed_from_extensions_as_awscli_does(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    src = tmp_path / "src"
    contents = write_tree(src, TYPED)
    upload(src, f"s3://{bucket}/t", *LOOSE_OPTIONS)

    types = {path: head(sync_s3_client, bucket, f"t/{path}")["ContentType"] for path in TYPED}
    assert types == {
        "photo.jpg": "image/jpeg",
        "data.json": "application/json",
        "page.html": "text/html",
        "blob.zzqx": untyped(sync_s3_client, bucket, "blob.zzqx", contents["blob.zzqx"]),
        "README": untyped(sync_s3_client, bucket, "README", contents["README"]),
        "large.json": "application/json",
    }


def test_content_type_forced_or_not_guessed(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    src = tmp_path / "src"
    contents = write_tree(src, TYPED)
    forced = "text/plain; charset=utf-8"
    upload(src, f"s3://{bucket}/forced", *LOOSE_OPTIONS, "--content-type", forced)
    upload(src, f"s3://{bucket}/plain", *LOOSE_OPTIONS, "--no-guess-mime-type")
    for path in TYPED:
        assert head(sync_s3_client, bucket, f"forced/{path}")["ContentType"] == forced
        assert head(sync_s3_client, bucket, f"plain/{path}")["ContentType"] == untyped(
            sync_s3_client, bucket, path, contents[path]
        )

    bad = run_cli("upload", str(src), f"s3://{bucket}/x", "--content-type", "jpeg")
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1
    assert "not a content type: 'jpeg'" in bad.stderr


def test_storage_class_goes_on_data_objects_and_offline_classes_are_refused(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    src = tmp_path / "src"
    write_tree(src, {"small.txt": 100, "loose.bin": LOOSE, "large.bin": 6 * 1024 * 1024})
    url = f"s3://{bucket}/c"
    upload(src, url, "--storage-class", "standard_ia", "--multipart-threshold", "5MiB")
    shard = next(k for k in list_keys(sync_s3_client, bucket, "c/") if k.endswith(".tar"))
    for key in ("c/loose.bin", "c/large.bin", shard):
        assert head(sync_s3_client, bucket, key)["StorageClass"] == "STANDARD_IA", key
    assert head(sync_s3_client, bucket, shard)["ContentType"] == "application/x-tar"
    for key in ("c/.s3xfer/manifest.json.gz", "c/.s3xfer/catalog.json", f"{shard}.index.json"):
        assert "StorageClass" not in head(sync_s3_client, bucket, key), key  # STANDARD

    for refused, reason in (
        ("GLACIER", "keeps objects offline until each is restored"),
        ("DEEP_ARCHIVE", "keeps objects offline until each is restored"),
        ("COLD_STORAGE", "unknown storage class 'COLD_STORAGE' (S3 knows STANDARD, "),
    ):
        result = run_cli("upload", str(src), f"{url}2", "--storage-class", refused)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.splitlines()) == 1 and reason in result.stderr
    assert list_keys(sync_s3_client, bucket, "c2/") == []


def test_metadata_goes_on_data_objects_and_bad_metadata_is_refused(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str, sync_s3_client: Any
) -> None:
    src = tmp_path / "src"
    write_tree(src, {"small.txt": 100, "loose.bin": LOOSE, "large.bin": 6 * 1024 * 1024})
    url = f"s3://{bucket}/m"
    given = ["--metadata", "Owner=alice", "--metadata", "project=cats=dogs, v2"]
    upload(src, url, *given, "--multipart-threshold", "5MiB")
    shard = next(k for k in list_keys(sync_s3_client, bucket, "m/") if k.endswith(".tar"))
    for key in ("m/loose.bin", "m/large.bin", shard):
        metadata = head(sync_s3_client, bucket, key)["Metadata"]
        assert metadata == {"owner": "alice", "project": "cats=dogs, v2"}, key
    assert head(sync_s3_client, bucket, "m/.s3xfer/manifest.json.gz")["Metadata"] == {}

    for bad, reason in (
        ("novalue", "--metadata takes KEY=VALUE, got 'novalue'"),
        ("=x", "--metadata takes KEY=VALUE"),
        ("bad key=1", "a key is lower-case letters, digits"),
        ("owner=caf\u00e9", "a value is printable ASCII"),
        ("owner= padded", "without leading or trailing spaces"),
        (f"big={'x' * 2100}", "S3 allows 2,048"),
    ):
        result = run_cli("upload", str(src), f"{url}2", "--metadata", bad)
        assert result.returncode == 2, (bad, result.stderr)
        assert len(result.stderr.splitlines()) == 1 and reason in result.stderr, result.stderr
    twice = run_cli("upload", str(src), f"{url}2", "--metadata", "a=1", "--metadata", "A=2")
    assert twice.returncode == 2 and "is given twice" in twice.stderr
    assert list_keys(sync_s3_client, bucket, "m2/") == []


def test_packed_files_report_their_content_type_and_unchanged_files_keep_theirs(
    tmp_path: Path, s3_env: LocalS3Info, bucket: str
) -> None:
    src, url = tmp_path / "src", f"s3://{bucket}/k"
    write_tree(src, {"photo.jpg": 100, "data.json": 100, "page.html": 100, "blob.zzqx": 100})
    upload(src, url)  # every file packed into one shard
    result = run_cli("ls", url, "--json")
    assert result.returncode == 0, result.stderr
    rows = {r["path"]: (r["stored"], r["content_type"]) for r in json.loads(result.stdout)}
    assert rows == {
        "photo.jpg": ("shard", "image/jpeg"),
        "data.json": ("shard", "application/json"),
        "page.html": ("shard", "text/html"),
        "blob.zzqx": ("shard", None),
    }

    async def stat(path: str) -> str:
        async with Dataset(url, connection=connection(s3_env)) as ds:
            return (await ds.stat(path)).content_type

    assert anyio.run(stat, "photo.jpg") == "image/jpeg"

    # Another --content-type does not rewrite unchanged files (as aws s3 sync): they keep
    # the type they were stored with, and their records say so.
    again = upload(src, url, "--content-type", "text/plain")
    assert again["write_requests"] == 0
    (src / "new.jpg").write_bytes(b"new")
    upload(src, url, "--content-type", "text/plain")
    result = run_cli("ls", url, "--json")
    types = {r["path"]: r["content_type"] for r in json.loads(result.stdout)}
    assert types["new.jpg"] == "text/plain"  # and its shard's neighbours, packed again with it
