"""`python -m s3xfer` runs the command line."""

from .cli import entry

entry()
