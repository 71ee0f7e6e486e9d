"""Measuring the path to S3: throughput against parallelism, latency percentiles, the knee.

- `sweep.py`: runs the sweep of PUTs and GETs at each level of parallelism.
- `stats.py`: percentiles, the knee, the recommendation (pure).
- `netem.py`: a delay/bandwidth path emulator on loopback, for `bench --path`.
"""
