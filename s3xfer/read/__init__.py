"""Reading a dataset back: one file by byte range, many, or the whole tree.

- `reader.py`: `Dataset`, the library API (random access, coalesced reads, `get`, `ls`).
- `sync.py`: `SyncDataset`, the same from synchronous code.
- `epoch.py`: shuffled orders that keep reads sequential within a shard (pure).
- `epoch_iter.py`: the iterator of a shuffled epoch, reading ahead within a byte budget.
- `download.py`: restore a tree into a destination, never writing outside it.
- `rangedl.py`, `ranges.py`: coalesced ranged GETs of many members at once.
"""
