"""The `s3xfer` command line: parsing, rendering, exit codes. No transfer logic lives here.

- `main.py`: the command group and every command but `bench`.
- `bench.py`: the `bench` command.
- `render.py`: tables and summaries for people; `--json` for scripts.
- `demo.py`: `s3xfer demo`, the whole job against an embedded local S3 server.
"""
