"""Executing a plan: sending the bytes, then the metadata that makes them a dataset.

- `upload.py`: one upload from start to finish (prepare, lease, run, finish, report).
- `engine.py`: the bounded-memory, bounded-concurrency scheduler of shards, files and parts.
- `journal.py`: what is already on S3, so an interrupted upload resumes.
- `lease.py`: one writer per dataset at a time.
- `cleanup.py`: unfinished multipart uploads and objects no record refers to.
"""
