"""Measuring the path to S3: throughput against parallelism, latency percentiles, the knee.

- `settings.py`: what a run measures (presets, settings, the plan of points; pure).
- `sweep.py`: runs the sweep of PUTs and GETs at each level of parallelism, then cleans up.
- `recorder.py`: what one point records while it runs; warm-up and stop rules (pure).
- `results.py`: what a run found: `--json`, CSV, the plot.
- `profiles.py`: recommended settings kept as named profiles (`--bench-profile`).
- `stats.py`: percentiles, the knee, the recommendation (pure).
- `netem.py`: a delay/bandwidth path emulator on loopback, for `bench --path`.
"""
