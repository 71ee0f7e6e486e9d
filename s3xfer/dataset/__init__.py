"""What a dataset looks like on S3 (docs/format.md), shared by writers and readers.

- `keys.py`: S3 URLs and the names of every object of a dataset.
- `tarpack.py`: the tar layout of a shard, member by member.
- `manifest.py`, `catalog.py`: the list of every file and where it is; the catalog answers a
  lookup of one path in at most two small GETs.
- `validate.py`: every value read back from S3 is checked here before it is used.
"""
