"""An upload split across machines.

- `slices.py`: one plan over many batch jobs without a broker: a slice each, then `finalize`.
- `jobs.py`: one plan over many machines with Celery over Redis, the producer's side.
- `worker.py`: the Celery app and `s3xfer worker`, which runs units with the engine.
- `units.py`: the pure parts of a job: payloads, unit results, the producer's decisions.
- `broker.py`: the `distributed` extra's imports (one clear line without it), the Redis connection.
"""
