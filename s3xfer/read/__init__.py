"""Reading a dataset back: one file by byte range, many, or the whole tree.

- `reader.py`: `Dataset` / `SyncDataset`, the library API (random access, shuffled epochs).
- `download.py`: restore a tree into a destination, never writing outside it.
- `rangedl.py`, `ranges.py`: coalesced ranged GETs of many members at once.
- `epoch.py`: shuffled orders that keep reads sequential within a shard.
"""
