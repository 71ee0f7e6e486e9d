"""`python -m s3xfer` runs the command line."""

from .cli.main import entry

entry()
