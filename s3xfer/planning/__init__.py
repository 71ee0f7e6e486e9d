"""From a local tree to a plan, before any byte is sent: pure decisions over file sizes.

- `survey.py`: walk the tree once (sizes, times, what cannot be read).
- `globs.py`: `--include` / `--exclude` selection.
- `plan.py`: which files are packed into shards, sent whole or in parts, and under which keys.
"""
