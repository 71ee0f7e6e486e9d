"""A plan's files and shards under a coding (--encryption-key, --compress): stored sizes in
the layout, shards named apart by coding, compressed members that changed stored as they are,
and `auto`'s choice."""

from __future__ import annotations

import json
import os

import pytest

from s3xfer.config import MiB
from s3xfer.dataset.coding import (
    ENCRYPTED,
    IDENTITY,
    SEAL_OVERHEAD,
    Coding,
    Compression,
    CompressMode,
    Encryption,
    choose_coding,
)
from s3xfer.dataset.tarpack import index_from_bytes
from s3xfer.errors import CorruptMetadataError
from s3xfer.planning.plan import ShardUnit
from s3xfer.planning.survey import FileEntry

ZSTD = Coding(Compression.ZSTD)
ZSTD_AES = Coding(Compression.ZSTD, Encryption.AES_256_GCM)
MEMBERS = [FileEntry(f"m/{n}.txt", 1000 + n, 10**18, 0o644) for n in range(5)]
SHARD = ShardUnit("p/.s3xfer/shards/abcd/abcd000000000000.tar", 5 * MiB, MEMBERS)


def test_an_encrypted_shard_lays_out_stored_sizes_under_another_key() -> None:
    coded = SHARD.with_coding(ENCRYPTED)
    assert coded.key != SHARD.key and coded.key.startswith(SHARD.key.removesuffix(".tar") + "-")
    plain, sealed = SHARD.layout(), coded.layout()
    assert [m.size for m in sealed.members] == [m.size + SEAL_OVERHEAD for m in plain.members]
    assert SHARD.with_coding(IDENTITY) is SHARD
    assert coded.with_coding(ENCRYPTED) is coded


def test_compressed_members_take_their_measured_size_and_name_the_shard() -> None:
    measured = {"m/1.txt": (ZSTD, 77), "elsewhere.txt": (ZSTD, 5)}
    coded = SHARD.with_coding(IDENTITY, measured)
    assert coded.compressed == {"m/1.txt": (ZSTD, 77)}  # only its own members
    assert coded.layout().members[1].size == 77 and coded.coding_of("m/1.txt") == ZSTD
    assert coded.coding_of("m/0.txt") == IDENTITY
    other = SHARD.with_coding(IDENTITY, {"m/1.txt": (ZSTD, 78)})
    assert len({SHARD.key, coded.key, other.key}) == 3


def test_a_compressed_member_that_changed_is_laid_out_again_uncompressed() -> None:
    coded = SHARD.with_coding(ENCRYPTED, {"m/1.txt": (ZSTD_AES, 60), "m/2.txt": (ZSTD_AES, 61)})
    changed = FileEntry("m/1.txt", 2000, 10**18 + 1, 0o644)
    members = [MEMBERS[0], changed, *MEMBERS[2:]]
    relaid = coded.relaid(members, max_memory=64 * MiB)
    assert relaid.compressed == {"m/2.txt": (ZSTD_AES, 61)}
    assert relaid.coding_of("m/1.txt") == ENCRYPTED
    assert relaid.layout().members[1].size == 2000 + SEAL_OVERHEAD


def test_auto_compresses_what_shrinks() -> None:
    text = b'{"id": 12, "name": "someone"}\n' * 3000
    noise = os.urandom(100_000)
    assert choose_coding(text, mode=CompressMode.AUTO, base=ENCRYPTED) == ZSTD_AES
    assert choose_coding(noise, mode=CompressMode.AUTO, base=IDENTITY) == IDENTITY
    assert choose_coding(noise, mode=CompressMode.ZSTD, base=IDENTITY) == ZSTD
    assert choose_coding(text, mode=CompressMode.NONE, base=ENCRYPTED) == ENCRYPTED


def test_the_index_of_a_coded_shard_names_each_coded_members_coding_and_original_size() -> None:
    coded = SHARD.with_coding(IDENTITY, {"m/1.txt": (ZSTD, 77)})
    layout = coded.layout()
    raw = layout.index_bytes([7] * len(MEMBERS))
    assert len(raw) == layout.index_size  # known before any byte is read, as for any shard
    entries = index_from_bytes(raw, shard_key=coded.key)
    assert json.loads(raw)["version"] == 2
    assert (entries[1].coding, entries[1].size, entries[1].original_size) == ("zstd", 77, 1001)
    assert (entries[0].coding, entries[0].original_size) == ("", -1)
    plain = SHARD.layout().index_bytes([7] * len(MEMBERS))
    assert json.loads(plain)["version"] == 1 and b"coding" not in plain
    hostile = raw.replace(b'"coding":"zstd"', b'"coding":"rot13"')
    with pytest.raises(CorruptMetadataError):
        index_from_bytes(hostile, shard_key=coded.key)
