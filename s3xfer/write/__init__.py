"""Executing a plan: sending the bytes, then the metadata that makes them a dataset.

- `upload.py`: one upload from start to finish (prepare, lease, run, finish, report).
- `engine.py`: the bounded-memory, bounded-concurrency scheduler of shards, files and parts.
- `inflight.py`: what the engine holds per object in flight (multipart state, shard CRCs, jobs).
- `counters.py`: the engine's counters, the one source of every report.
- `journal.py`: what is already on S3, so an interrupted upload resumes.
- `lease.py`: one writer per dataset at a time.
- `incomplete.py`: the unfinished multipart uploads under a prefix, listed and aborted.
- `cleanup.py`: the `cleanup` command: unfinished uploads older than an age, aborted.
- `rerun.py`: an unchanged re-run told by one walk beside the manifest, before any planning.
- `datakey.py`: the dataset's data key, for an upload that encrypts.
"""
