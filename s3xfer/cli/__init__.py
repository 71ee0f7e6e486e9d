"""The `s3xfer` command line: parsing, rendering, exit codes. No transfer logic lives here.

- `main.py`: the command group, `entry()`, errors to exit codes; loads each command's module
  only when it runs (COMMANDS).
- `options.py`: the option blocks shared by several commands (connection, encryption, plan
  shaping, the run limits --concurrency and --max-memory, --include/--exclude, --unfinished,
  --deadline), each defined once, and the values read back from them (make_connection,
  make_limits).
- `upload.py`: `survey`, `plan`, `upload`, `finalize`.
- `read.py`: `ls`, `cat`, `get`, `download`.
- `distributed.py`: `worker`, and the producer's side of `upload --broker`.
- `manage.py`: `cleanup`.
- `bench.py`: `bench`.
- `server.py`: `local-s3` and `demo` (the demo itself: `demo.py`).
- `output.py`: bytes and JSON to stdout, the progress bar; `render.py`: tables and summaries.
"""
